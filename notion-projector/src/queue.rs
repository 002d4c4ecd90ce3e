//! What the projector sends next: fresh changes (the log's newest statuses, in log order)
//! and retries waiting for their due time, sharing one request budget fairly.
//!
//! A retry waits here, not in a request slot, so fresh changes keep going out at the full
//! rate while a page keeps failing. When both kinds are ready they take turns, so neither
//! starves the other. One task has at most one request in flight, which keeps its page's
//! statuses in order. The queue is pure (no clock, no I/O): the caller passes the time.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use engine::TaskId;
use tokio::time::Instant;

use crate::page_id::PageId;
use crate::projector::Target;

/// Where a job came from: a fresh change counts towards the batch whose checkpoint waits
/// for its first try; a retry is already recorded in `sync_retries` (or `sync_failures`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Fresh,
    Retry,
}

/// A status to send to one page, or (page `None`) a card to find or create on the board
/// for a task that has no page yet.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub(crate) target: Target,
    pub(crate) page: Option<PageId>,
    /// The page is the task's card on the board (made by the projector, or taken in by
    /// intake): every PATCH also sets its Task ID, so a Task ID not yet written (a crash
    /// right after intake's submit) or cleared on the board is owed like the status.
    pub(crate) card: bool,
    /// Failed tries so far.
    pub(crate) tries: u32,
    /// The batch whose checkpoint waits for this job's first try (fresh jobs until then).
    pub(crate) batch: Option<u64>,
    /// Looks for a card made by another projector so far (each waits longer).
    pub(crate) waits: u32,
    /// An earlier request for the task got no clear answer and Notion may still apply it
    /// until then: a success before then is followed by one more send of the newest status.
    pub(crate) unsettled_until: Option<Instant>,
    pub(crate) origin: Origin,
    /// The trace the task's submit stored (`None`: the one derived from the task id).
    pub(crate) trace: Option<engine::telemetry::TraceContext>,
}

impl Job {
    pub(crate) fn fresh(target: Target, page: PageId) -> Job {
        Job {
            target,
            page: Some(page),
            card: false,
            tries: 0,
            batch: None,
            waits: 0,
            unsettled_until: None,
            origin: Origin::Fresh,
            trace: None,
        }
    }

    /// The task's card on the board, then its status.
    pub(crate) fn card(target: Target) -> Job {
        Job {
            target,
            page: None,
            card: true,
            tries: 0,
            batch: None,
            waits: 0,
            unsettled_until: None,
            origin: Origin::Fresh,
            trace: None,
        }
    }

    /// Takes on `until` if it is later than the job's own.
    pub(crate) fn unsettled_until(&mut self, until: Option<Instant>) {
        self.unsettled_until = self.unsettled_until.max(until);
    }

    pub(crate) fn task(&self) -> TaskId {
        self.target.task
    }
}

/// Fresh jobs and due retries; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct SendQueue {
    fresh: VecDeque<Job>,
    /// Retries by due time (the task breaks ties), and each waiting task's due time.
    retries: BTreeMap<(Instant, TaskId), Job>,
    retry_due: HashMap<TaskId, Instant>,
    in_flight: HashSet<TaskId>,
    /// Whether a retry goes next when a retry and a fresh job are both ready.
    retry_turn: bool,
}

impl SendQueue {
    /// Queues a fresh change. A newer status replaces the task's waiting retry (its
    /// `sync_retries` row stays until this job settles it). When a fresh job of the task
    /// waits already (read in an earlier batch, not sent yet), that job takes the newer
    /// status and this one is not queued (false): its batch need not wait for it, as it
    /// commits after the earlier batch, which still waits for that job's try.
    pub(crate) fn push_fresh(&mut self, mut job: Job) -> bool {
        if let Some(retry) = self.remove_retry(job.task()) {
            job.unsettled_until(retry.unsettled_until);
        }
        // A job in `fresh` is never in flight (sending takes it out).
        match self
            .fresh
            .iter_mut()
            .find(|queued| queued.task() == job.task())
        {
            Some(queued) => {
                queued.unsettled_until(job.unsettled_until);
                if job.target.version > queued.target.version {
                    queued.target = job.target;
                    if job.page.is_some() {
                        queued.page = job.page;
                        queued.card = job.card;
                    }
                }
                false
            }
            None => {
                self.fresh.push_back(job);
                true
            }
        }
    }

    /// Puts a fresh job back at the head of the line (after a 429: not a try).
    pub(crate) fn push_fresh_front(&mut self, job: Job) {
        self.fresh.push_front(job);
    }

