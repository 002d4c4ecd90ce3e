//! Properties of the fold over histories the orchestrator can produce (pure: no database).

use std::collections::BTreeSet;

use engine::{ChannelId, Event, FailureKind, RecordedEvent, TaskId, fold};
use proptest::prelude::*;
use serde_json::json;

/// What the orchestrator (or a reviewer) can do next in a one-step workflow.
#[derive(Clone, Debug)]
enum Action {
    Claim,
    Start,
    /// Complete the n-th missing item (modulo how many are missing).
    Complete(usize),
    Fail(usize),
    Reject,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        1 => Just(Action::Claim),
        1 => Just(Action::Start),
        6 => (0usize..32).prop_map(Action::Complete),
        2 => (0usize..32).prop_map(Action::Fail),
        1 => Just(Action::Reject),
    ]
}

/// A history plus, after each event, the set of items the current run has completed.
struct History {
    events: Vec<RecordedEvent>,
    completed_after: Vec<BTreeSet<u32>>,
}

fn build(planned: u32, actions: &[Action]) -> History {
    let task = TaskId::new();
    let submitted = Event::TaskSubmitted {
        workflow: "clips".into(),
        channel_id: ChannelId::parse("prop").expect("channel"),
        input: json!({}),
        notion_page_id: None,
        idempotency_key: None,
        workflow_version: None,
    };
    let mut history = History {
        events: vec![RecordedEvent::in_memory(task, 1, submitted)],
        completed_after: vec![BTreeSet::new()],
    };
    let (mut attempt, mut started, mut done) = (0u32, false, BTreeSet::new());
    for action in actions {
        let missing: Vec<u32> = (1..=planned).filter(|i| !done.contains(i)).collect();
        let event = match action {
            Action::Claim => {
                attempt += 1;
                Event::TaskClaimed {
                    worker_id: "w".into(),
                    lease_epoch: i64::from(attempt),
                    attempt,
                }
            }
            Action::Start if !started && attempt > 0 => {
                started = true;
                Event::StepStarted {
                    step: "video".into(),
                    attempt,
                    items: planned,
                    atomic: false,
                }
            }
            Action::Complete(n) if started && !missing.is_empty() => {
                let item = missing[n % missing.len()];
                done.insert(item);
                Event::ItemCompleted {
                    step: "video".into(),
                    item,
                    attempt,
                    artifact: format!("clip-{item}"),
                    cost_micros: 550_000,
                    duration_ms: 1_000,
                    output: None,
                }
            }
            Action::Fail(n) if started && !missing.is_empty() => Event::ItemFailed {
                step: "video".into(),
                item: missing[n % missing.len()],
                attempt,
                kind: FailureKind::Transient,
                error: "timeout".into(),
                retry: 1,
                unanswered: false,
                retry_after_ms: None,
            },
            Action::Reject if started => {
                started = false;
                done.clear();
                Event::ReviewRejected {
                    redo_from: "video".into(),
                    reason: None,
                }
            }
            _ => continue,
        };
        let version = history.events.len() as u32 + 1;
        history
            .events
            .push(RecordedEvent::in_memory(task, version, event));
        history.completed_after.push(done.clone());
    }
    history
}

fn completed_items(state: &engine::TaskState) -> BTreeSet<u32> {
    state
        .step("video")
        .map(|s| s.items.keys().copied().collect())
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_missing_set_is_exactly_planned_minus_completed(
        planned in 1u32..20,
        actions in prop::collection::vec(action(), 0..80),
    ) {
        let history = build(planned, &actions);
        let state = fold(&history.events);
        let done = history.completed_after.last().cloned().unwrap_or_default();
        let expected: Vec<u32> = (1..=planned).filter(|i| !done.contains(i)).collect();
        let missing = state.step("video").map_or_else(|| (1..=planned).collect(), |s| s.missing_items(planned));
        prop_assert_eq!(missing, expected);
        prop_assert_eq!(completed_items(&state), done);
    }

    #[test]
    fn redelivering_an_event_changes_nothing(
        planned in 1u32..20,
        actions in prop::collection::vec(action(), 1..80),
        pick in any::<prop::sample::Index>(),
    ) {
        let history = build(planned, &actions);
        let once = fold(&history.events);
        let at = pick.index(history.events.len());
        let mut redelivered = history.events.clone();
        redelivered.insert(at + 1, history.events[at].clone());
        prop_assert_eq!(fold(&redelivered), once);
    }

    #[test]
    fn no_prefix_shows_an_item_the_prefix_does_not_complete(
        planned in 1u32..20,
        actions in prop::collection::vec(action(), 0..80),
    ) {
        let history = build(planned, &actions);
        for (len, done) in history.completed_after.iter().enumerate() {
            let state = fold(&history.events[..=len]);
            prop_assert_eq!(&completed_items(&state), done, "prefix of {} events", len + 1);
        }
    }
}
