//! Property: any sequence of appends — with stale or future expected versions and repeated
//! event ids — leaves the stream equal to the appends that were accepted, in order.

use engine::testing::TestDatabase;
use engine::{Error, Event, Fence, NewEvent, NewTask, PgStore, TaskStatus};
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

/// One attempted append, relative to the model's state when it runs.
#[derive(Clone, Debug)]
struct Op {
    /// Added to the model's current version: 0 is right, others are stale or ahead.
    version_skew: i8,
    /// Reuse the ids of an earlier attempted batch (index into history) instead of new ones.
    reuse: Option<usize>,
    len: usize,
}

fn op() -> impl Strategy<Value = Op> {
    (
        prop_oneof![4 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8), 1 => Just(-3i8)],
        prop::option::weighted(0.3, 0usize..8),
        1usize..4,
    )
        .prop_map(|(version_skew, reuse, len)| Op {
            version_skew,
            reuse,
            len,
        })
}

fn batch(ids: &[Uuid]) -> Vec<NewEvent> {
    ids.iter()
        .map(|id| {
            NewEvent::new(Event::status_changed(
                TaskStatus::QUEUED,
                TaskStatus::QUEUED,
            ))
            .with_id(*id)
        })
        .collect()
}

async fn run_case(store: &PgStore, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let channel = engine::ChannelId::parse("prop").expect("channel");
    let task = store
        .create_task(NewTask::new("prop", channel, json!({})))
        .await
        .expect("task")
        .task_id();
    // The model: the accepted event ids in stream order (version 1 is task_submitted).
    let mut model: Vec<Uuid> = Vec::new();
    // Every batch attempted so far, with the version it was appended at if accepted.
    let mut history: Vec<(Vec<Uuid>, Option<u32>)> = Vec::new();

    for op in ops {
        let current = 1 + model.len() as u32;
        let expected = (i64::from(current) + i64::from(op.version_skew)).max(0) as u32;
        let ids: Vec<Uuid> = match op.reuse.and_then(|i| history.get(i)) {
            Some((ids, _)) => ids.clone(),
            None => (0..op.len).map(|_| Uuid::new_v4()).collect(),
        };
        let result = store
            .append(task, expected, Fence::Unleased, &batch(&ids))
            .await;
        let placed_at = history
            .iter()
            .filter(|(h, _)| *h == ids)
            .find_map(|(_, at)| *at);
        let any_stored = ids.iter().any(|id| model.contains(id));
        match result {
            Ok(appended) if appended.replayed => {
                prop_assert_eq!(
                    placed_at,
                    Some(expected),
                    "a replay must match an accepted batch's place"
                );
            }
            Ok(appended) => {
                prop_assert_eq!(
                    expected,
                    current,
                    "only the current version may be appended at"
                );
                prop_assert!(!any_stored, "stored ids must not be written twice");
                model.extend(&ids);
                prop_assert_eq!(appended.version, 1 + model.len() as u32);
                history.push((ids, Some(expected)));
                continue;
            }
            Err(Error::Conflict {
                expected: e,
                actual,
                ..
            }) => {
                prop_assert_eq!(e, expected);
                prop_assert_eq!(actual, current);
                prop_assert!(
                    expected != current,
                    "the current version only conflicts through reused ids"
                );
            }
            Err(Error::EventIdReused { .. }) => prop_assert!(any_stored),
            Err(other) => return Err(TestCaseError::fail(format!("unexpected error {other:?}"))),
        }
        if op.reuse.is_none() {
            history.push((ids, None));
        }
    }

    let stream = store.read_stream(task, 2).await.expect("read");
    let stored: Vec<Uuid> = stream.iter().map(|e| e.event_id).collect();
    prop_assert_eq!(stored, model);
    let versions: Vec<u32> = stream.iter().map(|e| e.version).collect();
    prop_assert_eq!(versions, (2..2 + stream.len() as u32).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn random_append_sequences_keep_exactly_the_accepted_appends() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let db = runtime.block_on(TestDatabase::create());
    let store = db.store();
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec(op(), 1..25))| {
        runtime.block_on(run_case(&store, ops))?;
    });
}
