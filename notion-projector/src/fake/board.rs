//! The fake's boards: data sources with a schema, their cards, and the endpoints that
//! read and create them, in Notion's documented shapes (reference §7).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::{
    Answer, BOARD_STATUS_OPTIONS, FakeNotion, FakePage, FakeState, Route, Shared, error, handle,
    normalise,
};
use crate::notion::PropertyType;

/// The ids of a board added with [`FakeNotion::add_board`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeBoard {
    pub database_id: String,
    pub data_source_id: String,
}

/// A data source's properties: name and Notion type (`title`, `rich_text`, `select`,
/// `status`, …), in order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Schema(Vec<(String, String)>);

impl Schema {
    fn kind(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k.as_str())
    }

    fn status_property(&self) -> Option<(&str, PropertyType)> {
        self.0.iter().find_map(|(name, kind)| match kind.as_str() {
            "status" => Some((name.as_str(), PropertyType::Status)),
            _ => None,
        })
    }
}

#[derive(Debug, Default)]
pub(crate) struct Boards {
    /// Data source id → (its database id, its schema).
    sources: HashMap<String, (String, Schema)>,
    /// Database id → its data source id.
    databases: HashMap<String, String>,
    /// Creation order of cards.
    created: u64,
}

impl Boards {
    pub(crate) fn schema(&self, data_source: &str) -> Option<&Schema> {
        self.sources.get(data_source).map(|(_, schema)| schema)
    }
}

/// What a card holds beside its status.
#[derive(Debug)]
pub(crate) struct Card {
    pub(crate) data_source: String,
    /// Property name → its value in the response shape.
    props: Map<String, Value>,
    created: u64,
    /// When it was created (queries lag behind it) and last edited.
    created_at: Instant,
    edited_at: Instant,
}

impl FakeNotion {
    /// Adds a board: a database with one data source of these properties (name, Notion
    /// type). Its ids are fresh.
    pub fn add_board(&self, properties: &[(&str, &str)]) -> FakeBoard {
        let board = FakeBoard {
            database_id: uuid::Uuid::new_v4().to_string(),
            data_source_id: uuid::Uuid::new_v4().to_string(),
        };
        let schema = Schema(
            properties
                .iter()
                .map(|(n, k)| ((*n).to_owned(), (*k).to_owned()))
                .collect(),
        );
        let mut state = self.lock();
        state.boards.sources.insert(
            board.data_source_id.clone(),
            (board.database_id.clone(), schema),
        );
        state
            .boards
            .databases
            .insert(board.database_id.clone(), board.data_source_id.clone());
        board
    }

    /// Puts a card on the board as a person would (no request, no rate limit):
    /// `properties` as `POST /v1/pages` takes them. Its page id.
    pub fn add_card(&self, board: &FakeBoard, properties: Value) -> Result<String, String> {
        let mut state = self.lock();
        let body =
            json!({"parent": {"data_source_id": board.data_source_id}, "properties": properties});
        match create(&mut state, &body) {
            Answer::Page(page) => Ok(page["id"].as_str().unwrap_or_default().to_owned()),
            Answer::Error { message, .. } => Err(message),
            Answer::Html(status) => Err(format!("HTTP {status}")),
            Answer::Echo { .. } => Err("HTTP 400".into()),
        }
    }

    /// Edits a card as a person would: `properties` as `PATCH /v1/pages/{id}` takes them.
    pub fn edit_card(&self, page: &str, properties: Value) -> Result<(), String> {
        let key = normalise(page).ok_or("not a page id")?;
        let mut state = self.lock();
        let state = &mut *state;
        let page = state.pages.get_mut(&key).ok_or("no such page")?;
        let data_source = page.card.as_ref().map(|c| c.data_source.clone());
        let schema = data_source
            .and_then(|ds| state.boards.schema(&ds))
            .ok_or("not a card")?;
        let properties = properties.as_object().ok_or("not an object")?;
        apply_card(page, properties, schema)
    }

    /// The board's cards (page objects), oldest first.
    pub fn cards(&self, board: &FakeBoard) -> Vec<Value> {
        let state = self.lock();
        let mut cards: Vec<(u64, Value)> = state
            .pages
            .iter()
            .filter_map(|(id, page)| {
                let card = page.card.as_ref()?;
                (card.data_source == board.data_source_id)
                    .then(|| (card.created, card_object(id, card, state.started)))
            })
            .collect();
        cards.sort_by_key(|(created, _)| *created);
        cards.into_iter().map(|(_, card)| card).collect()
    }

