//! A task's timeline drawn as SVG: a lane per step and attempt (and one for the task's
//! own moments), a bar per item per attempt from its start to its completion, failed
//! tries, the items a resume skipped (with what they had cost), job waits, parks and the
//! review. Each mark names its event's version: clicking it shows that event.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use engine::{Event, RecordedEvent, ResumeRecord};
use maud::{Markup, html};

use crate::cli::money;

const WIDTH: f64 = 1100.0;
const LABELS: f64 = 170.0;
const LANE: f64 = 24.0;
const TOP: f64 = 22.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Done,
    Failed,
    Skipped,
    Waiting,
    Parked,
    Review,
    Claimed,
}

impl Kind {
    fn class(self) -> &'static str {
        match self {
            Kind::Done => "mark done",
            Kind::Failed => "mark failed",
            Kind::Skipped => "mark skipped",
            Kind::Waiting => "mark waiting",
            Kind::Parked => "mark parked",
            Kind::Review => "mark review",
            Kind::Claimed => "mark claimed",
        }
    }
}

#[derive(Debug)]
struct Mark {
    lane: usize,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    kind: Kind,
    version: u32,
    title: String,
}

/// The lanes and marks of `events` (in version order).
struct Drawing {
    lanes: Vec<String>,
    marks: Vec<Mark>,
}

impl Drawing {
    fn lane(&mut self, index: &mut HashMap<String, usize>, name: String) -> usize {
        if let Some(&lane) = index.get(&name) {
            return lane;
        }
        self.lanes.push(name.clone());
        index.insert(name, self.lanes.len() - 1);
        self.lanes.len() - 1
    }
}

fn draw(events: &[RecordedEvent], resumes: &[ResumeRecord]) -> Drawing {
    let mut drawing = Drawing {
        lanes: vec!["task".to_owned()],
        marks: Vec::new(),
    };
    let mut index: HashMap<String, usize> = HashMap::from([("task".to_owned(), 0)]);
    // What each step's items had completed (cost, attempt, start, end): a later attempt
    // skips them.
    type Done = (i64, u32, DateTime<Utc>, DateTime<Utc>);
    let mut completed: BTreeMap<(String, u32), Done> = BTreeMap::new();
    let mut step_order: Vec<String> = Vec::new();
    let mut submitted: HashMap<(String, u32), DateTime<Utc>> = HashMap::new();
    let mut resumed: HashSet<u32> = HashSet::new();
    // The park drawn last, until the task's next claim (or end) cuts it short.
    let mut open_park: Option<usize> = None;
    for recorded in events {
        if let Some(park) = open_park
            && matches!(
                recorded.event,
                Event::TaskClaimed { .. }
                    | Event::TaskCancelled { .. }
                    | Event::TaskFailed { .. }
                    | Event::TaskCompleted { .. }
            )
        {
            let mark = &mut drawing.marks[park];
            mark.end = mark.end.min(recorded.recorded_at).max(mark.start);
            open_park = None;
        }
        let at = recorded.recorded_at;
        let v = recorded.version;
        match &recorded.event {
            Event::TaskClaimed {
                attempt, worker_id, ..
            } => {
                drawing.marks.push(Mark {
                    lane: 0,
                    start: at,
                    end: at,
                    kind: Kind::Claimed,
                    version: v,
                    title: format!("attempt {attempt} claimed by {worker_id}"),
                });
                // What this attempt resumed past: the items it skipped, in its own lanes
                // (once: a parked attempt is claimed again, and skips nothing more).
                let first_claim = resumed.insert(*attempt);
                for resume in resumes
                    .iter()
                    .filter(|r| first_claim && r.attempt == *attempt)
                {
                    for (step, items) in &resume.skipped {
                        let lane = drawing.lane(&mut index, format!("{step} · attempt {attempt}"));
                        for item in items {
                            // Drawn where the item had run: the work this attempt did not redo.
                            let (cost, done_in, start, end) = completed
                                .get(&(step.clone(), *item))
                                .copied()
                                .unwrap_or((0, 0, at, at));
                            drawing.marks.push(Mark {
                                lane,
                                start,
                                end,
                                kind: Kind::Skipped,
                                version: v,
                                title: format!(
                                    "{step} {item}: skipped, done in attempt {done_in} (saved {})",
                                    money(cost)
                                ),
                            });
                        }
                    }
                }
            }
            Event::StepStarted { step, .. } if !step_order.contains(step) => {
                step_order.push(step.clone());
            }
            Event::ItemSubmitted { step, item, .. } => {
                submitted.insert((step.clone(), *item), at);
            }
            Event::ItemCompleted {
                step,
                item,
                attempt,
                cost_micros,
                duration_ms,
                ..
            } => {
                let lane = drawing.lane(&mut index, format!("{step} · attempt {attempt}"));
                let ran = chrono::Duration::milliseconds(i64::try_from(*duration_ms).unwrap_or(0));
                let (start, kind) = match submitted.remove(&(step.clone(), *item)) {
                    Some(sent) => (sent, Kind::Waiting),
                    None => (at - ran, Kind::Done),
                };
                drawing.marks.push(Mark {
                    lane,
                    start,
                    end: at,
                    kind,
                    version: v,
                    title: format!(
                        "{step} {item}: done in {:.1}s, {}",
                        *duration_ms as f64 / 1e3,
                        money(*cost_micros)
                    ),
                });
                completed.insert((step.clone(), *item), (*cost_micros, *attempt, start, at));
            }
            Event::ItemFailed {
                step,
                item,
                attempt,
                error,
                ..
            } => {
                let lane = drawing.lane(&mut index, format!("{step} · attempt {attempt}"));
                drawing.marks.push(Mark {
                    lane,
                    start: at,
                    end: at,
                    kind: Kind::Failed,
                    version: v,
                    title: format!(
                        "{step} {item} failed: {}",
                        engine::truncate_for_display(error, 200)
                    ),
                });
            }
            Event::TaskParked { until, .. } => {
                open_park = Some(drawing.marks.len());
                drawing.marks.push(Mark {
                    lane: 0,
                    start: at,
                    end: (*until).max(at),
                    kind: Kind::Parked,
                    version: v,
                    title: format!("parked until {}", until.format("%H:%M:%S")),
                });
            }
            Event::ReviewRequested {} => drawing.marks.push(Mark {
                lane: 0,
                start: at,
                end: at,
                kind: Kind::Review,
                version: v,
                title: "review requested".to_owned(),
            }),
            Event::ReviewApproved { .. } => drawing.marks.push(Mark {
                lane: 0,
                start: at,
                end: at,
                kind: Kind::Review,
                version: v,
                title: "approved".to_owned(),
            }),
            Event::ReviewRejected { redo_from, .. } => {
                // The redone steps' completions no longer count as skipped later.
                if let Some(from) = step_order.iter().position(|s| s == redo_from) {
                    let redone: Vec<String> = step_order[from..].to_vec();
                    completed.retain(|(s, _), _| !redone.contains(s));
                }
                drawing.marks.push(Mark {
                    lane: 0,
                    start: at,
                    end: at,
                    kind: Kind::Review,
                    version: v,
                    title: format!("rejected: redo from {redo_from}"),
                });
            }
            _ => {}
        }
    }
    drawing
}

