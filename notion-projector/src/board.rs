//! The team's board: one Notion data source whose cards are tasks. Its schema is read once
//! at start; the property values the projector writes and reads are built here, in the
//! shapes Notion documents for `POST /v1/pages`, `PATCH /v1/pages/{id}` and
//! `POST /v1/data_sources/{id}/query`.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::limiter::Limiter;
use crate::notion::{NotionClient, NotionError, PropertyType};
use crate::page_id::PageId;

/// Notion's longest text content of one rich text object, and longest option name. Notion
/// counts in UTF-16 code units (JavaScript string length), so do we.
const TEXT_MAX_UNITS: usize = 2000;

/// Notion's most rich text objects in one property value.
const TEXT_MAX_PARTS: usize = 100;

/// Which board, and which of its properties carry what.
#[derive(Clone, Debug)]
pub struct BoardOptions {
    /// The board's data source, or its database (resolved to its one data source): an id
    /// (dashes optional) or a URL.
    pub data_source: String,
    /// The title property (default: the data source's title property, whatever its name).
    pub title_property: Option<String>,
    /// The text property holding the task id (required on the board).
    pub task_id_property: String,
    /// The property showing the task's channel (select or text; left out when missing).
    pub channel_property: String,
    /// With `Some`, new cards become tasks (`--intake`).
    pub intake: Option<IntakeOptions>,
}

impl BoardOptions {
    /// A board at `data_source` with the default property names and no intake.
    pub fn new(data_source: impl Into<String>) -> BoardOptions {
        BoardOptions {
            data_source: data_source.into(),
            title_property: None,
            task_id_property: "Task ID".into(),
            channel_property: "Channel".into(),
            intake: None,
        }
    }
}

/// How cards become tasks.
#[derive(Clone, Debug)]
pub struct IntakeOptions {
    /// Cards in this status (and with an empty Task ID) are taken in.
    pub status: String,
    /// The channel of a card whose channel property is empty or missing.
    pub channel: Option<String>,
    /// The text property holding the story direction (optional on the card).
    pub direction_property: String,
    /// The workflow of the tasks it submits.
    pub workflow: String,
    /// The wait between two queries of the board.
    pub interval: Duration,
    /// The status a card that cannot become a task is set to.
    pub rejected_status: String,
    /// The text property that says why (left out when the board lacks it).
    pub reason_property: String,
}

impl Default for IntakeOptions {
    fn default() -> Self {
        IntakeOptions {
            status: "Queued".into(),
            channel: None,
            direction_property: "Story direction".into(),
            workflow: "video".into(),
            interval: Duration::from_secs(10),
            rejected_status: "Rejected".into(),
            reason_property: "Intake error".into(),
        }
    }
}

/// Why the board cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BoardError {
    #[error("the board {0:?} is not a Notion id or URL")]
    InvalidId(String),
    /// Not a `source`: its text is already in this one's (an error chain would print it twice).
    #[error("cannot read the board: {0}")]
    Notion(NotionError),
    #[error(
        "the database {database} has {count} data sources: pass one of them ({ids}) as --data-source"
    )]
    SeveralDataSources {
        database: String,
        count: usize,
        ids: String,
    },
    #[error(
        "the board {data_source} has no property {property:?} of type {expected}: add it (its name is set by {flag})"
    )]
    MissingProperty {
        data_source: String,
        property: String,
        expected: &'static str,
        flag: &'static str,
    },
}

impl From<NotionError> for BoardError {
    fn from(error: NotionError) -> BoardError {
        BoardError::Notion(error)
    }
}

impl BoardError {
    /// Whether opening the board may succeed later (Notion down, slow or rate limiting).
    pub fn is_transient(&self) -> bool {
        matches!(self, BoardError::Notion(error) if error.is_retryable())
    }
}

/// A property the board has, with its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Property {
    pub(crate) name: String,
    pub(crate) kind: Kind,
}

/// The property types the projector writes and reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Title,
    Text,
    Select,
    Status,
}

impl Kind {
    fn of(notion_type: &str) -> Option<Kind> {
        match notion_type {
            "title" => Some(Kind::Title),
            "rich_text" => Some(Kind::Text),
            "select" => Some(Kind::Select),
            "status" => Some(Kind::Status),
            _ => None,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::Title => "title",
            Kind::Text => "rich_text",
            Kind::Select => "select",
            Kind::Status => "status",
        }
    }
}

