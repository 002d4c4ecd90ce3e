//! Edges of the append path (issue 18's second review): NUL characters in a job id and in
//! error messages, orchestrators sharing one pool, a pipelined step that fails or drains,
//! and a held connection killed while its run waits. Against a real PostgreSQL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{claim, one_step, submit};
use engine::testing::TestDatabase;
use engine::{
    BoxFuture, FailureKind, ItemOutput, JobStatus, JobWork, Orchestrator, PgStore, ProviderLimits,
    Registry, RetryPolicy, RunOutcome, Step, StepContext, StepError, Submission, Workflow,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn one_try() -> RetryPolicy {
    RetryPolicy {
        max_tries: 1,
        ..RetryPolicy::default()
    }
}

/// A job provider whose submit answers with a job id holding a NUL (binary garbage from
/// the provider), or whose poll fails the job with such a message.
struct NulJobs {
    submits: Arc<AtomicU32>,
    nul_in_job_id: bool,
}

impl JobWork for NulJobs {
    fn plan(&self, _input: &Value) -> Result<u32, StepError> {
        Ok(1)
    }

    fn submit(
        &self,
        _ctx: StepContext,
        item: u32,
        _submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        self.submits.fetch_add(1, Ordering::SeqCst);
        let id = if self.nul_in_job_id {
            format!("job\u{0}{item}")
        } else {
            format!("job-{item}")
        };
        Box::pin(async move { Ok(json!({ "id": id })) })
    }

    fn poll(
        &self,
        _ctx: StepContext,
        _item: u32,
        _job: Value,
    ) -> BoxFuture<Result<JobStatus, StepError>> {
        Box::pin(async move {
            // Built as a literal: StepError's fields are public, so `new`'s scrub is bypassed.
            Ok(JobStatus::Failed(StepError {
                kind: FailureKind::Permanent,
                message: "provider said \u{0}garbage".into(),
                retry_after: None,
                unanswered: false,
                waiting: None,
            }))
        })
    }
}

/// A job id the log cannot store: the provider accepted (and bills) the job, but its
/// `item_submitted` append fails eight times over ~11 s and the run errors; the next claim
/// submits (pays for) the job again. Expected: the item fails at once, saying why.
/// A job step of [`NulJobs`] with one try per item.
fn nul_jobs(submits: &Arc<AtomicU32>, nul_in_job_id: bool) -> Step {
    Step::jobs(
        "render",
        NulJobs {
            submits: submits.clone(),
            nul_in_job_id,
        },
    )
    .retry(one_try())
}

#[tokio::test]
async fn a_job_id_with_nul_fails_the_item_at_once_and_is_not_paid_again() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let submits = Arc::new(AtomicU32::new(0));
    let orchestrator = one_step(&store, "nuljob", nul_jobs(&submits, true));
    let task = submit(&store, "nuljob").await;
    let lease = claim(&store, task).await;
    let started = Instant::now();
    let outcome = orchestrator.run(&lease, CancellationToken::new()).await;
    let took = started.elapsed();
    assert!(
        matches!(outcome, Ok(RunOutcome::Failed { .. })) && took < Duration::from_secs(5),
        "run ended after {took:?} with {outcome:?}; provider billed {} submission(s)",
        submits.load(Ordering::SeqCst)
    );
}

/// A job whose poll reports `Failed` with a NUL in a StepError built as a struct literal
/// (its fields are public): the `item_failed` append cannot be stored.
#[tokio::test]
async fn a_job_failure_message_with_nul_is_recorded() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let step = nul_jobs(&Arc::new(AtomicU32::new(0)), false).poll_backoff(
        engine::Backoff::exponential(Duration::from_millis(10), Duration::from_millis(10)),
    );
    let orchestrator = one_step(&store, "nulfail", step);
    let task = submit(&store, "nulfail").await;
    let lease = claim(&store, task).await;
    let started = Instant::now();
    let outcome = orchestrator.run(&lease, CancellationToken::new()).await;
    let took = started.elapsed();
    assert!(
        matches!(outcome, Ok(RunOutcome::Failed { .. })) && took < Duration::from_secs(5),
        "run ended after {took:?} with {outcome:?}"
    );
}

