//! Item results: what a step's item returns, and how later steps read earlier results.
//!
//! The log is the only place results live: an item's output is recorded in its
//! `item_completed` event, and a later step reads it back from the folded state, so a
//! resumed task sees exactly what an uninterrupted one would.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::state::{ItemRecord, TaskState};
use crate::workflow::StepError;

/// What running one item produced: an output (a value of type `T`, which the log stores
/// as JSON), and where there is one, an artifact (a path or URL) and what the provider
/// charged. A typed step (`Step::call`, `Step::fan_out` returning `Output<T>`) gives later
/// steps a [`StepRef<T>`](crate::StepRef) to read it back as `T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output<T = Value> {
    /// Where the result lives (a path or URL; empty when there is none).
    pub artifact: String,
    /// What the provider charged, in micro-dollars.
    pub cost_micros: i64,
    /// The result later steps read ([`StepContext::get`](crate::StepContext::get)).
    pub output: Option<T>,
}

/// An untyped item output: its value is JSON.
pub type ItemOutput = Output<Value>;

impl<T> Default for Output<T> {
    fn default() -> Self {
        Output {
            artifact: String::new(),
            cost_micros: 0,
            output: None,
        }
    }
}

impl<T> Output<T> {
    /// An output that is `value` (no artifact, no cost).
    pub fn of(value: T) -> Self {
        Output {
            artifact: String::new(),
            cost_micros: 0,
            output: Some(value),
        }
    }

    /// The same output with `artifact`.
    pub fn with_artifact(mut self, artifact: impl Into<String>) -> Self {
        self.artifact = artifact.into();
        self
    }

    /// The same output with its cost, in micro-dollars.
    pub fn with_cost_micros(mut self, cost_micros: i64) -> Self {
        self.cost_micros = cost_micros;
        self
    }
}

impl<T: Serialize + 'static> Output<T> {
    /// The output as the log stores it: its value as JSON (a value that cannot be
    /// serialized is a permanent error).
    pub fn into_item(self) -> Result<ItemOutput, StepError> {
        let Output {
            artifact,
            cost_micros,
            output,
        } = self;
        let output = match output {
            None => None,
            Some(value) => {
                // An untyped output is JSON already: no copy.
                let any: Box<dyn std::any::Any> = Box::new(value);
                match any.downcast::<Value>() {
                    Ok(json) => Some(*json),
                    Err(any) => {
                        let value = any
                            .downcast::<T>()
                            .map_err(|_| StepError::permanent("an output changed type"))?;
                        Some(serde_json::to_value(*value).map_err(|e| {
                            StepError::permanent(format!("the output does not serialize: {e}"))
                        })?)
                    }
                }
            }
        };
        Ok(ItemOutput {
            artifact,
            cost_micros,
            output,
        })
    }
}

impl ItemOutput {
    /// Why the log cannot store this output, if it cannot: PostgreSQL's `jsonb` and `text`
    /// refuse the NUL character, and such an output would fail every append it is in.
    pub fn unstorable(&self) -> Option<String> {
        if self.artifact.contains('\0') {
            return Some(
                "the item's artifact contains a NUL character, which the log cannot store".into(),
            );
        }
        if self.output.as_ref().is_some_and(holds_nul) {
            return Some(
                "the item's output contains a NUL character, which the log cannot store".into(),
            );
        }
        if self.output.as_ref().is_some_and(too_deep) {
            return Some(format!(
                "the item's output nests deeper than {JSON_DEPTH_MAX} levels, which the log could not read back"
            ));
        }
        None
    }

    /// An output with its artifact and cost (and no value).
    pub fn new(artifact: impl Into<String>, cost_micros: i64) -> Self {
        ItemOutput {
            artifact: artifact.into(),
            cost_micros,
            output: None,
        }
    }

    /// An output that is `value` (no artifact, no cost). A value that cannot be serialized
    /// is a permanent error.
    pub fn value(value: impl Serialize) -> Result<Self, StepError> {
        ItemOutput::default().with_output(value)
    }

    /// The same output carrying `value`.
    pub fn with_output(mut self, value: impl Serialize) -> Result<Self, StepError> {
        let value = serde_json::to_value(value)
            .map_err(|e| StepError::permanent(format!("the output does not serialize: {e}")))?;
        self.output = Some(value);
        Ok(self)
    }
}

/// The completed items of a task's steps (their current runs), as the log records them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outputs {
    steps: BTreeMap<String, BTreeMap<u32, ItemRecord>>,
}