impl Property {
    /// The value that sets this property to `text`, as Notion takes it.
    /// A text longer than one rich text object holds is sent as several (a title of 5,000
    /// characters stays whole); an option name is cut to Notion's limit, "…" included.
    pub(crate) fn value(&self, text: &str) -> Value {
        match self.kind {
            Kind::Title | Kind::Text => {
                let parts: Vec<Value> = text_parts(text)
                    .into_iter()
                    .map(|part| json!({"type": "text", "text": {"content": part}}))
                    .collect();
                json!({ self.kind.key(): parts })
            }
            // Commas are not valid in a select option's name.
            Kind::Select => {
                json!({"select": {"name": fit(&text.replace(',', " "), TEXT_MAX_UNITS)}})
            }
            Kind::Status => json!({"status": {"name": fit(text, TEXT_MAX_UNITS)}}),
        }
    }

    /// The property's text on a page object (a title's or rich text's plain text, an
    /// option's name), trimmed; `None` when empty or absent.
    pub(crate) fn read(&self, page: &Value) -> Option<String> {
        let value = page.get("properties")?.get(&self.name)?;
        let text = match self.kind {
            Kind::Title | Kind::Text => value
                .get(self.kind.key())?
                .as_array()?
                .iter()
                .filter_map(|part| {
                    part.get("plain_text")
                        .or_else(|| part.get("text")?.get("content"))
                        .and_then(Value::as_str)
                })
                .collect::<String>(),
            Kind::Select | Kind::Status => value
                .get(self.kind.key())?
                .get("name")?
                .as_str()?
                .to_owned(),
        };
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_owned())
    }

    /// A query filter on this property (`{"property": …, "<type>": {condition}}`).
    pub(crate) fn filter(&self, condition: Value) -> Value {
        json!({"property": self.name, self.kind.key(): condition})
    }
}

/// The board as read at start.
#[derive(Clone, Debug)]
pub struct Board {
    pub(crate) data_source: String,
    pub(crate) title: Property,
    pub(crate) task_id: Property,
    pub(crate) channel: Option<Property>,
    pub(crate) status: Option<Property>,
    pub(crate) direction: Option<Property>,
    pub(crate) reason: Option<Property>,
    pub(crate) intake: Option<IntakeOptions>,
}

impl Board {
    /// Resolves the data source and reads its schema (each request waits for `limiter`).
    /// A configured property the board lacks is left out with a warning, except the task
    /// id property (and, with intake, the status property): those are errors naming it.
    pub async fn open(
        client: &NotionClient,
        limiter: &Limiter,
        options: &BoardOptions,
        status_property: &str,
    ) -> Result<Board, BoardError> {
        let id = PageId::parse(&options.data_source)
            .map_err(|_| BoardError::InvalidId(options.data_source.clone()))?;
        let source = resolve(client, limiter, &id).await?;
        let data_source = source
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or(id.as_str())
            .to_owned();
        let schema = Schema::of(&source);
        let missing = |property: &str, expected: &'static str, flag: &'static str| {
            BoardError::MissingProperty {
                data_source: data_source.clone(),
                property: property.to_owned(),
                expected,
                flag,
            }
        };
        let title = match &options.title_property {
            Some(name) => schema.find(name, &[Kind::Title]),
            None => schema.0.iter().find(|p| p.kind == Kind::Title).cloned(),
        }
        .ok_or_else(|| {
            missing(
                options.title_property.as_deref().unwrap_or("(title)"),
                "title",
                "--title-property",
            )
        })?;
        let task_id = schema
            .find(&options.task_id_property, &[Kind::Text])
            .ok_or_else(|| missing(&options.task_id_property, "rich_text", "--task-id-property"))?;
        let status = schema.optional(status_property, &[Kind::Status, Kind::Select]);
        if options.intake.is_some() && status.is_none() {
            return Err(missing(
                status_property,
                "status or select",
                "--status-property",
            ));
        }
        let intake = options.intake.as_ref();
        Ok(Board {
            channel: schema.optional(&options.channel_property, &[Kind::Select, Kind::Text]),
            direction: intake.and_then(|i| schema.optional(&i.direction_property, &[Kind::Text])),
            reason: intake.and_then(|i| schema.optional(&i.reason_property, &[Kind::Text])),
            intake: options.intake.clone(),
            data_source,
            title,
            task_id,
            status,
        })
    }

