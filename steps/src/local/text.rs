//! Text on images, with a font that ships inside a crate (Ubuntu Light, from
//! `epaint_default_fonts`): the same pixels on every machine, no system font needed.

use ab_glyph::{Font, FontRef, GlyphId, PxScale, ScaleFont, point};
use engine::StepError;
use image::{Rgb, RgbImage};

/// The font every card and composite is drawn with (compiled into the binary).
pub(crate) fn font() -> Result<FontRef<'static>, StepError> {
    FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT)
        .map_err(|e| StepError::permanent(format!("the bundled font does not parse: {e}")))
}

/// How `text` is drawn: its size in pixels, colour and opacity.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pen {
    pub(crate) size: f32,
    pub(crate) color: [u8; 3],
    pub(crate) opacity: f32,
}

impl Pen {
    pub(crate) fn new(size: f32, color: [u8; 3]) -> Self {
        Pen {
            size,
            color,
            opacity: 1.0,
        }
    }

    pub(crate) fn opacity(self, opacity: f32) -> Self {
        Pen { opacity, ..self }
    }

    /// The width of `text` on one line, in pixels.
    pub(crate) fn width(&self, font: &FontRef<'_>, text: &str) -> f32 {
        let scaled = font.as_scaled(PxScale::from(self.size));
        let mut width = 0.0;
        let mut last: Option<GlyphId> = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(prev) = last {
                width += scaled.kern(prev, id);
            }
            width += scaled.h_advance(id);
            last = Some(id);
        }
        width
    }

    /// Draws `text` on one line with its top-left corner at (`x`, `y`).
    pub(crate) fn draw(
        &self,
        image: &mut RgbImage,
        font: &FontRef<'_>,
        text: &str,
        x: f32,
        y: f32,
    ) {
        let scale = PxScale::from(self.size);
        let scaled = font.as_scaled(scale);
        let mut caret = x;
        let mut last: Option<GlyphId> = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(prev) = last {
                caret += scaled.kern(prev, id);
            }
            let glyph = id.with_scale_and_position(scale, point(caret, y + scaled.ascent()));
            caret += scaled.h_advance(id);
            last = Some(id);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let px = bounds.min.x as i64 + i64::from(gx);
                let py = bounds.min.y as i64 + i64::from(gy);
                blend(image, px, py, self.color, coverage * self.opacity);
            });
        }
    }

    /// Draws `lines` centred on `centre_x`, the first line's top at `y`; returns the `y`
    /// below the last line.
    pub(crate) fn draw_centred(
        &self,
        image: &mut RgbImage,
        font: &FontRef<'_>,
        lines: &[String],
        centre_x: f32,
        y: f32,
    ) -> f32 {
        let line_height = self.size * 1.2;
        for (n, line) in lines.iter().enumerate() {
            let x = centre_x - self.width(font, line) / 2.0;
            self.draw(image, font, line, x, y + line_height * n as f32);
        }
        y + line_height * lines.len() as f32
    }

    /// `text` broken into lines no wider than `max_width` (at most `max_lines`; the last
    /// one ends with "…" when text is left over). A word wider than a line stands alone.
    pub(crate) fn wrap(
        &self,
        font: &FontRef<'_>,
        text: &str,
        max_width: f32,
        max_lines: usize,
    ) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        let mut line = String::new();
        for word in text.split_whitespace() {
            let candidate = if line.is_empty() {
                word.to_owned()
            } else {
                format!("{line} {word}")
            };
            if line.is_empty() || self.width(font, &candidate) <= max_width {
                line = candidate;
            } else {
                lines.push(std::mem::replace(&mut line, word.to_owned()));
            }
        }
        if !line.is_empty() {
            lines.push(line);
        }
        if lines.len() > max_lines {
            lines.truncate(max_lines);
            if let Some(last) = lines.last_mut() {
                last.push('…');
            }
        }
        lines
    }
}

/// Mixes `color` into the pixel at (`x`, `y`) by `amount` (0 to 1); outside the image,
/// nothing.
pub(crate) fn blend(image: &mut RgbImage, x: i64, y: i64, color: [u8; 3], amount: f32) {
    let (Ok(x), Ok(y)) = (u32::try_from(x), u32::try_from(y)) else {
        return;
    };
    if x >= image.width() || y >= image.height() {
        return;
    }
    let amount = amount.clamp(0.0, 1.0);
    let Rgb(pixel) = image.get_pixel_mut(x, y);
    for (channel, target) in pixel.iter_mut().zip(color) {
        *channel =
            (f32::from(*channel) * (1.0 - amount) + f32::from(target) * amount).round() as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawn_text_changes_pixels_where_it_is_drawn_and_wraps_to_width() {
        let font = font().expect("the bundled font");
        let pen = Pen::new(40.0, [255, 255, 255]);
        let mut image = RgbImage::new(300, 100);
        pen.draw(&mut image, &font, "Rome", 10.0, 10.0);
        let lit = image.pixels().filter(|p| p.0[0] > 128).count();
        assert!(lit > 100, "the word is drawn ({lit} lit pixels)");
        assert!(image.get_pixel(299, 99).0 == [0, 0, 0], "nothing far away");

        let lines = pen.wrap(&font, "The fall of the Western Roman Empire", 200.0, 5);
        assert!(lines.len() > 1, "{lines:?}");
        assert!(
            lines
                .iter()
                .all(|l| pen.width(&font, l) <= 200.0 || !l.contains(' '))
        );
        let cut = pen.wrap(&font, "The fall of the Western Roman Empire", 200.0, 1);
        assert_eq!(cut.len(), 1);
        assert!(cut[0].ends_with('…'), "{cut:?}");
    }
}