impl Outputs {
    /// The completions of `state`'s steps in their current runs (a rejected review's
    /// superseded results are not among them).
    pub fn from_state(state: &TaskState) -> Self {
        let steps = state
            .steps
            .iter()
            .filter(|step| !step.items.is_empty())
            .map(|step| (step.name.clone(), step.items.clone()))
            .collect();
        Outputs { steps }
    }

    /// The same outputs without `step`'s (what that step's items may read: only earlier
    /// steps', so an item sees the same whether or not its step was resumed).
    pub(crate) fn before_step(&self, step: &str) -> Self {
        let mut earlier = self.clone();
        earlier.steps.remove(step);
        earlier
    }

    /// Records a completion.
    pub(crate) fn insert(&mut self, step: &str, record: ItemRecord) {
        self.steps
            .entry(step.to_owned())
            .or_default()
            .insert(record.item, record);
    }

    /// The completion of `item` of `step`.
    pub fn record(&self, step: &str, item: u32) -> Option<&ItemRecord> {
        self.steps.get(step).and_then(|items| items.get(&item))
    }

    /// The completions of `step`, in item order.
    pub fn records(&self, step: &str) -> impl Iterator<Item = &ItemRecord> {
        self.steps
            .get(step)
            .into_iter()
            .flat_map(|items| items.values())
    }

    /// The output of `item` of `step`, as `T`. A missing completion or output, or one that
    /// does not parse as `T`, is a permanent error: the workflow reads what it never wrote.
    pub fn output<T: DeserializeOwned>(&self, step: &str, item: u32) -> Result<T, StepError> {
        let record = self
            .record(step, item)
            .ok_or_else(|| StepError::permanent(format!("{step} item {item} is not completed")))?;
        parse_output(step, record)
    }

    /// Every completed output of `step`, in item order, as `T`.
    pub fn outputs<T: DeserializeOwned>(&self, step: &str) -> Result<Vec<T>, StepError> {
        self.records(step)
            .map(|record| parse_output(step, record))
            .collect()
    }

    /// The output of the one-item step `step` (its item 1), as the step's type.
    pub fn get<T: DeserializeOwned>(&self, step: &crate::StepRef<T>) -> Result<T, StepError> {
        self.output(step.name(), 1)
    }

    /// Every completed output of `step`, in item order, as the step's type.
    pub fn get_all<T: DeserializeOwned>(
        &self,
        step: &crate::StepRef<T>,
    ) -> Result<Vec<T>, StepError> {
        self.outputs(step.name())
    }

    /// The output of `item` of `step`, as the step's type.
    pub fn get_item<T: DeserializeOwned>(
        &self,
        step: &crate::StepRef<T>,
        item: u32,
    ) -> Result<T, StepError> {
        self.output(step.name(), item)
    }

    /// The artifact of `item` of `step`.
    pub fn artifact(&self, step: &str, item: u32) -> Result<&str, StepError> {
        self.record(step, item)
            .map(|record| record.artifact.as_str())
            .ok_or_else(|| StepError::permanent(format!("{step} item {item} is not completed")))
    }
}

fn parse_output<T: DeserializeOwned>(step: &str, record: &ItemRecord) -> Result<T, StepError> {
    let item = record.item;
    let value = record
        .output
        .as_ref()
        .ok_or_else(|| StepError::permanent(format!("{step} item {item} recorded no output")))?;
    T::deserialize(value)
        .map_err(|e| StepError::permanent(format!("{step} item {item}: unexpected output: {e}")))
}

/// How deep JSON a value in the log may nest: an event wraps it in a few levels more, and
/// reading the log back (serde_json, 128 levels) must never fail on what was written.
pub const JSON_DEPTH_MAX: usize = 64;

/// Whether `value` nests deeper than [`JSON_DEPTH_MAX`] (arrays and objects are levels).
pub fn too_deep(value: &Value) -> bool {
    fn depth_over(value: &Value, left: usize) -> bool {
        match value {
            Value::Array(items) => left == 0 || items.iter().any(|v| depth_over(v, left - 1)),
            Value::Object(fields) => left == 0 || fields.values().any(|v| depth_over(v, left - 1)),
            _ => false,
        }
    }
    depth_over(value, JSON_DEPTH_MAX)
}

/// Whether `value` holds a NUL character (in a string or a key), which PostgreSQL's
/// `jsonb` refuses.
pub(crate) fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}
