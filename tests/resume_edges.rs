//! The seed's resume edge cases, from histories written straight into the log: no
//! progress, progress of 0, non-contiguous completions, and more completions than the plan.

mod common;

use common::{Probe, claim, state, submit};
use engine::testing::TestDatabase;
use engine::{Event, NewEvent, Orchestrator, Registry, RunOutcome, TaskStatus, Workflow};
use tokio_util::sync::CancellationToken;

/// Writes a first attempt's history for an 18-clip step (`planned` from its step_started,
/// `done` completed), then resumes; returns the items the resume ran and the final state.
async fn resume_after(planned: Option<u32>, done: &[u32]) -> (Vec<u32>, engine::TaskState) {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    let workflow = Workflow::new("clips")
        .step(probe.items("video", TaskStatus::from_static("generating_video"), 18))
        .review_gate();
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let task = submit(&store, "clips").await;

    let first = claim(&store, task).await;
    let mut history = Vec::new();
    if let Some(items) = planned {
        history.push(Event::StepStarted {
            step: "video".into(),
            attempt: 1,
            items,
            atomic: false,
        });
    }
    history.extend(done.iter().map(|&item| Event::ItemCompleted {
        step: "video".into(),
        item,
        attempt: 1,
        artifact: format!("clip-{item}"),
        cost_micros: 550_000,
        duration_ms: 300_000,
        output: None,
    }));
    if !history.is_empty() {
        let batch: Vec<NewEvent> = history.into_iter().map(NewEvent::new).collect();
        store
            .append(task, first.version, first.fence(), &batch)
            .await
            .expect("history");
    }
    store.release_lease(&first).await.expect("release");

    let second = claim(&store, task).await;
    assert_eq!(second.attempt, 2);
    let outcome = orchestrator
        .run(&second, CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(outcome, RunOutcome::AwaitingReview);
    (probe.items_called("video", 2), state(&store, task).await)
}

#[tokio::test]
async fn no_progress_runs_every_item() {
    let (ran, _) = resume_after(None, &[]).await;
    assert_eq!(ran, (1..=18).collect::<Vec<_>>());
}

#[tokio::test]
async fn progress_of_zero_runs_every_item() {
    let (ran, state) = resume_after(Some(18), &[]).await;
    assert_eq!(ran, (1..=18).collect::<Vec<_>>());
    assert!(
        state.resumes.is_empty(),
        "nothing was skipped, nothing saved"
    );
}

#[tokio::test]
async fn a_non_contiguous_set_resumes_exactly_the_gaps() {
    let done: Vec<u32> = (1..=6).chain([9]).collect();
    let (ran, state) = resume_after(Some(18), &done).await;
    let expected: Vec<u32> = [7, 8].into_iter().chain(10..=18).collect();
    assert_eq!(ran, expected);
    let resume = &state.resumes[0];
    assert_eq!(resume.skipped["video"], done);
    assert_eq!(
        resume.saved.cost_micros,
        7 * 550_000,
        "seven clips at $0.55 saved"
    );
    assert_eq!(
        resume.saved.duration_ms,
        7 * 300_000,
        "seven clips at 5 min saved"
    );
}

#[tokio::test]
async fn completions_beyond_the_plan_are_ignored_and_reported() {
    let done: Vec<u32> = (1..=20).collect();
    let (ran, state) = resume_after(Some(20), &done).await;
    assert!(
        ran.is_empty(),
        "all 18 planned clips were already done: {ran:?}"
    );
    let video = state.step("video").expect("video");
    assert!(video.completed);
    assert_eq!(
        video.planned,
        Some(18),
        "the step restarted with the plan it has now"
    );
    assert_eq!(video.extra_items(18), [19, 20]);
    assert!(video.missing_items(18).is_empty());
}
