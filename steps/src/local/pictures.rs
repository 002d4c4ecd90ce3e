//! The pictures, drawn in-process: an asset is a titled colour card (topic, story
//! direction, its number); the composite lays every asset out on one 1280×720 board under
//! the title, and each clip later moves across that board towards its own asset.

use ab_glyph::FontRef;
use image::imageops::{FilterType, resize};
use image::{Rgb, RgbImage};

use super::text::{Pen, blend};

/// An asset card's size.
pub(crate) const CARD: (u32, u32) = (640, 360);
/// The composite's (and so every clip's) frame size.
pub(crate) const FRAME: (u32, u32) = (1280, 720);

/// The board's grid: 6 × 4 cells of 192 × 108 (16:9) for up to 24 assets.
const COLUMNS: u32 = 6;
const ROWS: u32 = 4;
const TILE: (u32, u32) = (192, 108);
const GAP: u32 = 12;
const GRID_TOP: u32 = 176;

const WHITE: [u8; 3] = [255, 255, 255];

/// What the pictures say: the task's topic and story direction.
#[derive(Clone, Debug)]
pub(crate) struct Story {
    pub(crate) topic: String,
    pub(crate) direction: Option<String>,
}

impl Story {
    /// The story's base hue (0–360), the same for every run of the same topic.
    fn hue(&self) -> f32 {
        // FNV-1a: stable across builds and platforms, unlike the standard hasher.
        let hash = self.topic.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (hash % 360) as f32
    }

    /// Asset `item`'s hue: spread around the colour wheel by the golden angle, so
    /// neighbouring cards never look alike.
    fn asset_hue(&self, item: u32) -> f32 {
        (self.hue() + 137.5 * item as f32) % 360.0
    }
}

/// Asset `item` of `total`: a colour card with the topic, the direction and its number.
pub(crate) fn asset_card(story: &Story, item: u32, total: u32, font: &FontRef<'_>) -> RgbImage {
    let (width, height) = CARD;
    let hue = story.asset_hue(item);
    let mut card = gradient(CARD, hsl(hue, 0.55, 0.45), hsl(hue + 40.0, 0.6, 0.16));
    // A soft disc placed by the item number: each card has its own composition.
    let centre = ((item * 97 % width) as f32, (item * 53 % height) as f32);
    disc(
        &mut card,
        centre,
        90.0 + (item % 5) as f32 * 25.0,
        WHITE,
        0.10,
    );

    let number = format!("{item:02}");
    let big = Pen::new(230.0, WHITE).opacity(0.16);
    big.draw(
        &mut card,
        font,
        &number,
        width as f32 - big.width(font, &number) - 24.0,
        80.0,
    );
    Pen::new(22.0, WHITE).opacity(0.85).draw(
        &mut card,
        font,
        &format!("ASSET {item:02} / {total:02}"),
        28.0,
        22.0,
    );
    let title = Pen::new(46.0, WHITE);
    let lines = title.wrap(font, &story.topic, width as f32 - 80.0, 2);
    let below = title.draw_centred(&mut card, font, &lines, width as f32 / 2.0, 118.0);
    if let Some(direction) = &story.direction {
        let pen = Pen::new(26.0, WHITE).opacity(0.8);
        let lines = pen.wrap(font, direction, width as f32 - 80.0, 2);
        pen.draw_centred(&mut card, font, &lines, width as f32 / 2.0, below + 14.0);
    }
    card
}

/// The board: the title over a grid of every asset, in order.
pub(crate) fn composite(story: &Story, assets: &[RgbImage], font: &FontRef<'_>) -> RgbImage {
    let hue = story.hue();
    let mut board = gradient(FRAME, hsl(hue, 0.35, 0.22), hsl(hue + 20.0, 0.4, 0.07));
    let centre_x = FRAME.0 as f32 / 2.0;
    let title = Pen::new(54.0, WHITE);
    let lines = title.wrap(font, &story.topic, FRAME.0 as f32 - 120.0, 1);
    let below = title.draw_centred(&mut board, font, &lines, centre_x, 30.0);
    if let Some(direction) = &story.direction {
        let pen = Pen::new(26.0, WHITE).opacity(0.75);
        let lines = pen.wrap(font, direction, FRAME.0 as f32 - 120.0, 1);
        pen.draw_centred(&mut board, font, &lines, centre_x, below + 4.0);
    }
    for (index, asset) in assets.iter().enumerate().take((COLUMNS * ROWS) as usize) {
        let (x, y) = tile_origin(index as u32);
        let thumb = resize(asset, TILE.0, TILE.1, FilterType::Triangle);
        frame_rect(
            &mut board,
            (x - 2, y - 2),
            (TILE.0 + 4, TILE.1 + 4),
            WHITE,
            0.7,
        );
        image::imageops::replace(&mut board, &thumb, i64::from(x), i64::from(y));
    }
    let footer = format!("{} assets", assets.len());
    let pen = Pen::new(20.0, WHITE).opacity(0.6);
    pen.draw_centred(&mut board, font, &[footer], centre_x, 664.0);
    board
}