    /// The data source's id (dashed).
    pub fn data_source(&self) -> &str {
        &self.data_source
    }

    /// `POST /v1/data_sources/{id}/query`.
    pub(crate) async fn query(
        &self,
        client: &NotionClient,
        body: Value,
    ) -> Result<Value, NotionError> {
        client
            .post(
                &format!("/v1/data_sources/{}/query", self.data_source),
                body,
            )
            .await
    }

    /// The cards whose task id property is `task` (at most a few: normally one).
    pub(crate) async fn find_card(
        &self,
        client: &NotionClient,
        task: &str,
    ) -> Result<Option<PageId>, NotionError> {
        let body = json!({
            "filter": self.task_id.filter(json!({"equals": task})),
            "sorts": [{"timestamp": "created_time", "direction": "ascending"}],
            "page_size": 10,
        });
        let answer = self.query(client, body).await?;
        Ok(results(&answer).iter().find_map(page_id_of))
    }

    /// The `PATCH /v1/pages/{id}` body that sets the task's own card to `status` (when the
    /// board has a status property) and its Task ID to `task`.
    pub(crate) fn card_update(&self, task: &str, status: &str) -> Value {
        let mut properties = Map::new();
        if let Some(property) = &self.status {
            properties.insert(property.name.clone(), property.value(status));
        }
        properties.insert(self.task_id.name.clone(), self.task_id.value(task));
        json!({ "properties": properties })
    }

    /// `POST /v1/pages`: a card titled `title` for `task`, with its channel and status
    /// when the board has those properties.
    pub(crate) async fn create_card(
        &self,
        client: &NotionClient,
        task: &str,
        title: &str,
        channel: &str,
        status: &str,
    ) -> Result<PageId, NotionError> {
        let mut properties = Map::new();
        properties.insert(self.title.name.clone(), self.title.value(title));
        properties.insert(self.task_id.name.clone(), self.task_id.value(task));
        for (property, text) in [(&self.channel, channel), (&self.status, status)] {
            if let Some(property) = property {
                properties.insert(property.name.clone(), property.value(text));
            }
        }
        let body = json!({
            "parent": {"type": "data_source_id", "data_source_id": self.data_source},
            "properties": properties,
        });
        let page = client.post("/v1/pages", body).await?;
        page_id_of(&page).ok_or_else(|| NotionError::Unavailable {
            status: 200,
            message: "the created page's answer has no id".into(),
        })
    }
}

/// `text` in pieces of at most [`TEXT_MAX_UNITS`] UTF-16 units (never splitting a
/// character), at most [`TEXT_MAX_PARTS`] of them; a longer text ends with "…".
fn text_parts(text: &str) -> Vec<String> {
    let text = fit(text, TEXT_MAX_UNITS * TEXT_MAX_PARTS);
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut units = 0;
    for c in text.chars() {
        if units + c.len_utf16() > TEXT_MAX_UNITS {
            parts.push(std::mem::take(&mut part));
            units = 0;
        }
        units += c.len_utf16();
        part.push(c);
    }
    if !part.is_empty() || parts.is_empty() {
        parts.push(part);
    }
    parts
}

/// `text` cut to at most `max_units` UTF-16 units, "…" (one unit) included when cut.
fn fit(text: &str, max_units: usize) -> String {
    if text.encode_utf16().count() <= max_units {
        return text.to_owned();
    }
    let mut kept = String::new();
    let mut units = 0;
    for c in text.chars() {
        if units + c.len_utf16() > max_units - 1 {
            break;
        }
        units += c.len_utf16();
        kept.push(c);
    }
    kept.push('…');
    kept
}