    /// A card property's text (a title's or text's plain text, an option's name).
    pub fn card_text(card: &Value, property: &str) -> Option<String> {
        text_of(card.get("properties")?.get(property)?)
    }

    /// How many requests had this method and a path starting with `prefix`.
    pub fn count_requests(&self, method: &str, prefix: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(prefix))
            .count()
    }
}

pub(crate) async fn create_page(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = "/v1/pages".to_owned();
    handle(
        state,
        "POST",
        path,
        String::new(),
        headers,
        Some(body),
        Route::CreatePage,
    )
    .await
}

pub(crate) async fn get_database(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/v1/databases/{id}");
    handle(state, "GET", path, id, headers, None, Route::Database).await
}

pub(crate) async fn get_data_source(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/v1/data_sources/{id}");
    handle(state, "GET", path, id, headers, None, Route::DataSource).await
}

pub(crate) async fn query(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v1/data_sources/{id}/query");
    handle(state, "POST", path, id, headers, Some(body), Route::Query).await
}

/// The answer to a board route, past the checks every request gets.
pub(crate) fn answer(s: &mut FakeState, route: Route, id: &str, body: Option<&Value>) -> Answer {
    let not_found = |what: &str, id: &str| {
        error(
            404,
            "object_not_found",
            format!(
                "Could not find {what} with ID: {id}. Make sure the relevant pages and databases are shared with your integration."
            ),
        )
    };
    let Some(body) =
        body.or(matches!(route, Route::Database | Route::DataSource).then_some(&Value::Null))
    else {
        return error(400, "invalid_json", "Error parsing JSON body.");
    };
    let key = normalise(id);
    match route {
        Route::CreatePage => create(s, body),
        Route::Database => match key.as_ref().and_then(|k| s.boards.databases.get(k)) {
            Some(source) => json_page(json!({
                "object": "database",
                "id": key,
                "data_sources": [{"id": source, "name": "Board"}],
            })),
            None => not_found("database", id),
        },
        Route::DataSource => match key
            .as_ref()
            .and_then(|k| s.boards.sources.get(k).map(|v| (k, v)))
        {
            Some((key, (database, schema))) => json_page(data_source_object(key, database, schema)),
            None => not_found("data_source", id),
        },
        Route::Query => match key.filter(|k| s.boards.sources.contains_key(k)) {
            Some(key) => run_query(s, &key, body),
            None => not_found("data_source", id),
        },
        Route::Page => error(400, "invalid_request_url", "Invalid request URL."),
    }
}

fn json_page(value: Value) -> Answer {
    Answer::Page(value)
}

fn data_source_object(id: &str, database: &str, schema: &Schema) -> Value {
    let properties: Map<String, Value> = schema
        .0
        .iter()
        .map(|(name, kind)| {
            let config = match kind.as_str() {
                "status" => json!({"options": BOARD_STATUS_OPTIONS.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()}),
                _ => json!({}),
            };
            (
                name.clone(),
                json!({"id": format!("p{}", name.len()), "name": name, "type": kind, kind.as_str(): config}),
            )
        })
        .collect();
    json!({
        "object": "data_source",
        "id": id,
        "parent": {"type": "database_id", "database_id": database},
        "properties": properties,
    })
}

/// `POST /v1/pages` with a data source parent.
fn create(s: &mut FakeState, body: &Value) -> Answer {
    let Some(parent) = body
        .get("parent")
        .and_then(|p| p.get("data_source_id"))
        .and_then(Value::as_str)
    else {
        return error(
            400,
            "validation_error",
            "body failed validation: body.parent.data_source_id should be defined.",
        );
    };
    let Some(data_source) = normalise(parent).filter(|k| s.boards.sources.contains_key(k)) else {
        return error(
            404,
            "object_not_found",
            format!("Could not find data_source with ID: {parent}."),
        );
    };
    let empty = Map::new();
    let properties = body
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    s.boards.created += 1;
    let created = s.boards.created;
    let Some(schema) = s.boards.schema(&data_source) else {
        return error(404, "object_not_found", "no such data source");
    };
    let (property, kind) = schema
        .status_property()
        .map_or((String::new(), PropertyType::Status), |(n, k)| {
            (n.to_owned(), k)
        });
    let mut page = FakePage {
        property,
        kind,
        value: None,
        history: Vec::new(),
        card: Some(Card {
            data_source,
            props: Map::new(),
            created,
            created_at: Instant::now(),
            edited_at: Instant::now(),
        }),
    };
    if let Err(message) = apply_card(&mut page, properties, schema) {
        return error(400, "validation_error", message);
    }
    let id = uuid::Uuid::new_v4().to_string();
    let object = match &page.card {
        Some(card) => card_object(&id, card, s.started),
        None => Value::Null,
    };
    s.pages.insert(id, page);
    Answer::Page(object)
}

