//! `reel archive` and `reel restore`: finished tasks' streams out of PostgreSQL into an
//! archive and back (see [`crate::archive`]).

use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;
use engine::{ArchiveFilter, ChannelId, PgStore, RestoreOutcome, TaskId};
use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

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

/// The lead the background archivers of a fleet share: one archives at a time.
const ARCHIVER_LEAD: &str = "reel-archiver";

/// `reel worker --retain AGE --archive-to URL`: what the background archiver is told.
#[derive(Clone, Debug)]
pub(crate) struct Retention {
    /// Tasks finished longer ago than this are archived (an age, as `--finished-before`).
    pub(crate) age: String,
    pub(crate) archive: Archive,
    /// Tasks archived per second at most: deletes stay small and spread out.
    pub(crate) rate: f64,
    /// How long between looks for finished tasks.
    pub(crate) every: std::time::Duration,
}

impl Retention {
    /// Checks `age` now, so that a typo stops the worker at start.
    pub(crate) fn new(
        age: &str,
        to: &str,
        rate: f64,
        every: std::time::Duration,
    ) -> Result<Retention, UsageError> {
        if DateTime::parse_from_rfc3339(age.trim()).is_ok()
            || NaiveDate::parse_from_str(age.trim(), "%Y-%m-%d").is_ok()
        {
            return Err(UsageError(format!(
                "--retain {age}: an age (30d, 12h), not a date"
            )));
        }
        cutoff(age, Utc::now())?;
        if !(rate.is_finite() && rate > 0.0) {
            return Err(UsageError("--archive-rate must be above 0".into()));
        }
        Ok(Retention {
            age: age.to_owned(),
            archive: Archive::open(to).map_err(|e| UsageError(e.to_string()))?,
            rate,
            every,
        })
    }

    /// Archives in the background until `stop`, while this process holds the fleet's
    /// archiver lead (taken when free, renewed at each look, lost when this process dies).
    pub(crate) async fn run(self, store: PgStore, holder: String, stop: CancellationToken) {
        let ttl = (self.every * 3).max(std::time::Duration::from_secs(10));
        let pace = std::time::Duration::from_secs_f64(1.0 / self.rate);
        // A batch ends well inside the lead's life: the next look renews it.
        let batch = ((ttl.as_secs_f64() / 2.0) * self.rate).clamp(1.0, 1000.0) as u32;
        let mut leading = false;
        loop {
            match store.take_lead(ARCHIVER_LEAD, &holder, ttl).await {
                Ok(lead) => {
                    if lead != leading {
                        tracing::info!(worker = %holder, leading = lead, "background archiver lead");
                    }
                    leading = lead;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "background archiver: cannot take its lead");
                    leading = false;
                }
            }
            if leading {
                match self.batch(&store, batch, pace, &stop).await {
                    Ok(run) if run.archived > 0 || run.follower_behind > 0 => {
                        tracing::info!(
                            archived = run.archived,
                            events = run.events,
                            follower_behind = run.follower_behind,
                            followers = ?run.followers,
                            "background archiver"
                        );
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, "background archiver failed; it tries again")
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.every) => {}
            }
        }
        if leading {
            let _ = store.release_lead(ARCHIVER_LEAD, &holder).await;
        }
    }

    /// Up to `max` tasks, one at a time, `pace` apart.
    async fn batch(
        &self,
        store: &PgStore,
        max: u32,
        pace: std::time::Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<ArchiveRun> {
        let filter = ArchiveFilter {
            finished_before: cutoff(&self.age, Utc::now())?,
            channel: None,
            workflow: None,
        };
        let mut run = ArchiveRun::default();
        for task in store.archive_candidates(&filter, None, max).await? {
            if stop.is_cancelled() {
                break;
            }
            match self.archive.archive_task(store, &task).await? {
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
            tokio::time::sleep(pace).await;
        }
        Ok(run)
    }
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
