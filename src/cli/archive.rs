//! `reel archive` and `reel restore`: finished tasks' streams out of PostgreSQL into an
//! archive and back (see [`crate::archive`]).

use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;
use engine::{ArchiveFilter, ChannelId, PgStore, RestoreOutcome, TaskId};
use futures_util::StreamExt;
use serde::Serialize;

use super::UsageError;
use crate::archive::{Archive, Archived, restore};

/// Tasks picked per database round trip.
const PAGE: u32 = 200;

/// Tasks archived at once (each is a write, a read back and a transaction).
const IN_FLIGHT: usize = 4;

#[derive(Debug, Args)]
pub(crate) struct ArchiveArgs {
    /// Tasks that finished (completed, failed or cancelled) before this: an age (`0s`,
    /// `90m`, `12h`, `30d`, `2w`) or a date (`2026-12-01`, or RFC 3339).
    #[arg(long, value_name = "AGE|DATE")]
    finished_before: String,
    /// Only this channel's tasks.
    #[arg(long)]
    channel: Option<String>,
    /// Only this workflow's tasks.
    #[arg(long)]
    workflow: Option<String>,
    /// Where to: a directory (a path or file:///dir) or s3://bucket/prefix (credentials,
    /// region and endpoint from the standard AWS_* environment variables).
    #[arg(long, env = "REEL_ARCHIVE_TO", value_name = "URL")]
    to: String,
    /// Archive at most this many tasks (default: all that match).
    #[arg(long)]
    limit: Option<u64>,
    /// One JSON object with the counts.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// The archived tasks to put back.
    #[arg(required = true)]
    tasks: Vec<String>,
}

/// What one `reel archive` run did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub(crate) struct ArchiveRun {
    pub(crate) archived: u64,
    pub(crate) events: u64,
    /// Compressed bytes written.
    pub(crate) bytes: u64,
    /// Tasks that changed since they were picked (a retry won): left in PostgreSQL.
    pub(crate) changed: u64,
    /// Tasks left in PostgreSQL because a follower of the log has not read them yet.
    pub(crate) follower_behind: u64,
    /// The followers that held tasks back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) followers: Vec<String>,
}

/// `AGE` (before now) or `DATE`.
pub(crate) fn cutoff(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, UsageError> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => 0,
    };
    match number.parse::<i64>() {
        Ok(n) if seconds > 0 && !number.is_empty() => n
            .checked_mul(seconds)
            .and_then(chrono::TimeDelta::try_seconds)
            .and_then(|age| now.checked_sub_signed(age))
            .ok_or_else(|| UsageError(format!("{text}: too long ago"))),
        _ => Err(UsageError(format!(
            "{text:?} is neither an age (0s, 90m, 12h, 30d, 2w) nor a date (2026-12-01, RFC 3339)"
        ))),
    }
}

/// Archives every task `filter` picks (at most `limit`) into `archive`: the run's counts.
pub(crate) async fn archive_tasks(
    store: &PgStore,
    archive: &Archive,
    filter: &ArchiveFilter,
    limit: Option<u64>,
) -> anyhow::Result<ArchiveRun> {
    let mut run = ArchiveRun::default();
    let mut after = None;
    let mut taken = 0u64;
    loop {
        let room = limit.map_or(u64::from(PAGE), |l| {
            l.saturating_sub(taken).min(u64::from(PAGE))
        });
        if room == 0 {
            break;
        }
        let page = store
            .archive_candidates(filter, after.as_ref(), u32::try_from(room).unwrap_or(PAGE))
            .await?;
        let Some(last) = page.last().cloned() else {
            break;
        };
        taken += page.len() as u64;
        let mut outcomes = futures_util::stream::iter(page.iter())
            .map(|task| archive.archive_task(store, task))
            .buffer_unordered(IN_FLIGHT);
        while let Some(outcome) = outcomes.next().await {
            match outcome? {
                Archived::Done { events, bytes } => {
                    run.archived += 1;
                    run.events += events;
                    run.bytes += bytes;
                }
                Archived::Changed => run.changed += 1,
                Archived::FollowerBehind { follower } => {
                    run.follower_behind += 1;
                    if !run.followers.contains(&follower) {
                        run.followers.push(follower);
                    }
                }
            }
        }
        after = Some(last);
    }
    Ok(run)
}

pub(crate) async fn archive(url: &str, args: ArchiveArgs) -> anyhow::Result<()> {
    let filter = ArchiveFilter {
        finished_before: cutoff(&args.finished_before, Utc::now())?,
        channel: args.channel.as_deref().map(ChannelId::parse).transpose()?,
        workflow: args.workflow.clone(),
    };
    let archive = Archive::open(&args.to).map_err(|e| UsageError(e.to_string()))?;
    let store = engine::db::connect_store(url, 1 + IN_FLIGHT as u32).await?;
    let run = archive_tasks(&store, &archive, &filter, args.limit).await?;
    if args.json {
        println!("{}", serde_json::to_string(&run)?);
        return Ok(());
    }
    println!(
        "archived {} tasks ({} events, {} bytes) to {}",
        run.archived,
        run.events,
        run.bytes,
        archive.url()
    );
    if run.changed > 0 {
        println!(
            "{} task(s) changed since they were picked: left in PostgreSQL",
            run.changed
        );
    }
    if run.follower_behind > 0 {
        println!(
            "{} task(s) left in PostgreSQL: not yet read by {} (a follower's checkpoint in \
             projector_checkpoints; delete the row of one that is retired)",
            run.follower_behind,
            run.followers.join(", ")
        );
    }
    Ok(())
}

pub(crate) async fn restore_tasks(url: &str, args: RestoreArgs) -> anyhow::Result<()> {
    let tasks = args
        .tasks
        .iter()
        .map(|t| t.parse::<TaskId>())
        .collect::<Result<Vec<_>, _>>()?;
    let store = engine::db::connect_store(url, 2).await?;
    for task in tasks {
        match restore(&store, task).await? {
            RestoreOutcome::Restored { events } => println!("{task}: restored {events} events"),
            RestoreOutcome::NotArchived => {
                if store.tasks_by_id(&[task]).await?.is_empty() {
                    return Err(engine::Error::TaskNotFound(task).into());
                }
                println!("{task}: not archived");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_dates() {
        let now = DateTime::parse_from_rfc3339("2026-12-07T12:00:00Z")
            .expect("now")
            .with_timezone(&Utc);
        let at = |text: &str| cutoff(text, now).map(|t| t.to_rfc3339());
        assert_eq!(at("0s").expect("0s"), now.to_rfc3339());
        assert_eq!(at("90m").expect("90m"), "2026-12-07T10:30:00+00:00");
        assert_eq!(at("2d").expect("2d"), "2026-12-05T12:00:00+00:00");
        assert_eq!(at("1w").expect("1w"), "2026-11-30T12:00:00+00:00");
        assert_eq!(at("2026-12-01").expect("date"), "2026-12-01T00:00:00+00:00");
        assert_eq!(
            at("2026-12-01T08:00:00+02:00").expect("rfc3339"),
            "2026-12-01T06:00:00+00:00"
        );
        for bad in ["", "s", "10", "10y", "-1d", "1.5h", "99999999999999999w"] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }
}