/// Sets a card's properties, or says why Notion would refuse them (nothing is set then).
pub(crate) fn apply_card(
    page: &mut FakePage,
    properties: &Map<String, Value>,
    schema: &Schema,
) -> Result<(), String> {
    let mut values = Vec::new();
    for (name, value) in properties {
        let Some(kind) = schema.kind(name) else {
            return Err(format!("{name} is not a property that exists."));
        };
        let Some(given) = value.get(kind) else {
            return Err(format!("{name} is expected to be {kind}."));
        };
        values.push((name.clone(), kind, stored_value(name, kind, given)?));
    }
    let Some(card) = page.card.as_mut() else {
        return Err("not a card".into());
    };
    card.edited_at = Instant::now();
    for (name, kind, stored) in values {
        if name == page.property {
            let option = stored
                .get(kind)
                .and_then(|o| o.get("name"))
                .and_then(Value::as_str);
            page.value = option.map(str::to_owned);
            page.history.extend(option.map(str::to_owned));
        }
        card.props.insert(name, stored);
    }
    Ok(())
}

/// A property value as a page object shows it, from the value a request gave.
fn stored_value(name: &str, kind: &str, given: &Value) -> Result<Value, String> {
    match kind {
        "title" | "rich_text" => {
            let Some(parts) = given.as_array() else {
                return Err(format!(
                    "body failed validation: body.properties.{name}.{kind} should be an array."
                ));
            };
            let mut texts = Vec::new();
            for part in parts {
                let Some(content) = part
                    .get("text")
                    .and_then(|t| t.get("content"))
                    .and_then(Value::as_str)
                else {
                    return Err(format!(
                        "body failed validation: body.properties.{name}.{kind}[0].text.content should be defined."
                    ));
                };
                if content.chars().count() > 2000 {
                    return Err(format!(
                        "body failed validation: body.properties.{name}.{kind}[0].text.content.length should be ≤ `2000`."
                    ));
                }
                texts.push(json!({"type": "text", "text": {"content": content, "link": null}, "plain_text": content, "href": null}));
            }
            Ok(json!({"id": format!("p{}", name.len()), "type": kind, kind: texts}))
        }
        "select" | "status" => {
            let option = match given {
                Value::Null => Value::Null,
                option => {
                    let Some(option_name) = option.get("name").and_then(Value::as_str) else {
                        return Err(format!(
                            "body failed validation: body.properties.{name}.{kind}.name should be defined."
                        ));
                    };
                    if option_name.is_empty() || (kind == "select" && option_name.contains(',')) {
                        return Err(format!("Invalid select option name: {option_name}"));
                    }
                    if kind == "status" && !BOARD_STATUS_OPTIONS.contains(&option_name) {
                        return Err(format!(
                            "Invalid status option. Status option \"{option_name}\" does not exist."
                        ));
                    }
                    json!({"id": format!("opt-{}", option_name.len()), "name": option_name, "color": "default"})
                }
            };
            Ok(json!({"id": format!("p{}", name.len()), "type": kind, kind: option}))
        }
        other => Err(format!("the fake does not set {other} properties")),
    }
}

/// A card as a page object. Its `last_edited_time` is rounded down to the minute, as
/// Notion's is, on a clock that starts at 2026-01-01T00:00Z when the fake starts: edits
/// within one minute show the same time.
pub(crate) fn card_object(id: &str, card: &Card, started: Instant) -> Value {
    let minutes = card.edited_at.saturating_duration_since(started).as_secs() / 60;
    json!({
        "object": "page",
        "id": id,
        "parent": {"type": "data_source_id", "data_source_id": card.data_source},
        "in_trash": false,
        "last_edited_time": format!("2026-01-01T{:02}:{:02}:00.000Z", (minutes / 60) % 24, minutes % 60),
        "properties": card.props,
    })
}

