//! The narration script: one short line per clip, written from the topic and the story
//! direction. Short enough to be spoken within a clip.

use super::pictures::Story;

/// The longest topic or direction a line quotes (a long topic is cut, not read for a
/// minute).
const QUOTE_MAX_CHARS: usize = 80;

/// What happens between the opening and the closing lines, in order.
const BEATS: [&str; 14] = [
    "It begins quietly, far from the centre of events.",
    "Small signs of change appear.",
    "The pressure slowly builds.",
    "Old certainties start to crack.",
    "Every choice now carries weight.",
    "Allies turn into rivals.",
    "Then comes the turning point.",
    "Nothing will be the same again.",
    "The consequences spread.",
    "Some try to hold on to the past.",
    "Others see a new beginning.",
    "The dust begins to settle.",
    "What remains is remembered.",
    "Its echoes reach us still.",
];

/// Clip `clip`'s line, of `clips`.
pub(crate) fn narration_line(story: &Story, clip: u32, clips: u32) -> String {
    let topic = quote(&story.topic);
    let topic = topic.trim_end_matches(['.', '!', '?']);
    match clip {
        1 => format!("{topic}."),
        2 => match &story.direction {
            Some(direction) if !direction.trim().is_empty() => {
                format!("A {} story, in {clips} scenes.", quote(direction))
            }
            _ => format!("A story in {clips} scenes."),
        },
        last if last == clips => format!("And that was {topic}."),
        n => BEATS[(n as usize - 3) % BEATS.len()].to_owned(),
    }
}

/// `text`'s first words, up to [`QUOTE_MAX_CHARS`] (cut between words: it is spoken; a
/// first word longer than that is cut).
fn quote(text: &str) -> String {
    let mut quoted = String::new();
    for word in text.split_whitespace() {
        if quoted.is_empty() {
            quoted = word.chars().take(QUOTE_MAX_CHARS).collect();
        } else if quoted.chars().count() + 1 + word.chars().count() <= QUOTE_MAX_CHARS {
            quoted.push(' ');
            quoted.push_str(word);
        } else {
            break;
        }
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_opens_with_the_topic_and_closes_with_it() {
        let story = Story {
            topic: "The fall of Rome".into(),
            direction: Some("dramatic".into()),
        };
        let lines: Vec<String> = (1..=18).map(|n| narration_line(&story, n, 18)).collect();
        assert_eq!(lines[0], "The fall of Rome.");
        assert_eq!(lines[1], "A dramatic story, in 18 scenes.");
        assert_eq!(lines[17], "And that was The fall of Rome.");
        assert!(
            lines.iter().all(|l| l.split_whitespace().count() <= 12),
            "{lines:?}"
        );
        let plain = Story {
            topic: "x".repeat(500),
            direction: None,
        };
        assert_eq!(narration_line(&plain, 2, 18), "A story in 18 scenes.");
        assert!(narration_line(&plain, 1, 18).chars().count() < 100);
        let long = Story {
            topic: "The long and winding decline and fall of the Western Roman Empire in late antiquity".into(),
            direction: None,
        };
        assert_eq!(
            narration_line(&long, 1, 18),
            "The long and winding decline and fall of the Western Roman Empire in late."
        );
    }
}