/// The `results` of a list answer.
pub(crate) fn results(answer: &Value) -> &[Value] {
    answer
        .get("results")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A page object's id.
pub(crate) fn page_id_of(page: &Value) -> Option<PageId> {
    PageId::parse(page.get("id")?.as_str()?).ok()
}

/// The data source object for `id`: a database resolves to its one data source.
async fn resolve(
    client: &NotionClient,
    limiter: &Limiter,
    id: &PageId,
) -> Result<Value, BoardError> {
    limiter.acquire().await;
    let source_id = match client.get(&format!("/v1/databases/{id}")).await {
        Ok(database) => {
            let sources: Vec<&str> = database
                .get("data_sources")
                .and_then(Value::as_array)
                .map(|list| list.iter().filter_map(|s| s.get("id")?.as_str()).collect())
                .unwrap_or_default();
            match sources.as_slice() {
                [one] => (*one).to_owned(),
                _ => {
                    return Err(BoardError::SeveralDataSources {
                        database: id.to_string(),
                        count: sources.len(),
                        ids: sources.join(", "),
                    });
                }
            }
        }
        // Not a database: a data source's id.
        Err(NotionError::Rejected { status: 404, .. }) => id.to_string(),
        Err(other) => return Err(other.into()),
    };
    limiter.acquire().await;
    Ok(client.get(&format!("/v1/data_sources/{source_id}")).await?)
}

/// A data source's properties the projector can use.
struct Schema(Vec<Property>);

impl Schema {
    fn of(source: &Value) -> Schema {
        let properties = source
            .get("properties")
            .and_then(Value::as_object)
            .map(|map| {
                map.iter()
                    .filter_map(|(name, p)| {
                        let kind = Kind::of(p.get("type")?.as_str()?)?;
                        Some(Property {
                            name: name.clone(),
                            kind,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Schema(properties)
    }

    fn find(&self, name: &str, kinds: &[Kind]) -> Option<Property> {
        self.0
            .iter()
            .find(|p| p.name == name && kinds.contains(&p.kind))
            .cloned()
    }

    /// The property, or `None` with a warning that it is left out.
    fn optional(&self, name: &str, kinds: &[Kind]) -> Option<Property> {
        let found = self.find(name, kinds);
        if found.is_none() {
            let expected: Vec<&str> = kinds.iter().map(|k| k.key()).collect();
            tracing::warn!(property = name, expected = ?expected, "the board has no such property: left out");
        }
        found
    }
}

/// The status property's kind as the projector's status PATCH names it.
pub(crate) fn property_type(property: &Property) -> PropertyType {
    match property.kind {
        Kind::Select => PropertyType::Select,
        _ => PropertyType::Status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_page_objects() {
        for kind in [Kind::Title, Kind::Text, Kind::Select, Kind::Status] {
            let property = Property {
                name: "P".into(),
                kind,
            };
            let page = json!({"properties": {"P": property.value("  Ocean life ")}});
            assert_eq!(
                property.read(&page).as_deref(),
                Some("Ocean life"),
                "{kind:?}"
            );
        }
        let text = Property {
            name: "P".into(),
            kind: Kind::Text,
        };
        assert_eq!(
            text.read(&json!({"properties": {"P": {"rich_text": []}}})),
            None
        );
        assert_eq!(text.read(&json!({"properties": {}})), None);
    }

    #[test]
    fn long_texts_fit_notion_limits() {
        let units = |s: &str| s.encode_utf16().count();
        // 2,001 characters: two parts, nothing lost; an emoji is two UTF-16 units.
        let text = format!("{}🐋", "a".repeat(1999));
        let parts = text_parts(&text);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| units(p) <= TEXT_MAX_UNITS));
        assert_eq!(parts.concat(), text);
        assert_eq!(text_parts(""), vec![String::new()]);
        let huge = "b".repeat(TEXT_MAX_UNITS * TEXT_MAX_PARTS + 10);
        let parts = text_parts(&huge);
        assert_eq!(parts.len(), TEXT_MAX_PARTS);
        assert!(parts.last().is_some_and(|p| p.ends_with('…')));
        assert!(parts.iter().all(|p| units(p) <= TEXT_MAX_UNITS));
        let name = fit(&"c".repeat(2500), TEXT_MAX_UNITS);
        assert_eq!(units(&name), TEXT_MAX_UNITS);
        assert!(name.ends_with('…'));
        assert_eq!(fit("short", TEXT_MAX_UNITS), "short");
    }
}
