//! `reel submit`: a new video task.

use clap::Args;
use engine::{ChannelId, EventStore, NewTask, PgStore};
use serde_json::json;
use steps::Fault;

#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// The channel (a-z, 0-9, '_' or '-').
    #[arg(long)]
    channel: String,
    /// The video's topic.
    #[arg(long)]
    topic: String,
    #[arg(long)]
    story_direction: Option<String>,
    /// The task's Notion page, as an id (dashes optional) or a page URL; stored as the
    /// dashed lower-case id that notion-projector mirrors the status to.
    #[arg(long, value_parser = parse_page)]
    notion_page: Option<notion_projector::PageId>,
    /// Inject a failure: STEP:ITEM (transient, first attempt only) or STEP:ITEM:permanent.
    #[arg(long = "fail", value_name = "STEP:ITEM[:permanent]")]
    faults: Vec<Fault>,
    /// A repeated submit with the same key returns the same task.
    #[arg(long)]
    idempotency_key: Option<String>,
}

pub(crate) async fn submit(url: &str, args: SubmitArgs) -> anyhow::Result<()> {
    let channel = ChannelId::parse(&args.channel)?;
    let store = PgStore::new(engine::db::connect(url, 2).await?);
    let mut input = json!({"topic": args.topic, "faults": args.faults});
    if let Some(direction) = args.story_direction {
        input["story_direction"] = json!(direction);
    }
    let mut task = NewTask::new(steps::WORKFLOW, channel, input);
    task.notion_page_id = args.notion_page.map(|page| page.to_string());
    task.idempotency_key = args.idempotency_key;
    println!("{}", store.create_task(task).await?.task_id());
    Ok(())
}

fn parse_page(raw: &str) -> Result<notion_projector::PageId, String> {
    notion_projector::PageId::parse(raw).map_err(|e| e.to_string())
}
