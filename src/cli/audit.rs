//! `reel audit` and `reel stats`: is every history sound, and what did it all cost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use engine::audit::{AuditReport, Rule, ScanSummary, Scope, Violation, scan};
use engine::{ChannelId, TaskFilter, TaskId};
use serde::Serialize;
use steps::{ArtifactCheck, Fingerprint, check_artifact};

use super::money;

/// `reel audit` found broken invariants: exit code 3 (errors are 1, usage 2).
#[derive(Debug, thiserror::Error)]
#[error("{0} task(s) with broken invariants")]
pub(crate) struct AuditFailed(pub(crate) u64);

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["task", "all", "failed"]))]
pub(crate) struct AuditArgs {
    /// Audit this task.
    task: Option<String>,
    /// Audit every task (streamed a page at a time).
    #[arg(long)]
    all: bool,
    /// Audit the failed tasks.
    #[arg(long)]
    failed: bool,
    /// Only this channel's tasks (with --all or --failed).
    #[arg(long)]
    channel: Option<String>,
    /// One JSON object per task (JSON lines), then a summary object.
    #[arg(long)]
    json: bool,
    /// Where the workers wrote artifacts (as `reel worker --artifacts`): every artifact
    /// whose item recorded a size and SHA-256 must be there, unchanged.
    #[arg(long, env = "REEL_ARTIFACTS", default_value = "artifacts")]
    artifacts: PathBuf,
    /// Check the log only, not the artifacts on disk.
    #[arg(long)]
    log_only: bool,
}

pub(crate) async fn audit(url: &str, args: AuditArgs) -> anyhow::Result<()> {
    let task = args.task.as_deref().map(str::parse::<TaskId>).transpose()?;
    let channel = args.channel.as_deref().map(ChannelId::parse).transpose()?;
    let store = engine::db::connect_store(url, 2).await?;
    let json = args.json;
    let artifacts = (!args.log_only).then_some(args.artifacts.as_path());
    let print = |mut report: AuditReport| {
        if let Some(root) = artifacts {
            let broken = artifact_violations(root, &report);
            report.violations.extend(broken);
        }
        if json {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        } else {
            print!("{}", render(&report));
        }
        report
    };
    let broken = match task {
        Some(task) => {
            let report = print(crate::archive::audit_task(&store, task).await?);
            u64::from(!report.is_clean())
        }
        None => {
            let scope = Scope {
                channel,
                failed_only: args.failed,
            };
            // Counted here: the artifact checks add violations the scan did not see.
            let mut summary = ScanSummary::default();
            scan(&store, &scope, |report| {
                let report = print(report);
                summary.tasks += 1;
                summary.violations += report.violations.len() as u64;
                summary.tasks_with_violations += u64::from(!report.is_clean());
            })
            .await?;
            // Archived tasks' histories are not in the log: each is read on its own. What
            // their audit found when they were archived counts here.
            let summaries = store.archive_summaries(scope.channel.as_ref()).await?;
            let archived = summaries.len();
            let archived_broken = summaries
                .iter()
                .filter(|s| {
                    s.get("violations")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0)
                        > 0
                })
                .count() as u64;
            summary.tasks_with_violations += archived_broken;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"summary": summary, "archived_not_read": archived})
                );
            } else {
                println!(
                    "audited {} tasks: {} with broken invariants ({} violations)",
                    summary.tasks, summary.tasks_with_violations, summary.violations
                );
                if archived > 0 {
                    println!(
                        "{archived} archived task(s) not read here ({archived_broken} had broken \
                         invariants when archived): `reel audit TASK` reads one from its archive"
                    );
                }
            }
            summary.tasks_with_violations
        }
    };
    if broken > 0 {
        return Err(AuditFailed(broken).into());
    }
    Ok(())
}

