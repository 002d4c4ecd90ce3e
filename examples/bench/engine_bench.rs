//! Engine rows: the orchestrator's overhead per item (and against raw commits), a lone
//! item's completion to readable, fold speed, the resume decision.

use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{Event, Fence, Lease, NewEvent, Orchestrator, RecordedEvent};
use serde_json::json;
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Report;
use crate::store_bench::{Via, new_task, raw_inserts};
use crate::worker_bench::{ITEMS, noop_workflow, pipelined_noop_workflow};

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    quick: bool,
) -> anyhow::Result<()> {
    orchestrator_overhead(report, pool, store, if quick { 10 } else { 60 }).await?;
    lone_item(report, pool, store, if quick { 20 } else { 100 }).await?;
    fold_speed(report, store, if quick { 10_000 } else { 100_000 }).await?;
    resume_decision(report, if quick { 1_000 } else { 20_000 });
    Ok(())
}

/// Tasks of 18 no-op items run one at a time: what the engine itself costs per item, with
/// the step as it comes (each completion durable before the next item starts) and
/// pipelined (completions share commits).
async fn orchestrator_overhead(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    tasks: usize,
) -> anyhow::Result<()> {
    let held = raw_inserts(pool.clone(), 500, Via::Held).await?;
    let raw = raw_inserts(pool.clone(), 500, Via::Pool).await?;
    report.add(
        "raw INSERT commits/s (held connection, same run)",
        held.per_second(),
        "rows/s",
    );
    for (workflow, label) in [
        (noop_workflow(None), "one task at a time"),
        (
            pipelined_noop_workflow(),
            "one task at a time, pipelined step",
        ),
    ] {
        let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
        let channel = ChannelId::parse("bench")?;
        let mut ids = Vec::with_capacity(tasks);
        for _ in 0..tasks {
            ids.push(
                store
                    .create_task(NewTask::new("noop", channel.clone(), json!({})))
                    .await?
                    .task_id(),
            );
        }
        let started = Instant::now();
        for task in ids {
            let lease = claim(store, task).await?;
            let outcome = orchestrator.run(&lease, CancellationToken::new()).await?;
            anyhow::ensure!(
                outcome == RunOutcome::Completed,
                "unexpected outcome {outcome:?}"
            );
        }
        let wall = started.elapsed();
        let items = tasks as f64 * f64::from(ITEMS);
        let per_item_ms = wall.as_secs_f64() * 1e3 / items;
        report.add(
            format!("engine items/s ({label}, 18 no-op items; goal >= 1350)"),
            items / wall.as_secs_f64(),
            "items/s",
        );
        report.add(
            format!("engine items/s ({label}) / raw INSERT commits/s (held) (goal >= 0.8)"),
            items / wall.as_secs_f64() / held.per_second(),
            "x",
        );
        report.add(
            format!("engine wall time per item ({label}: claim, replay, appends)"),
            per_item_ms,
            "ms",
        );
        report.add(
            format!("engine per item ({label}) / raw INSERT p50 (pool) (goal <= 1.3)"),
            per_item_ms / raw.percentile_ms(0.5),
            "x",
        );
    }
    report.add(
        "raw INSERT commit p50 (pool, same run)",
        raw.percentile_ms(0.5),
        "ms",
    );
    Ok(())
}

