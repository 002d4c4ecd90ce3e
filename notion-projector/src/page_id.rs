//! Notion page ids: accepted as a dashed or undashed UUID or a page URL, used as the dashed
//! lower-case form (the form Notion's responses use), so one page is one key.

use std::fmt;

/// A Notion page id in its dashed lower-case form, e.g. `59833787-2cf9-4fdf-8782-e53db20768a5`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(String);

/// A `notion_page_id` that is neither a UUID nor a Notion page URL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid Notion page id {0:?}: expected a UUID (32 hex digits, dashes optional) or a page URL"
)]
pub struct InvalidPageId(pub String);

impl PageId {
    /// Parses `598337872cf94fdf8782e53db20768a5`, the dashed form (any case), or a URL such
    /// as `https://www.notion.so/Title-598337872cf94fdf8782e53db20768a5?v=…` (the path's
    /// id, never the `?v=` view id).
    pub fn parse(raw: &str) -> Result<PageId, InvalidPageId> {
        let invalid = || InvalidPageId(engine::truncate_for_display(raw, 120));
        let trimmed = raw.trim();
        let without_query = trimmed.split(['?', '#']).next().unwrap_or_default();
        let segment = without_query
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default();
        let undashed: String = segment.chars().filter(|c| *c != '-').collect();
        let hex = if is_hex32(&undashed) {
            undashed
        } else if trimmed.contains('/') {
            // A URL's last segment is `Title-<32 hex>`.
            match segment.rsplit_once('-') {
                Some((_, tail)) if is_hex32(tail) => tail.to_owned(),
                _ => return Err(invalid()),
            }
        } else {
            return Err(invalid());
        };
        let hex = hex.to_ascii_lowercase();
        Ok(PageId(format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )))
    }

    /// The dashed lower-case form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl fmt::Display for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DASHED: &str = "59833787-2cf9-4fdf-8782-e53db20768a5";

    #[test]
    fn accepts_every_form_notion_uses() {
        for raw in [
            "598337872cf94fdf8782e53db20768a5",
            "598337872CF94FDF8782E53DB20768A5",
            DASHED,
            " 59833787-2CF9-4FDF-8782-E53DB20768A5 ",
            "https://www.notion.so/Title-598337872cf94fdf8782e53db20768a5",
            "https://www.notion.so/team/Some-Long-Title-598337872cf94fdf8782e53db20768a5?v=0123456789abcdef0123456789abcdef",
            "https://notion.so/598337872cf94fdf8782e53db20768a5/",
        ] {
            assert_eq!(
                PageId::parse(raw).map(|p| p.0),
                Ok(DASHED.to_owned()),
                "{raw}"
            );
        }
    }

    #[test]
    fn rejects_what_is_not_a_page_id() {
        for raw in [
            "",
            "page-1",
            "598337872cf94fdf8782e53db20768a",
            "598337872cf94fdf8782e53db20768a5a",
            "g98337872cf94fdf8782e53db20768a5",
            "zzzz598337872cf94fdf8782e53db20768a5",
            "https://www.notion.so/Title?v=598337872cf94fdf8782e53db20768a5",
        ] {
            assert!(PageId::parse(raw).is_err(), "{raw:?} accepted");
        }
    }
}