/// The artifacts of `report`'s completed items (their current runs: a redone item's
/// earlier file was replaced by design) that are missing or changed under `root`. Items
/// that recorded no size and SHA-256 (older logs, outputs without a file) are not checked.
///
/// A root that is not there at all is one violation, not one per file: the audit was most
/// likely pointed at the wrong place.
fn artifact_violations(root: &Path, report: &AuditReport) -> Vec<Violation> {
    let recorded: Vec<_> = report
        .state
        .steps
        .iter()
        .flat_map(|step| step.items.values())
        .filter_map(|record| {
            let print = record.output.as_ref().and_then(Fingerprint::recorded_in)?;
            Some((record, print))
        })
        .collect();
    let violation = |version, message| Violation {
        task: report.task,
        version,
        rule: Rule::ArtifactIntact,
        message,
    };
    if let Some((first, _)) = recorded.first()
        && !root.is_dir()
    {
        let message = format!(
            "{} recorded artifacts cannot be checked: the artifacts root {} is not a directory \
             (pass --artifacts DIR as given to reel worker, or --log-only)",
            recorded.len(),
            root.display()
        );
        return vec![violation(first.version, message)];
    }
    recorded
        .into_iter()
        .filter_map(|(record, recorded)| {
            let artifact = &record.artifact;
            let message = match check_artifact(root, artifact, &recorded) {
                ArtifactCheck::Intact => return None,
                ArtifactCheck::Missing(why) => {
                    format!("{artifact} is missing from {} ({why})", root.display())
                }
                ArtifactCheck::Changed { recorded, found } => format!(
                    "{artifact} changed: recorded {} bytes, sha256 {}; found {} bytes, sha256 {}",
                    recorded.size_bytes, recorded.sha256, found.size_bytes, found.sha256
                ),
                ArtifactCheck::Unsafe => {
                    format!("{artifact:?} is not a path under the artifacts root")
                }
            };
            Some(violation(record.version, message))
        })
        .collect()
}

/// The text form of one task's audit (also what the golden tests compare).
pub(crate) fn render(report: &AuditReport) -> String {
    let verdict = if report.is_clean() {
        "ok".to_owned()
    } else {
        format!("{} violation(s)", report.violations.len())
    };
    let mut out = format!(
        "task {}: {verdict} — {} ({} events); items run {}, skipped on resume {}; spent {} / {:.3}s; saved {} / {:.3}s\n",
        report.task,
        report.status,
        report.events,
        report.items_run,
        report.items_skipped,
        money(report.spent.cost_micros),
        report.spent.duration_ms as f64 / 1e3,
        money(report.saved.cost_micros),
        report.saved.duration_ms as f64 / 1e3,
    );
    if report.submits_unanswered > 0 {
        out.push_str(&format!(
            "  {} submit(s) got no answer: the provider may have started (and charge for) a job for each\n",
            report.submits_unanswered
        ));
    }
    for violation in &report.violations {
        let rule = serde_json::to_value(violation.rule)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        out.push_str(&format!(
            "  v{} {rule}: {}\n",
            violation.version, violation.message
        ));
    }
    out
}

#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// Only this channel's tasks.
    #[arg(long)]
    channel: Option<String>,
    #[arg(long)]
    json: bool,
}

/// `reel stats --json` (and the console's stats page).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Stats {
    pub(crate) tasks: u64,
    pub(crate) by_status: BTreeMap<String, u64>,
    /// Failure reasons (item numbers folded away), most frequent first.
    pub(crate) failure_reasons: Vec<(String, u64)>,
    pub(crate) spent_micros: i64,
    pub(crate) saved_micros: i64,
    pub(crate) items_run: u64,
    pub(crate) items_skipped: u64,
    /// Provider jobs submitted (two-phase items): beside `items_run`, how many jobs it
    /// took to get the items done.
    pub(crate) jobs_submitted: u64,
    /// Submits that got no answer: each may have started a job the provider charges for
    /// (possible payments beyond `jobs_submitted`). Absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) submits_unanswered: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