/// The centre of asset `item`'s (1-based) tile on the board, in pixels: where its clip
/// moves to.
pub(crate) fn tile_centre(item: u32) -> (u32, u32) {
    let index = item.saturating_sub(1) % (COLUMNS * ROWS);
    let (x, y) = tile_origin(index);
    (x + TILE.0 / 2, y + TILE.1 / 2)
}

fn tile_origin(index: u32) -> (u32, u32) {
    let grid_width = COLUMNS * TILE.0 + (COLUMNS - 1) * GAP;
    let left = (FRAME.0 - grid_width) / 2;
    let (column, row) = (index % COLUMNS, index / COLUMNS);
    (
        left + column * (TILE.0 + GAP),
        GRID_TOP + row * (TILE.1 + GAP),
    )
}

/// A vertical gradient from `top` to `bottom`.
fn gradient((width, height): (u32, u32), top: [u8; 3], bottom: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(width, height, |_, y| {
        let t = y as f32 / height.max(2).saturating_sub(1) as f32;
        let mix = |a: u8, b: u8| (f32::from(a) * (1.0 - t) + f32::from(b) * t).round() as u8;
        Rgb([
            mix(top[0], bottom[0]),
            mix(top[1], bottom[1]),
            mix(top[2], bottom[2]),
        ])
    })
}

/// A filled disc mixed in at `amount`, its edge smoothed over a pixel.
fn disc(image: &mut RgbImage, (cx, cy): (f32, f32), radius: f32, color: [u8; 3], amount: f32) {
    let (x0, x1) = ((cx - radius).floor() as i64, (cx + radius).ceil() as i64);
    let (y0, y1) = ((cy - radius).floor() as i64, (cy + radius).ceil() as i64);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let distance = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            let edge = (radius - distance + 0.5).clamp(0.0, 1.0);
            if edge > 0.0 {
                blend(image, x, y, color, amount * edge);
            }
        }
    }
}

/// A filled rectangle mixed in at `amount`.
fn frame_rect(
    image: &mut RgbImage,
    (x, y): (u32, u32),
    (w, h): (u32, u32),
    color: [u8; 3],
    amount: f32,
) {
    for py in y..y + h {
        for px in x..x + w {
            blend(image, i64::from(px), i64::from(py), color, amount);
        }
    }
}

/// HSL (hue in degrees, saturation and lightness 0–1) as RGB.
fn hsl(hue: f32, saturation: f32, lightness: f32) -> [u8; 3] {
    let chroma = (1.0 - (2.0 * lightness - 1.0).abs()) * saturation;
    let h = hue.rem_euclid(360.0) / 60.0;
    let x = chroma * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (chroma, x, 0.0),
        1 => (x, chroma, 0.0),
        2 => (0.0, chroma, x),
        3 => (0.0, x, chroma),
        4 => (x, 0.0, chroma),
        _ => (chroma, 0.0, x),
    };
    let m = lightness - chroma / 2.0;
    let channel = |c: f32| ((c + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    [channel(r), channel(g), channel(b)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn story() -> Story {
        Story {
            topic: "The fall of Rome".into(),
            direction: Some("dramatic".into()),
        }
    }

    #[test]
    fn cards_differ_by_item_and_the_board_holds_every_card() {
        let font = super::super::text::font().expect("font");
        let one = asset_card(&story(), 1, 22, &font);
        let two = asset_card(&story(), 2, 22, &font);
        assert_eq!(one.dimensions(), CARD);
        assert_ne!(one, two);
        assert_eq!(one, asset_card(&story(), 1, 22, &font), "deterministic");

        let board = composite(&story(), &[one.clone(), two], &font);
        assert_eq!(board.dimensions(), FRAME);
        // The first tile shows card 1 (scaled): its corner has card 1's top colour.
        let (x, y) = tile_origin(0);
        let (a, b) = (board.get_pixel(x + 1, y + 1).0, one.get_pixel(2, 2).0);
        assert!(
            a.iter().zip(b).all(|(p, q)| p.abs_diff(q) < 24),
            "{a:?} vs {b:?}"
        );
    }

    #[test]
    fn tiles_lie_inside_the_frame_below_the_title() {
        for item in 1..=24 {
            let (x, y) = tile_centre(item);
            assert!(
                x < FRAME.0 && (GRID_TOP..FRAME.1).contains(&y),
                "{item}: {x},{y}"
            );
        }
        assert_eq!(hsl(0.0, 1.0, 0.5), [255, 0, 0]);
        assert_eq!(hsl(120.0, 1.0, 0.5), [0, 255, 0]);
    }
}