/// The timeline of `events` as an `<svg>`; `now` ends the axis of a task still running.
pub(crate) fn timeline(
    events: &[RecordedEvent],
    resumes: &[ResumeRecord],
    now: Option<DateTime<Utc>>,
) -> Markup {
    let mut drawing = draw(events, resumes);
    // Short marks (a failed try, a claim, the review) go on top of the bars they fall
    // within: each stays visible and clickable.
    drawing
        .marks
        .sort_by_key(|m| matches!(m.kind, Kind::Failed | Kind::Review | Kind::Claimed));
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return html! { p { "No events." } };
    };
    let t0 = first.recorded_at;
    // The axis ends at the last event (now, for a task still running); a park still open
    // is drawn up to there, its end in its title.
    let mut t1 = now.map_or(last.recorded_at, |now| now.max(last.recorded_at));
    for mark in &mut drawing.marks {
        mark.end = mark.end.min(t1).max(mark.start);
    }
    if t1 <= t0 {
        t1 = t0 + chrono::Duration::milliseconds(1);
    }
    let span = (t1 - t0).num_microseconds().unwrap_or(1).max(1) as f64;
    let x = |t: DateTime<Utc>| {
        LABELS + ((t - t0).num_microseconds().unwrap_or(0) as f64 / span) * (WIDTH - LABELS - 10.0)
    };
    // Marks that overlap in a lane (items running at once) take rows of their own.
    let placed = pack(&drawing, &x);
    let mut lane_top = Vec::with_capacity(drawing.lanes.len());
    let mut y = TOP;
    for rows in &placed.rows {
        lane_top.push(y);
        y += lane_height(*rows);
    }
    let height = y + 6.0;
    let seconds = span / 1e6;
    html! {
        svg.timeline xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(height)
            viewBox=(format!("0 0 {WIDTH} {height}")) role="img"
            aria-label="the task's timeline" {
            text x=(LABELS) y="14" class="axis" { "0 s" }
            text x=(WIDTH - 10.0) y="14" class="axis" text-anchor="end" { (format!("{seconds:.1} s")) }
            @for (i, lane) in drawing.lanes.iter().enumerate() {
                @let y = lane_top[i];
                rect class="lane" x="0" y=(y) width=(WIDTH) height=(lane_height(placed.rows[i])) {}
                text class="lane-name" x="6" y=(y + 16.0) { (lane) }
            }
            @for (mark, row) in drawing.marks.iter().zip(&placed.row) {
                @let rows = placed.rows[mark.lane];
                @let h = row_height(rows);
                @let y = lane_top[mark.lane] + 4.0 + h * *row as f64;
                @let left = x(mark.start);
                @let w = (x(mark.end) - left).max(4.0);
                rect class=(mark.kind.class()) x=(format!("{left:.1}")) y=(format!("{y:.1}"))
                    width=(format!("{w:.1}")) height=(format!("{:.1}", (h - 1.0).max(2.0)))
                    data-v=(mark.version) {
                    title { (mark.title) }
                }
            }
        }
    }
}