    /// Queues a retry due at `due`; false (and dropped) when a fresh change of the task is
    /// queued, which sends its newest status anyway (and takes on what the retry owes).
    pub(crate) fn push_retry(&mut self, mut job: Job, due: Instant) -> bool {
        let task = job.task();
        if let Some(fresh) = self.fresh.iter_mut().find(|f| f.task() == task) {
            fresh.unsettled_until(job.unsettled_until);
            return false;
        }
        if let Some(waiting) = self.remove_retry(task) {
            job.unsettled_until(waiting.unsettled_until);
        }
        self.retry_due.insert(task, due);
        self.retries.insert((due, task), job);
        true
    }

    /// Whether the task waits here or has a request in flight.
    pub(crate) fn contains(&self, task: TaskId) -> bool {
        self.in_flight.contains(&task)
            || self.retry_due.contains_key(&task)
            || self.fresh.iter().any(|f| f.task() == task)
    }

    /// The next job to send at `now`, marked in flight until [`SendQueue::finish`]: fresh
    /// changes in log order and due retries in due order, taking turns when both are ready.
    pub(crate) fn pop_ready(&mut self, now: Instant) -> Option<Job> {
        let fresh = self
            .fresh
            .iter()
            .position(|job| !self.in_flight.contains(&job.task()));
        let retry = self.first_due_retry(now);
        let take_retry = match (fresh, retry) {
            (None, None) => return None,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some(_), Some(_)) => self.retry_turn,
        };
        let job = if take_retry {
            let key = retry?;
            self.retry_due.remove(&key.1);
            self.retries.remove(&key)?
        } else {
            self.fresh.remove(fresh?)?
        };
        // Whichever kind went, the other one is next when both are ready.
        self.retry_turn = !take_retry;
        self.in_flight.insert(job.task());
        Some(job)
    }

    /// Whether [`SendQueue::pop_ready`] would return a job at `now`.
    pub(crate) fn has_ready(&self, now: Instant) -> bool {
        self.fresh
            .iter()
            .any(|job| !self.in_flight.contains(&job.task()))
            || self.first_due_retry(now).is_some()
    }

    /// The earliest due time of a waiting retry that may go then (its task has no request
    /// in flight), if any.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.retries
            .keys()
            .find(|(_, task)| !self.in_flight.contains(task))
            .map(|(due, _)| *due)
    }

    /// The task's request is answered: its next job may go.
    pub(crate) fn finish(&mut self, task: TaskId) {
        self.in_flight.remove(&task);
    }

    /// After the task's page was set to `version`: drops its queued fresh job if that
    /// carries no newer status, and returns it.
    pub(crate) fn drop_fresh_covered(&mut self, task: TaskId, version: u32) -> Option<Job> {
        let covered = self
            .fresh
            .iter()
            .position(|job| job.task() == task && job.target.version <= version);
        covered.and_then(|i| self.fresh.remove(i))
    }

    /// Retries waiting for their due time.
    pub(crate) fn waiting_retries(&self) -> usize {
        self.retries.len()
    }

    fn first_due_retry(&self, now: Instant) -> Option<(Instant, TaskId)> {
        self.retries
            .keys()
            .take_while(|(due, _)| *due <= now)
            .find(|(_, task)| !self.in_flight.contains(task))
            .copied()
    }

    fn remove_retry(&mut self, task: TaskId) -> Option<Job> {
        let due = self.retry_due.remove(&task)?;
        self.retries.remove(&(due, task))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use engine::TaskStatus;

    use super::*;

    fn job(n: u128, version: u32) -> Job {
        let target = Target {
            task: TaskId::from(uuid::Uuid::from_u128(n)),
            version,
            status: TaskStatus::QUEUED,
            display: Arc::from("Queued"),
            position: i64::from(version),
        };
        let page = PageId::parse(&uuid::Uuid::from_u128(n).to_string()).expect("page id");
        Job::fresh(target, page)
    }

    fn task(n: u128) -> TaskId {
        TaskId::from(uuid::Uuid::from_u128(n))
    }

    fn retry(n: u128, version: u32) -> Job {
        Job {
            tries: 1,
            origin: Origin::Retry,
            ..job(n, version)
        }
    }

    #[test]
    fn a_waiting_retry_holds_no_place_in_line() {
        let now = Instant::now();
        let mut queue = SendQueue::default();
        assert!(queue.push_retry(retry(1, 2), now + Duration::from_secs(4)));
        for n in 2..5 {
            queue.push_fresh(job(n, 2));
        }
        let sent: Vec<TaskId> = std::iter::from_fn(|| queue.pop_ready(now))
            .map(|j| j.task())
            .collect();
        assert_eq!(
            sent,
            vec![task(2), task(3), task(4)],
            "fresh changes go first"
        );
        assert!(!queue.has_ready(now));
        assert_eq!(queue.next_due(), Some(now + Duration::from_secs(4)));
        let later = now + Duration::from_secs(4);
        assert_eq!(queue.pop_ready(later).map(|j| j.task()), Some(task(1)));
    }

    #[test]
    fn retries_and_fresh_changes_take_turns() {
        let now = Instant::now();
        let mut queue = SendQueue::default();
        for n in 100..110 {
            queue.push_retry(retry(n, 2), now);
        }
        for n in 1..4 {
            queue.push_fresh(job(n, 2));
        }
        let kinds: Vec<Origin> = std::iter::from_fn(|| queue.pop_ready(now))
            .map(|j| j.origin)
            .take(6)
            .collect();
        assert_eq!(
            kinds,
            vec![
                Origin::Fresh,
                Origin::Retry,
                Origin::Fresh,
                Origin::Retry,
                Origin::Fresh,
                Origin::Retry
            ],
            "a storm of retries cannot starve fresh changes, nor they the retries"
        );
    }

    #[test]
    fn a_newer_status_replaces_the_pending_retry() {
        let now = Instant::now();
        let mut queue = SendQueue::default();
        queue.push_retry(retry(1, 2), now);
        queue.push_fresh(job(1, 5));
        let sent: Vec<Job> = std::iter::from_fn(|| queue.pop_ready(now)).collect();
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0].target.version, sent[0].origin), (5, Origin::Fresh));
        // And a retry of a task whose newer status is queued is dropped.
        let mut queue = SendQueue::default();
        queue.push_fresh(job(1, 5));
        assert!(!queue.push_retry(retry(1, 4), now));
        assert_eq!(queue.waiting_retries(), 0);
    }

    #[test]
    fn one_request_per_task_at_a_time() {
        let now = Instant::now();
        let mut queue = SendQueue::default();
        queue.push_retry(retry(1, 2), now);
        let in_flight = queue.pop_ready(now).expect("the retry");
        queue.push_fresh(job(1, 3));
        assert!(
            queue.pop_ready(now).is_none(),
            "waits for the retry's answer"
        );
        assert!(queue.contains(task(1)));
        queue.finish(in_flight.task());
        // The retry set the page to version 3 already: the fresh job has nothing newer.
        assert!(queue.drop_fresh_covered(task(1), 3).is_some());
        assert!(!queue.contains(task(1)));
        queue.push_fresh(job(1, 4));
        assert!(queue.drop_fresh_covered(task(1), 3).is_none());
        assert_eq!(queue.pop_ready(now).map(|j| j.target.version), Some(4));
    }

    #[test]
    fn what_a_retry_owes_passes_to_the_job_that_replaces_it() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut queue = SendQueue::default();
        let mut unsettled = retry(1, 2);
        unsettled.unsettled_until(Some(later));
        queue.push_retry(unsettled.clone(), now);
        queue.push_fresh(job(1, 3));
        let sent = queue.pop_ready(now).expect("the fresh job");
        assert_eq!(sent.unsettled_until, Some(later));
        // And a retry dropped for a queued fresh job hands it over too.
        let mut queue = SendQueue::default();
        queue.push_fresh(job(1, 3));
        assert!(!queue.push_retry(unsettled, now));
        assert_eq!(
            queue.pop_ready(now).and_then(|j| j.unsettled_until),
            Some(later)
        );
    }

    #[test]
    fn a_newer_status_read_later_joins_the_waiting_fresh_job() {
        let now = Instant::now();
        let mut queue = SendQueue::default();
        let in_batch = |n, version, batch| Job {
            batch: Some(batch),
            ..job(n, version)
        };
        assert!(queue.push_fresh(in_batch(1, 2, 1)));
        assert!(queue.push_fresh(in_batch(2, 2, 1)));
        // Batch 2 holds a newer status of task 1: the waiting job sends it, and batch 2
        // does not wait for a job of its own.
        assert!(!queue.push_fresh(in_batch(1, 5, 2)));
        let first = queue.pop_ready(now).expect("task 1");
        assert_eq!((first.target.version, first.batch), (5, Some(1)));
        // While task 1's request is in flight, a newer status gets a job of its own.
        assert!(queue.push_fresh(in_batch(1, 6, 3)));
        let second = queue.pop_ready(now).expect("task 2");
        assert_eq!(second.task(), task(2));
        assert!(
            queue.pop_ready(now).is_none(),
            "task 1 has a request in flight"
        );
    }
}
