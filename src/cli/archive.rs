//! `reel archive` and `reel restore`: finished tasks' streams out of PostgreSQL into an
//! archive and back (see [`crate::archive`]).

use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;
use engine::{ArchiveFilter, ChannelId, PgStore, RestoreOutcome, TaskId};
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
    /// At most this many tasks per second, one at a time (default: as fast as it goes,
    /// 4 at once): spreads the deletes out on a busy database.
    #[arg(long, value_name = "TASKS")]
    rate: Option<f64>,
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
    /// Tasks another archiver archived first.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) already_archived: u64,
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

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ArchiveRun {
    fn record(&mut self, outcome: Archived) {
        match outcome {
            Archived::Done { events, bytes } => {
                self.archived += 1;
                self.events += events;
                self.bytes += bytes;
            }
            Archived::Changed => self.changed += 1,
            Archived::AlreadyArchived => self.already_archived += 1,
            Archived::FollowerBehind { follower } => {
                self.follower_behind += 1;
                if !self.followers.contains(&follower) {
                    self.followers.push(follower);
                }
            }
        }
    }
}

/// Which tasks an archiving run takes, how many, how fast, and under which lead.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan<'a> {
    pub(crate) filter: &'a ArchiveFilter,
    /// At most this many tasks (`None`: every one the filter picks).
    pub(crate) limit: Option<u64>,
    pub(crate) pace: Pace,
    /// A fleet archiver's lead, renewed before each task: the run stops once it is lost.
    pub(crate) lead: Option<&'a Lead>,
}

/// How fast an archiving run goes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pace {
    /// [`IN_FLIGHT`] tasks at once, as fast as they go.
    Full,
    /// One task at a time, at most this many per second.
    PerSecond(f64),
}

/// Archives every task `filter` picks (at most `limit`) into `archive`, at `pace`, until
/// `stop`: the run's counts.
pub(crate) async fn archive_tasks(
    store: &PgStore,
    archive: &Archive,
    plan: Plan<'_>,
    stop: &CancellationToken,
    run: &mut ArchiveRun,
) -> anyhow::Result<()> {
    let Plan {
        filter,
        limit,
        pace,
        lead,
    } = plan;
    let mut after = None;
    let mut taken = 0u64;
    let (in_flight, gap) = match pace {
        Pace::Full => (IN_FLIGHT, None),
        Pace::PerSecond(rate) => (1, Some(std::time::Duration::from_secs_f64(1.0 / rate))),
    };
    while !stop.is_cancelled() {
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
        for chunk in page.chunks(in_flight) {
            if stop.is_cancelled() {
                break;
            }
            // A fleet's archiver renews its lead before each task, and stops once it lost it.
            if let Some(lead) = lead
                && !store
                    .take_lead(ARCHIVER_LEAD, &lead.holder, lead.ttl)
                    .await?
            {
                return Ok(());
            }
            let mut writes = Vec::with_capacity(chunk.len());
            for task in chunk {
                writes.push(archive.archive_task(store, task));
            }
            for outcome in futures_util::future::join_all(writes).await {
                run.record(outcome?);
            }
            if let Some(gap) = gap {
                tokio::time::sleep(gap).await;
            }
        }
        after = Some(last);
    }
    Ok(())
}

/// The fleet archiver's lead, held by `holder` for `ttl` at each renewal.
#[derive(Clone, Debug)]
pub(crate) struct Lead {
    holder: String,
    ttl: std::time::Duration,
}

pub(crate) async fn archive(url: &str, args: ArchiveArgs) -> anyhow::Result<()> {
    // Checked before connecting; an age is then taken back from the database's clock, the
    // one `updated_at` was written by (this machine's may be off).
    cutoff(&args.finished_before, Utc::now())?;
    let channel = args.channel.as_deref().map(ChannelId::parse).transpose()?;
    let archive = Archive::open(&args.to).map_err(|e| UsageError(e.to_string()))?;
    let pace = match args.rate {
        None => Pace::Full,
        Some(rate) if rate.is_finite() && rate > 0.0 => Pace::PerSecond(rate),
        Some(_) => return Err(UsageError("--rate must be above 0".into()).into()),
    };
    let store = engine::db::connect_store(url, 1 + IN_FLIGHT as u32).await?;
    store.sync_clock().await?;
    let filter = ArchiveFilter {
        finished_before: cutoff(&args.finished_before, store.now())?,
        channel,
        workflow: args.workflow.clone(),
    };
    let stop = CancellationToken::new();
    tokio::spawn(engine::service::cancel_on_signals(
        stop.clone(),
        "stopping after the tasks in hand",
    ));
    let mut run = ArchiveRun::default();
    let plan = Plan {
        filter: &filter,
        limit: args.limit,
        pace,
        lead: None,
    };
    let done = archive_tasks(&store, &archive, plan, &stop, &mut run).await;
    if let Err(err) = done {
        // What the run did before it failed is done: say so.
        eprintln!(
            "archived {} tasks ({} events) before this error",
            run.archived, run.events
        );
        return Err(err);
    }
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
    if run.already_archived > 0 {
        println!(
            "{} task(s) archived by another archiver meanwhile",
            run.already_archived
        );
    }
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
                let lead = Lead {
                    holder: holder.clone(),
                    ttl,
                };
                match self.batch(&store, batch, &stop, &lead).await {
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

    /// Up to `max` tasks, at the retention's rate.
    async fn batch(
        &self,
        store: &PgStore,
        max: u32,
        stop: &CancellationToken,
        lead: &Lead,
    ) -> anyhow::Result<ArchiveRun> {
        // By the database's clock, which wrote `updated_at`.
        store.sync_clock().await?;
        let filter = ArchiveFilter {
            finished_before: cutoff(&self.age, store.now())?,
            channel: None,
            workflow: None,
        };
        let plan = Plan {
            filter: &filter,
            limit: Some(u64::from(max)),
            pace: Pace::PerSecond(self.rate),
            lead: Some(lead),
        };
        let mut run = ArchiveRun::default();
        archive_tasks(store, &self.archive, plan, stop, &mut run).await?;
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