/// A lone item's completion to its `item_completed` event being readable by another
/// connection: each item sleeps 20 ms first, so its completion is alone (nothing to batch
/// it with), and a reader on its own connection polls the count in a tight loop.
async fn lone_item(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    items: u32,
) -> anyhow::Result<()> {
    let percentile = |mut d: Vec<Duration>, p: f64| {
        d.sort();
        d[((d.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
    };
    // Alone on the machine: slow items start only once the one before is durable, so the
    // gap between one's end and the next one's start is its completion's way to the log
    // and back (the event is readable from the commit, a little before that).
    for busy in [true, false] {
        let (stamps, mut stamped) = tokio::sync::mpsc::unbounded_channel::<(Instant, Instant)>();
        lone_run(store, items, busy, move |started, ended| {
            let _ = stamps.send((started, ended));
        })
        .await?;
        let mut spans = Vec::new();
        while let Ok(span) = stamped.try_recv() {
            spans.push(span);
        }
        let durable: Vec<Duration> = spans.windows(2).map(|w| w[1].0 - w[0].1).collect();
        let after = if busy { "6 ms busy" } else { "20 ms asleep" };
        report.add(
            format!("lone item after {after}: completion -> durable p50 (goal <= 0.45)"),
            percentile(durable.clone(), 0.5),
            "ms",
        );
        report.add(
            format!("lone item after {after}: completion -> durable p95"),
            percentile(durable, 0.95),
            "ms",
        );
        // The same pause before a raw single-row INSERT on a held connection: what any
        // lone commit costs here in the same state.
        let mut conn = pool.acquire().await?;
        let mut raw = Vec::new();
        for i in 0..items {
            pause(busy).await;
            let started = Instant::now();
            sqlx::query("INSERT INTO bench_raw (v, payload) VALUES ($1, '{}')")
                .bind(i64::from(i))
                .execute(&mut *conn)
                .await?;
            raw.push(started.elapsed());
        }
        report.add(
            format!("lone raw INSERT after {after}, held connection p50"),
            percentile(raw, 0.5),
            "ms",
        );
    }

    // Seen from outside: a reader polls for the event (its tight loop takes a core of
    // the two, so this row runs slower than the one above).
    let (done, mut completed) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let task_cell = std::sync::Arc::new(tokio::sync::OnceCell::new());
    let mut conn = pool.acquire().await?;
    let cell = task_cell.clone();
    let reader = tokio::spawn(async move {
        let task: TaskId = loop {
            if let Some(task) = cell.get() {
                break *task;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let (mut at, mut latencies, mut polls) = (Vec::new(), Vec::new(), Vec::new());
        let started = Instant::now();
        while latencies.len() < items as usize {
            let poll = Instant::now();
            let count: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE stream_id = $1 AND event_type = 'item_completed'",
            )
            .bind(task.as_uuid())
            .fetch_one(&mut *conn)
            .await?;
            let now = Instant::now();
            polls.push(now - poll);
            while let Ok(completion) = completed.try_recv() {
                at.push(completion);
            }
            for k in latencies.len()..usize::try_from(count)? {
                let completion = at
                    .get(k)
                    .ok_or_else(|| anyhow::anyhow!("item {k} readable before it completed"))?;
                latencies.push(now - *completion);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the reader never saw every item"
            );
        }
        anyhow::Ok((latencies, polls))
    });
    let task = lone_task(store).await?;
    task_cell.set(task)?;
    lone_claimed_run(store, task, items, false, move |_, ended| {
        let _ = done.send(ended);
    })
    .await?;
    let (latencies, polls) = reader.await??;
    report.add(
        "lone item: completion -> readable by a polling reader p50 (incl. one poll)",
        percentile(latencies.clone(), 0.5),
        "ms",
    );
    report.add(
        "lone item: completion -> readable by a polling reader p95",
        percentile(latencies, 0.95),
        "ms",
    );
    report.add(
        "lone item: the reader's own poll p50",
        percentile(polls, 0.5),
        "ms",
    );
    Ok(())
}

async fn lone_task(store: &PgStore) -> anyhow::Result<TaskId> {
    Ok(store
        .create_task(NewTask::new("lone", ChannelId::parse("bench")?, json!({})))
        .await?
        .task_id())
}

/// A task of `items` items that each [`pause`] (so each completion is alone), calling
/// `stamp(started, ended)` as each item ends.
async fn lone_run(
    store: &PgStore,
    items: u32,
    busy: bool,
    stamp: impl Fn(Instant, Instant) + Clone + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let task = lone_task(store).await?;
    lone_claimed_run(store, task, items, busy, stamp).await
}

/// An item's work before its completion: 20 ms asleep (the machine goes idle, and waking
/// it is part of what follows), or 6 ms of busy work (it stays awake). The step is not
/// pipelined, so each completion is durable before the next item starts.
async fn pause(busy: bool) {
    if busy {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(6) {
            std::hint::spin_loop();
        }
    } else {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn lone_claimed_run(
    store: &PgStore,
    task: TaskId,
    items: u32,
    busy: bool,
    stamp: impl Fn(Instant, Instant) + Clone + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let workflow = Workflow::new("lone").step(Step::fan_out(
        "clips",
        move |_| Ok(items),
        move |_ctx: StepContext, item| {
            let stamp = stamp.clone();
            async move {
                let started = Instant::now();
                pause(busy).await;
                stamp(started, Instant::now());
                Ok(ItemOutput::new(format!("clip-{item}"), 0))
            }
        },
    ));
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let lease = claim(store, task).await?;
    let outcome = orchestrator.run(&lease, CancellationToken::new()).await?;
    anyhow::ensure!(outcome == RunOutcome::Completed, "unexpected {outcome:?}");
    Ok(())
}

pub(crate) async fn claim(store: &PgStore, task: TaskId) -> anyhow::Result<Lease> {
    store
        .claim_task(task, "bench", Duration::from_secs(60))
        .await?
        .ok_or_else(|| anyhow::anyhow!("task {task} not claimable"))
}

fn completion(step: &str, item: u32, attempt: u32) -> Event {
    Event::ItemCompleted {
        step: step.to_owned(),
        item,
        attempt,
        artifact: format!("{step}/{item:03}.bin"),
        cost_micros: 550_000,
        duration_ms: 300_000,
        output: None,
    }
}

/// A long stream: steps of 100 events (a step_started and 99 completions).
fn long_history(task: TaskId, events: usize) -> Vec<Event> {
    (0..events)
        .map(|i| {
            let step = format!("step-{}", i / 100);
            match i % 100 {
                0 => Event::StepStarted {
                    step,
                    attempt: 1,
                    items: 99,
                    atomic: false,
                },
                n => completion(&step, n as u32, 1),
            }
        })
        .enumerate()
        .map(|(i, e)| if i == 0 { submitted(task) } else { e })
        .collect()
}

fn submitted(_task: TaskId) -> Event {
    Event::TaskSubmitted {
        workflow: "bench".into(),
        channel_id: ChannelId::parse("bench").expect("valid channel"),
        input: json!({}),
        notion_page_id: None,
        idempotency_key: None,
        workflow_version: None,
    }
}

/// The fold alone over a long in-memory stream, then read + decode + fold from PostgreSQL.
async fn fold_speed(report: &mut Report, store: &PgStore, events: usize) -> anyhow::Result<()> {
    let task = new_task(store).await?;
    let history = long_history(task, events);
    let stream: Vec<RecordedEvent> = history
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, e)| RecordedEvent::in_memory(task, i as u32 + 1, e))
        .collect();
    let started = Instant::now();
    let state = fold(&stream);
    let fold_ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        state.version as usize == events,
        "fold must apply every event"
    );
    report.add(
        format!("fold of a {events}-event stream (in memory)"),
        fold_ms,
        "ms",
    );

    // The same stream stored: appended in batches of 1,000 (task_submitted is version 1).
    let mut version = 1;
    for chunk in history[1..].chunks(1000) {
        let batch: Vec<NewEvent> = chunk.iter().cloned().map(NewEvent::new).collect();
        version = store
            .append(task, version, Fence::Unleased, &batch)
            .await?
            .version;
    }
    let started = Instant::now();
    let stored = store.read_stream(task, 1).await?;
    let state = fold(&stored);
    let replay_ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        state.version as usize == events,
        "replay must apply every event"
    );
    report.add(
        format!("read + decode + fold of a {events}-event stream"),
        replay_ms,
        "ms",
    );
    Ok(())
}

/// The video pipeline failed at clip 7 and is claimed again: fold its history and work out
/// what each step still has to run.
fn resume_decision(report: &mut Report, iterations: u32) {
    let task = TaskId::new();
    let mut events = vec![
        submitted(task),
        Event::TaskClaimed {
            worker_id: "w".into(),
            lease_epoch: 1,
            attempt: 1,
        },
        Event::StepStarted {
            step: "assets".into(),
            attempt: 1,
            items: 22,
            atomic: false,
        },
    ];
    events.extend((1..=22).map(|i| completion("assets", i, 1)));
    events.push(Event::StepCompleted {
        step: "assets".into(),
        attempt: 1,
    });
    events.push(Event::StepStarted {
        step: "composites".into(),
        attempt: 1,
        items: 1,
        atomic: true,
    });
    events.push(completion("composites", 1, 1));
    events.push(Event::StepCompleted {
        step: "composites".into(),
        attempt: 1,
    });
    events.push(Event::StepStarted {
        step: "video".into(),
        attempt: 1,
        items: 18,
        atomic: false,
    });
    events.extend((1..=6).map(|i| completion("video", i, 1)));
    events.push(Event::TaskClaimed {
        worker_id: "w".into(),
        lease_epoch: 2,
        attempt: 2,
    });
    let stream: Vec<RecordedEvent> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| RecordedEvent::in_memory(task, i as u32 + 1, e))
        .collect();
    let plan = [
        ("assets", 22),
        ("composites", 1),
        ("video", 18),
        ("narration", 18),
        ("sfx", 18),
        ("assembly", 1),
    ];

    let started = Instant::now();
    let mut to_run = 0;
    for _ in 0..iterations {
        let state = fold(std::hint::black_box(&stream));
        for (step, planned) in plan {
            to_run += state
                .step(step)
                .map_or(planned, |s| s.missing_items(planned).len() as u32);
        }
    }
    let per_decision = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
    assert_eq!(
        to_run,
        iterations * (12 + 18 + 18 + 1),
        "the decision must find clips 7-18 and the later steps"
    );
    report.add(
        "resume decision, 18-clip task failed at clip 7",
        per_decision,
        "us",
    );
}
