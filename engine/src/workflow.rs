//! Defining workflows: an ordered list of steps, each itemized or atomic.
//!
//! ```no_run
//! use engine::prelude::*;
//!
//! let workflow = Workflow::new("greetings")
//!     .step(Step::items("hello", TaskStatus::GeneratingAssets,
//!         |_input| Ok(3),
//!         |ctx: StepContext, item| async move {
//!             Ok(ItemOutput::new(format!("{}/hello-{item}.txt", ctx.task_id), 1_000))
//!         }))
//!     .step(Step::once("bye", TaskStatus::Assembling, |_ctx: StepContext| async move {
//!         Ok(ItemOutput::new("bye.txt", 0))
//!     }));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::event::FailureKind;
use crate::id::{ChannelId, TaskId, truncate_for_display};
use crate::status::TaskStatus;

/// The longest step error message stored in the log.
pub const ERROR_MESSAGE_MAX_CHARS: usize = 500;

/// What running one item produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemOutput {
    /// Where the result lives (a path or URL); recorded in `item_completed`.
    pub artifact: String,
    /// What the provider charged, in micro-dollars.
    pub cost_micros: i64,
}

impl ItemOutput {
    /// An output with its artifact and cost.
    pub fn new(artifact: impl Into<String>, cost_micros: i64) -> Self {
        ItemOutput {
            artifact: artifact.into(),
            cost_micros,
        }
    }
}

/// A step's failure, classified: the classification decides retry or fail, and is
/// recorded in the log (`item_failed.kind`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct StepError {
    pub kind: FailureKind,
    pub message: String,
}

impl StepError {
    /// Timeouts, 429, 5xx: retried with backoff, then the task is rescheduled.
    pub fn transient(message: impl AsRef<str>) -> Self {
        Self::new(FailureKind::Transient, message.as_ref())
    }

    /// Bad input, 4xx: the task fails with this reason.
    pub fn permanent(message: impl AsRef<str>) -> Self {
        Self::new(FailureKind::Permanent, message.as_ref())
    }

    fn new(kind: FailureKind, message: &str) -> Self {
        StepError {
            kind,
            message: truncate_for_display(message, ERROR_MESSAGE_MAX_CHARS),
        }
    }
}

/// Exponential backoff with jitter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub multiplier: f64,
    pub max: Duration,
    /// 0.0 = none; 0.2 = the delay is drawn from ±20% around the nominal value.
    pub jitter: f64,
}

impl Backoff {
    /// The delay before retry number `retry` (1 = the first retry); `unit` in [0, 1) picks
    /// the point in the jitter band, so this stays a pure function.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let nominal = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = nominal.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 + self.jitter * (2.0 * unit - 1.0));
        Duration::from_secs_f64(jittered.clamp(0.0, self.max.as_secs_f64()))
    }
}

/// How often an item is tried within one task attempt, and how long to wait between tries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Tries per item per task attempt (1 = no in-process retry).
    pub max_tries: u32,
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_tries: 3,
            backoff: Backoff {
                initial: Duration::from_secs(1),
                multiplier: 2.0,
                max: Duration::from_secs(30),
                jitter: 0.2,
            },
        }
    }
}

/// When a task attempt gives up: how many attempts a task gets, and how long until the next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskRetryPolicy {
    /// Attempts (claims) before the task fails for good.
    pub max_attempts: u32,
    pub backoff: Backoff,
}

impl Default for TaskRetryPolicy {
    fn default() -> Self {
        TaskRetryPolicy {
            max_attempts: 5,
            backoff: Backoff {
                initial: Duration::from_secs(30),
                multiplier: 2.0,
                max: Duration::from_secs(3600),
                jitter: 0.2,
            },
        }
    }
}

/// What a step's code gets to know about the item it runs.
#[derive(Clone, Debug)]
pub struct StepContext {
    pub task_id: TaskId,
    pub channel_id: ChannelId,
    pub workflow: Arc<str>,
    pub step: Arc<str>,
    /// The task attempt (1 on the first run, +1 per retry or takeover).
    pub attempt: u32,
    /// The try of this item within the attempt (1 = first try).
    pub try_number: u32,
    pub input: Arc<Value>,
    /// Cancelled when the task is cancelled, the lease is lost or the worker shuts down:
    /// long-running work should stop early.
    pub cancel: CancellationToken,
}

/// A boxed, sendable future: what a step's work returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A step's code: plans its items from the input, and runs one item.
pub trait StepWork: Send + Sync + 'static {
    /// How many items the step has for this input (deterministic). Atomic steps: 1.
    fn plan(&self, input: &Value) -> Result<u32, StepError>;

    /// Runs one item (1-based).
    fn run(&self, ctx: StepContext, item: u32) -> BoxFuture<Result<ItemOutput, StepError>>;
}