pub(crate) async fn stats(url: &str, args: StatsArgs) -> anyhow::Result<()> {
    let channel = args.channel.as_deref().map(ChannelId::parse).transpose()?;
    let store = engine::db::connect_store(url, 2).await?;
    let stats = gather_stats(&store, channel).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    print!("{}", render_stats(&stats));
    Ok(())
}

/// What `reel stats` reports about the tasks of `channel` (`None`: every channel): their
/// statuses from the rows, and money, items and jobs from an audit of every history.
pub(crate) async fn gather_stats(
    store: &engine::PgStore,
    channel: Option<ChannelId>,
) -> engine::Result<Stats> {
    let mut stats = Stats::default();
    for task in store
        .list_tasks(&TaskFilter {
            channel: channel.clone(),
            ..TaskFilter::default()
        })
        .await?
    {
        *stats
            .by_status
            .entry(task.status.as_str().to_owned())
            .or_default() += 1;
    }
    // Archived tasks' figures were kept on their rows when their streams left the log.
    for archived in store.archive_summaries(channel.as_ref()).await? {
        let figure = |key: &str| {
            archived
                .get(key)
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0)
        };
        let count = |key: &str| u64::try_from(figure(key)).unwrap_or(0);
        stats.tasks += 1;
        stats.spent_micros += figure("spent_micros");
        stats.saved_micros += figure("saved_micros");
        stats.items_run += count("items_run");
        stats.items_skipped += count("items_skipped");
        stats.jobs_submitted += count("jobs_submitted");
        stats.submits_unanswered += count("submits_unanswered");
    }
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    scan(
        store,
        &Scope {
            channel: channel.clone(),
            failed_only: false,
        },
        |report| {
            stats.tasks += 1;
            stats.spent_micros += report.spent.cost_micros;
            stats.saved_micros += report.saved.cost_micros;
            stats.items_run += u64::from(report.items_run);
            stats.items_skipped += u64::from(report.items_skipped);
            stats.jobs_submitted += u64::from(report.jobs_submitted);
            stats.submits_unanswered += u64::from(report.submits_unanswered);
        },
    )
    .await?;
    for task in store
        .list_tasks(&TaskFilter {
            status: Some(engine::TaskStatus::FAILED),
            channel,
            ..TaskFilter::default()
        })
        .await?
    {
        if let Some(error) = task.last_error {
            *reasons.entry(fold_numbers(&error)).or_default() += 1;
        }
    }
    stats.failure_reasons = reasons.into_iter().collect();
    stats
        .failure_reasons
        .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(stats)
}

/// The text `reel stats` prints (the console shows the same, per channel).
pub(crate) fn render_stats(stats: &Stats) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{} tasks", stats.tasks);
    for (status, count) in &stats.by_status {
        let _ = writeln!(out, "  {status:<22} {count}");
    }
    let _ = writeln!(
        out,
        "spent {} over {} items; resuming skipped {} items and saved {}",
        money(stats.spent_micros),
        stats.items_run,
        stats.items_skipped,
        money(stats.saved_micros)
    );
    if stats.jobs_submitted > 0 {
        let _ = writeln!(
            out,
            "provider jobs submitted: {} (items completed: {})",
            stats.jobs_submitted, stats.items_run
        );
    }
    if stats.submits_unanswered > 0 {
        let _ = writeln!(
            out,
            "submits unanswered: {} (each may have started a job the provider charges for)",
            stats.submits_unanswered
        );
    }
    if !stats.failure_reasons.is_empty() {
        let _ = writeln!(out, "failure reasons:");
        for (reason, count) in &stats.failure_reasons {
            let _ = writeln!(
                out,
                "  {count:>5}  {}",
                engine::truncate_for_display(reason, 100)
            );
        }
    }
    out
}

/// Groups reasons that differ only in numbers ("video item 7" and "video item 9").
fn fold_numbers(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut in_number = false;
    for c in reason.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}