/// Where each mark goes within its lane: `row[i]` for mark i, `rows[lane]` per lane.
struct Placed {
    row: Vec<usize>,
    rows: Vec<usize>,
}

/// Greedy interval packing, per lane, in pixels: a mark takes the first row whose last
/// mark ends before it starts.
fn pack(drawing: &Drawing, x: &dyn Fn(DateTime<Utc>) -> f64) -> Placed {
    let mut row = vec![0; drawing.marks.len()];
    let mut ends: Vec<Vec<f64>> = vec![Vec::new(); drawing.lanes.len()];
    let mut order: Vec<usize> = (0..drawing.marks.len()).collect();
    order.sort_by(|&a, &b| drawing.marks[a].start.cmp(&drawing.marks[b].start));
    for i in order {
        let mark = &drawing.marks[i];
        let left = x(mark.start);
        let right = left + (x(mark.end) - left).max(4.0);
        let lane = &mut ends[mark.lane];
        // Claims, reviews and parks share the task lane's one row.
        let found = if mark.lane == 0 {
            Some(0)
        } else {
            lane.iter().position(|&end| end < left)
        };
        let r = found.unwrap_or(lane.len());
        if r == lane.len() {
            lane.push(right);
        } else {
            lane[r] = lane[r].max(right);
        }
        row[i] = r;
    }
    Placed {
        row,
        rows: ends.iter().map(|e| e.len().max(1)).collect(),
    }
}

/// A row's height in a lane of `rows` rows: lanes grow, rows thin down to 4 px.
fn row_height(rows: usize) -> f64 {
    ((LANE - 8.0) / rows as f64).max(4.0)
}

fn lane_height(rows: usize) -> f64 {
    (row_height(rows) * rows as f64 + 8.0).max(LANE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::{TaskId, fold};

    fn claimed(attempt: u32) -> Event {
        Event::TaskClaimed {
            worker_id: "w".into(),
            lease_epoch: i64::from(attempt),
            attempt,
        }
    }

    fn done(item: u32, attempt: u32) -> Event {
        Event::ItemCompleted {
            step: "video".into(),
            item,
            attempt,
            artifact: format!("video/{item}.mp4"),
            cost_micros: 550_000,
            duration_ms: 1_000,
            output: None,
        }
    }

    /// Events a second apart from the epoch.
    fn history(events: Vec<Event>) -> Vec<RecordedEvent> {
        let mut history = RecordedEvent::in_memory_stream(TaskId::new(), events);
        for (i, recorded) in history.iter_mut().enumerate() {
            recorded.recorded_at = DateTime::UNIX_EPOCH + chrono::Duration::seconds(i as i64);
        }
        history
    }

    #[test]
    fn a_resume_skips_once_however_often_its_attempt_is_claimed_and_parks_end_at_the_next_claim() {
        let far = DateTime::UNIX_EPOCH + chrono::Duration::hours(10);
        let events = history(vec![
            claimed(1),
            Event::StepStarted {
                step: "video".into(),
                attempt: 1,
                items: 3,
                atomic: false,
            },
            done(1, 1),
            done(2, 1),
            claimed(2),
            Event::TaskParked {
                until: far,
                jobs: 1,
                waiting: 0,
                schedule: Vec::new(),
            },
            claimed(2),
            done(3, 2),
        ]);
        let state = fold(&events);
        let drawing = draw(&events, &state.resumes);
        let skipped: Vec<&Mark> = drawing
            .marks
            .iter()
            .filter(|m| m.kind == Kind::Skipped)
            .collect();
        assert_eq!(skipped.len(), 2, "items 1 and 2, once: {skipped:?}");
        assert!(
            skipped[0]
                .title
                .starts_with("video 1: skipped, done in attempt 1")
        );
        // Drawn where they had run, in attempt 2's lane.
        assert_eq!(drawing.lanes[skipped[0].lane], "video · attempt 2");
        assert_eq!(skipped[0].end, events[2].recorded_at);
        let park = drawing
            .marks
            .iter()
            .find(|m| m.kind == Kind::Parked)
            .expect("the park");
        assert_eq!(park.end, events[6].recorded_at, "cut at the next claim");
        // The axis is the task's own: 7 s, not the park's 10 hours.
        let svg = timeline(&events, &state.resumes, None).into_string();
        assert!(svg.contains(">7.0 s<"), "{svg}");
    }
}