struct FnItems<P, R> {
    plan: P,
    run: R,
}

impl<P, R, Fut> StepWork for FnItems<P, R>
where
    P: Fn(&Value) -> Result<u32, StepError> + Send + Sync + 'static,
    R: Fn(StepContext, u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<ItemOutput, StepError>> + Send + 'static,
{
    fn plan(&self, input: &Value) -> Result<u32, StepError> {
        (self.plan)(input)
    }

    fn run(&self, ctx: StepContext, item: u32) -> BoxFuture<Result<ItemOutput, StepError>> {
        Box::pin((self.run)(ctx, item))
    }
}

/// One step of a workflow.
#[derive(Clone)]
pub struct Step {
    pub(crate) name: Arc<str>,
    pub(crate) status: TaskStatus,
    pub(crate) atomic: bool,
    pub(crate) work: Arc<dyn StepWork>,
    pub(crate) retry: RetryPolicy,
    pub(crate) concurrency: usize,
}

impl Step {
    /// An itemized step from its code.
    pub fn itemized(name: &str, status: TaskStatus, work: impl StepWork) -> Self {
        Step {
            name: name.into(),
            status,
            atomic: false,
            work: Arc::new(work),
            retry: RetryPolicy::default(),
            concurrency: 1,
        }
    }

    /// An atomic step (one unit of work; a failure re-runs it whole) from its code.
    pub fn atomic(name: &str, status: TaskStatus, work: impl StepWork) -> Self {
        Step {
            atomic: true,
            ..Step::itemized(name, status, work)
        }
    }

    /// An itemized step from two closures: `plan(input) -> count` and `run(ctx, item)`.
    pub fn items<P, R, Fut>(name: &str, status: TaskStatus, plan: P, run: R) -> Self
    where
        P: Fn(&Value) -> Result<u32, StepError> + Send + Sync + 'static,
        R: Fn(StepContext, u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ItemOutput, StepError>> + Send + 'static,
    {
        Step::itemized(name, status, FnItems { plan, run })
    }

    /// An atomic step from one closure.
    pub fn once<R, Fut>(name: &str, status: TaskStatus, run: R) -> Self
    where
        R: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ItemOutput, StepError>> + Send + 'static,
    {
        let work = FnItems {
            plan: |_: &Value| Ok(1),
            run: move |ctx, _item| run(ctx),
        };
        Step::atomic(name, status, work)
    }

    /// Sets the in-process retry policy for this step's items.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Runs up to `n` items at once (default 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The step's name (as stored in events).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The status shown while the step runs.
    pub fn status(&self) -> TaskStatus {
        self.status
    }
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("status", &self.status)
            .field("atomic", &self.atomic)
            .field("retry", &self.retry)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// A named, ordered list of steps, then human review.
#[derive(Clone, Debug)]
pub struct Workflow {
    pub(crate) name: String,
    pub(crate) steps: Vec<Step>,
    pub(crate) task_retry: TaskRetryPolicy,
}

impl Workflow {
    /// An empty workflow called `name` (the `workflow` of its tasks).
    pub fn new(name: impl Into<String>) -> Self {
        Workflow {
            name: name.into(),
            steps: Vec::new(),
            task_retry: TaskRetryPolicy::default(),
        }
    }

    /// Appends a step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// Sets how often and how late a task is retried after an attempt gives up.
    pub fn task_retry(mut self, policy: TaskRetryPolicy) -> Self {
        self.task_retry = policy;
        self
    }

    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The position of the step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| &*s.name == name)
    }
}

/// The workflows a worker can run, by name.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    workflows: HashMap<String, Arc<Workflow>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds (or replaces) a workflow.
    pub fn register(mut self, workflow: Workflow) -> Self {
        self.workflows
            .insert(workflow.name.clone(), Arc::new(workflow));
        self
    }

    /// The names of the registered workflows.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.workflows.keys().cloned().collect();
        names.sort();
        names
    }

    /// The workflow called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Workflow>> {
        self.workflows.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_millis(500),
            jitter: 0.0,
        };
        let delays: Vec<u128> = (1..=5).map(|r| backoff.delay(r, 0.5).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let backoff = Backoff {
            jitter: 0.2,
            ..RetryPolicy::default().backoff
        };
        assert_eq!(backoff.delay(1, 0.0), Duration::from_millis(800));
        assert!(backoff.delay(1, 0.999) <= Duration::from_millis(1200));
    }

    #[test]
    fn step_errors_are_truncated() {
        let err = StepError::transient("x".repeat(10_000));
        assert!(err.message.chars().count() <= ERROR_MESSAGE_MAX_CHARS + 1);
        assert_eq!(err.kind, FailureKind::Transient);
    }
}
