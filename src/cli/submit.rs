//! `reel submit`: a new task of one of the binary's workflows.

use clap::Args;
use engine::{ChannelId, NewTask};
use serde_json::{Value, json};
use steps::Fault;

use super::{UsageError, WorkerSettings, Workflows};

const IDEMPOTENCY_KEY_MAX_CHARS: usize = NewTask::IDEMPOTENCY_KEY_MAX_CHARS;

#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// The channel (a-z, 0-9, '_' or '-').
    #[arg(long)]
    channel: String,
    /// The task's workflow, one of this binary's (default: its only one; required when it
    /// has several).
    #[arg(long)]
    workflow: Option<String>,
    /// The task's input as a JSON object (in the video pipeline, --topic,
    /// --story-direction and --fail set the fields of the same names in it).
    #[arg(long, value_parser = parse_object)]
    input: Option<Value>,
    /// The video's topic (the input's `topic`).
    #[arg(long)]
    topic: Option<String>,
    /// The input's `story_direction`.
    #[arg(long)]
    story_direction: Option<String>,
    /// The task's Notion page, as an id (dashes optional) or a page URL; stored as the
    /// dashed lower-case id that notion-projector mirrors the status to.
    #[arg(long, value_parser = parse_page)]
    notion_page: Option<notion_projector::PageId>,
    /// Inject a failure: STEP:ITEM (transient, first attempt only) or STEP:ITEM:permanent
    /// (the input's `faults`).
    #[arg(long = "fail", value_name = "STEP:ITEM[:permanent]")]
    faults: Vec<Fault>,
    /// A repeated submit with the same key returns the same task (at most 200 characters).
    #[arg(long)]
    idempotency_key: Option<String>,
}

pub(crate) async fn submit(
    url: &str,
    args: SubmitArgs,
    workflows: &dyn Workflows,
) -> anyhow::Result<()> {
    let channel = ChannelId::parse(&args.channel)?;
    if let Some(key) = &args.idempotency_key
        && (key.is_empty() || key.chars().count() > IDEMPOTENCY_KEY_MAX_CHARS)
    {
        return Err(UsageError(format!(
            "--idempotency-key must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} characters"
        ))
        .into());
    }
    let registry = workflows.registry(&WorkerSettings::default());
    let names = registry.names();
    let workflow = match (args.workflow.clone(), names.as_slice()) {
        (Some(name), _) => name,
        (None, [only]) => only.clone(),
        (None, _) => {
            return Err(UsageError(format!(
                "this binary has several workflows: choose one with --workflow ({})",
                names.join(", ")
            ))
            .into());
        }
    };
    // A name no workflow here has would queue a task no worker of this binary runs.
    if !names.contains(&workflow) {
        return Err(UsageError(format!(
            "no workflow {:?} in this binary: its workflows are {}",
            engine::truncate_for_display(&workflow, 60),
            if names.is_empty() {
                "(none)".to_owned()
            } else {
                names.join(", ")
            }
        ))
        .into());
    }
    let input = if workflows.video_flags() {
        video_input(&args)
    } else {
        args.input.clone().unwrap_or_else(|| json!({}))
    };
    // New tasks are for the newest version this binary has.
    let newest = registry.get(&workflow);
    if let Some(known) = &newest {
        known.check_input(&input).map_err(|reason| {
            UsageError(format!("invalid input for workflow {workflow:?}: {reason}"))
        })?;
    }
    let store = engine::db::connect_store(url, 2).await?;
    let mut task = NewTask::new(workflow, channel, input);
    task.workflow_version = newest.map(|w| w.version_number());
    task.notion_page_id = args.notion_page.map(|page| page.to_string());
    task.idempotency_key = args.idempotency_key;
    task.trace = trace_from_env();
    println!("{}", store.create_task(task).await?.task_id());
    Ok(())
}

/// `--input` with the video pipeline's convenience flags' fields set in it.
fn video_input(args: &SubmitArgs) -> Value {
    let mut input = args.input.clone().unwrap_or_else(|| json!({}));
    if let Some(topic) = &args.topic {
        input["topic"] = json!(topic);
    }
    if let Some(direction) = &args.story_direction {
        input["story_direction"] = json!(direction);
    }
    if !args.faults.is_empty() || args.input.is_none() {
        input["faults"] = json!(args.faults);
    }
    input
}

fn parse_object(raw: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(raw) {
        Ok(value) if engine::too_deep(&value) => Err(format!(
            "the input nests deeper than {} levels",
            engine::JSON_DEPTH_MAX
        )),
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err("the input must be a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

fn parse_page(raw: &str) -> Result<notion_projector::PageId, String> {
    notion_projector::PageId::parse(raw).map_err(|e| e.to_string())
}

/// `TRACEPARENT` (and `TRACESTATE`), the W3C trace context a CI job or a script passes on
/// by environment: the submit's span, and so the task's trace, joins it. An invalid one is
/// ignored with a warning, as the W3C recommendation asks (the task gets a trace of its
/// own): a stray variable never stops a submit.
fn trace_from_env() -> Option<engine::telemetry::TraceContext> {
    let parent = std::env::var("TRACEPARENT")
        .ok()
        .filter(|v| !v.trim().is_empty())?;
    let state = std::env::var("TRACESTATE").ok();
    match engine::telemetry::TraceContext::parse(&parent, state.as_deref()) {
        Ok(trace) => Some(trace),
        Err(err) => {
            tracing::warn!(error = %err, "TRACEPARENT ignored: the task starts a trace of its own");
            None
        }
    }
}