/// A property value's text (plain text of rich text or title, an option's name).
fn text_of(value: &Value) -> Option<String> {
    let kind = value.get("type")?.as_str()?;
    let inner = value.get(kind)?;
    let text = match inner {
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("plain_text").and_then(Value::as_str))
            .collect(),
        Value::Object(option) => option.get("name")?.as_str()?.to_owned(),
        _ => return None,
    };
    Some(text)
}

/// `POST /v1/data_sources/{id}/query`: the filter, `page_size` ≤ 100, `start_cursor`.
fn run_query(s: &FakeState, data_source: &str, body: &Value) -> Answer {
    let Some(schema) = s.boards.schema(data_source) else {
        return error(404, "object_not_found", "no such data source");
    };
    let page_size = body.get("page_size").and_then(Value::as_u64).unwrap_or(100);
    if !(1..=100).contains(&page_size) {
        return error(
            400,
            "validation_error",
            "body failed validation: body.page_size should be ≤ `100`.",
        );
    }
    let mut cards: Vec<(u64, Value)> = s
        .pages
        .iter()
        .filter_map(|(id, page)| {
            let card = page.card.as_ref()?;
            let visible = card.created_at.elapsed() >= s.query_lag;
            (card.data_source == data_source && visible)
                .then(|| (card.created, card_object(id, card, s.started)))
        })
        .collect();
    cards.sort_by_key(|(created, _)| *created);
    let mut matching = Vec::new();
    for (_, card) in cards {
        match body.get("filter") {
            None => matching.push(card),
            Some(filter) => match matches(filter, schema, &card) {
                Ok(true) => matching.push(card),
                Ok(false) => {}
                Err(message) => return error(400, "validation_error", message),
            },
        }
    }
    let start = match body.get("start_cursor").and_then(Value::as_str) {
        Some(cursor) => matching
            .iter()
            .position(|c| c["id"] == cursor)
            .unwrap_or(matching.len()),
        None => 0,
    };
    let size = usize::try_from(page_size).unwrap_or(100);
    let rest = matching.split_off(start.min(matching.len()));
    let next = rest.get(size).map(|c| c["id"].clone());
    let results: Vec<Value> = rest.into_iter().take(size).collect();
    Answer::Page(json!({
        "object": "list",
        "results": results,
        "next_cursor": next.clone().unwrap_or(Value::Null),
        "has_more": next.is_some(),
        "type": "page_or_data_source",
    }))
}

/// Whether a card passes a filter (`and`, `or`, or one property condition).
fn matches(filter: &Value, schema: &Schema, card: &Value) -> Result<bool, String> {
    for (compound, all) in [("and", true), ("or", false)] {
        if let Some(parts) = filter.get(compound) {
            let parts = parts
                .as_array()
                .ok_or("body failed validation: a compound filter is an array.")?;
            let mut results = Vec::new();
            for part in parts {
                results.push(matches(part, schema, card)?);
            }
            return Ok(if all {
                results.iter().all(|r| *r)
            } else {
                results.iter().any(|r| *r)
            });
        }
    }
    let name = filter
        .get("property")
        .and_then(Value::as_str)
        .ok_or("body failed validation: body.filter.property should be defined.")?;
    let kind = schema
        .kind(name)
        .ok_or_else(|| format!("Could not find property with name or id: {name}"))?;
    // A title takes a rich_text condition too.
    let condition = filter
        .get(kind)
        .or_else(|| (kind == "title").then(|| filter.get("rich_text")).flatten())
        .ok_or_else(|| format!("body failed validation: body.filter.{kind} should be defined."))?;
    let text = card
        .get("properties")
        .and_then(|p| p.get(name))
        .and_then(text_of)
        .unwrap_or_default();
    let (op, operand) = condition
        .as_object()
        .and_then(|o| o.iter().next())
        .ok_or("body failed validation: a filter condition is an object with one key.")?;
    let operand_text = operand.as_str().unwrap_or_default();
    match op.as_str() {
        "equals" => Ok(text == operand_text),
        "does_not_equal" => Ok(text != operand_text),
        "contains" => Ok(text.contains(operand_text)),
        "is_empty" => Ok(text.is_empty()),
        "is_not_empty" => Ok(!text.is_empty()),
        other => Err(format!("the fake does not filter with {other}")),
    }
}