/// A call step's error built as a struct literal with a NUL in its message (the fields
/// are public; only `StepError::new` scrubs NUL): the item_failed append can never be
/// stored, so the run retries it for ~11 s and errors instead of failing the task.
#[tokio::test]
async fn a_step_error_literal_with_nul_is_recorded() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let step = Step::fan_out(
        "clips",
        |_| Ok(1),
        |_ctx: StepContext, _item| async move {
            Err::<ItemOutput, _>(StepError {
                kind: FailureKind::Permanent,
                message: "provider said \u{0}garbage".into(),
                retry_after: None,
                unanswered: false,
                waiting: None,
            })
        },
    )
    .retry(one_try());
    let orchestrator = one_step(&store, "nulerr", step);
    let task = submit(&store, "nulerr").await;
    let lease = claim(&store, task).await;
    let started = Instant::now();
    let outcome = orchestrator.run(&lease, CancellationToken::new()).await;
    let took = started.elapsed();
    assert!(
        matches!(outcome, Ok(RunOutcome::Failed { .. })) && took < Duration::from_secs(5),
        "run ended after {took:?} with {outcome:?}"
    );
}

/// Two orchestrators (say, two workers in one process) on one pool of 8: each lets
/// 8 - HOLD_SPARE = 4 runs hold a connection, so 8 runs hold all 8 and a provider slot
/// call (a statement on the pool) waits for the pool's acquire timeout, then the runs fail.
#[tokio::test]
async fn orchestrators_sharing_a_pool_leave_it_a_spare() {
    let db = TestDatabase::create().await;
    let pool = engine::db::connect(db.url(), 8).await.expect("pool");
    let store = PgStore::new(pool);
    let runs = 8usize;
    let barrier = Arc::new(tokio::sync::Barrier::new(runs));
    let gate = barrier.clone();
    let workflow = Workflow::new("shared")
        .step(Step::fan_out(
            "first",
            |_| Ok(1),
            move |_ctx: StepContext, _item| {
                let gate = gate.clone();
                async move {
                    gate.wait().await;
                    Ok(ItemOutput::new("a", 0))
                }
            },
        ))
        .step(
            Step::fan_out(
                "paid",
                |_| Ok(1),
                |_ctx: StepContext, _item| async move { Ok(ItemOutput::new("b", 0)) },
            )
            .provider(ProviderLimits::new("k").max_in_flight(8)),
        );
    let registry = || Registry::new().register(workflow.clone());
    let first = Orchestrator::new(store.clone(), registry());
    let second = Orchestrator::new(store.clone(), registry());
    let mut handles = Vec::new();
    for n in 0..runs {
        let task = submit(&store, "shared").await;
        let lease = claim(&store, task).await;
        let orchestrator = if n % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        handles.push(tokio::spawn(async move {
            orchestrator.run(&lease, CancellationToken::new()).await
        }));
    }
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for handle in handles {
        outcomes.push(format!("{:?}", handle.await.expect("join")));
    }
    let took = started.elapsed();
    assert!(
        outcomes.iter().all(|o| o.contains("Completed")) && took < Duration::from_secs(5),
        "after {took:?}: {outcomes:?}"
    );
}

/// A pipelined step whose item 3 fails for good while 1 and 2 may still be unrecorded:
/// every earlier completion is recorded, before the failure, and the task fails.
#[tokio::test]
async fn a_pipelined_item_failing_keeps_the_completions_before_it() {
    for _ in 0..5 {
        let db = TestDatabase::create().await;
        let store = db.store();
        let step = Step::fan_out(
            "clips",
            |_| Ok(8),
            |_ctx: StepContext, item| async move {
                if item == 3 {
                    return Err(StepError::permanent("no"));
                }
                Ok(ItemOutput::new(format!("c{item}"), 1))
            },
        )
        .pipelined()
        .concurrency(2)
        .retry(one_try());
        let orchestrator = one_step(&store, "pipe", step);
        let task = submit(&store, "pipe").await;
        let lease = claim(&store, task).await;
        let outcome = orchestrator
            .run(&lease, CancellationToken::new())
            .await
            .expect("run");
        assert!(matches!(outcome, RunOutcome::Failed { .. }), "{outcome:?}");
        let events = store.read_stream(task, 1).await.expect("read");
        let done = common::completions(&store, task, "clips").await;
        assert!(done.contains_key(&1) && done.contains_key(&2), "{done:?}");
        let audit = engine::audit::audit(task, &events);
        assert!(audit.is_clean(), "{:?}", audit.violations);
    }
}

/// Drain fired from inside a pipelined item: the completions handed over are recorded
/// before the run ends, and the outcome is not a failure.
#[tokio::test]
async fn drain_during_a_pipelined_step_records_what_was_handed_over() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let drain = CancellationToken::new();
    let trigger = drain.clone();
    let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ran.clone();
    let step = Step::fan_out(
        "clips",
        |_| Ok(200),
        move |_ctx: StepContext, item| {
            let (trigger, seen) = (trigger.clone(), seen.clone());
            async move {
                seen.lock().expect("lock").push(item);
                if item == 50 {
                    trigger.cancel();
                }
                Ok(ItemOutput::new(format!("c{item}"), 1))
            }
        },
    )
    .pipelined()
    .concurrency(8);
    let orchestrator = one_step(&store, "drain", step);
    let task = submit(&store, "drain").await;
    let lease = claim(&store, task).await;
    let outcome = orchestrator
        .run_with(&lease, drain, CancellationToken::new())
        .await
        .expect("run");
    let done = common::completions(&store, task, "clips").await;
    let ran = ran.lock().expect("lock").clone();
    assert_eq!(
        done.len(),
        ran.len(),
        "ran {} recorded {} ({outcome:?})",
        ran.len(),
        done.len()
    );
    assert!(!matches!(outcome, RunOutcome::Failed { .. }), "{outcome:?}");
}

/// The server kills the run's held connection while an item is slow; the next append
/// must take a fresh connection and the run completes promptly.
#[tokio::test]
async fn a_held_connection_killed_during_a_slow_item_is_replaced() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let admin = engine::db::connect(db.url(), 1).await.expect("admin pool");
    let name = db.name().to_owned();
    let workflow = Workflow::new("kill")
        .step(Step::fan_out(
            "first",
            |_| Ok(1),
            |_ctx: StepContext, _| async move { Ok(ItemOutput::new("a", 0)) },
        ))
        .step(Step::fan_out(
            "slow",
            |_| Ok(1),
            move |_ctx: StepContext, _| {
                let (admin, name) = (admin.clone(), name.clone());
                async move {
                    let killed: Vec<bool> = sqlx::query_scalar(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    )
                    .bind(&name)
                    .fetch_all(&admin)
                    .await
                    .map_err(|e| StepError::permanent(e.to_string()))?;
                    assert!(!killed.is_empty());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(ItemOutput::new("b", 0))
                }
            },
        ))
        .step(
            Step::fan_out(
                "last",
                |_| Ok(3),
                |_ctx: StepContext, i| async move { Ok(ItemOutput::new(format!("c{i}"), 0)) },
            )
            .pipelined()
            .concurrency(3),
        );
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let task = submit(&store, "kill").await;
    let lease = claim(&store, task).await;
    let started = Instant::now();
    let outcome = orchestrator.run(&lease, CancellationToken::new()).await;
    assert!(
        matches!(outcome, Ok(RunOutcome::Completed)) && started.elapsed() < Duration::from_secs(3),
        "after {:?}: {outcome:?}",
        started.elapsed()
    );
}

/// The job id with a NUL, over two claims: the provider must not be paid twice for item 0.
#[tokio::test]
async fn a_job_id_with_nul_is_paid_for_once_across_claims() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let submits = Arc::new(AtomicU32::new(0));
    let orchestrator = one_step(&store, "nuljob", nul_jobs(&submits, true));
    let task = submit(&store, "nuljob").await;
    let mut outcomes = Vec::new();
    for n in 0..2 {
        let Some(lease) = store
            .claim_task(task, &format!("w{n}"), Duration::from_secs(2))
            .await
            .expect("claim")
        else {
            outcomes.push("not claimable".to_owned());
            break;
        };
        outcomes.push(format!(
            "{:?}",
            orchestrator.run(&lease, CancellationToken::new()).await
        ));
        // The errored run's lease expires (a worker would have stopped heartbeating it).
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    assert_eq!(
        submits.load(Ordering::SeqCst),
        1,
        "the provider was paid for each claim: {outcomes:?}"
    );
}
