//! Defining workflows: an ordered list of steps, each itemized or atomic.
//!
//! ```no_run
//! use engine::prelude::*;
//!
//! let workflow = Workflow::new("greetings")
//!     .step(Step::fan_out("hello",
//!         |_plan: &Plan| Ok(3),
//!         |_ctx: StepContext, item| async move {
//!             ItemOutput::value(format!("hello {item}"))
//!         })
//!         .status("saying_hello", "Saying Hello"))
//!     .step(Step::call("bye", |ctx: StepContext| async move {
//!         // Earlier steps' outputs come from the log, in item order.
//!         let greetings: Vec<String> = ctx.outputs("hello")?;
//!         ItemOutput::value(greetings.join(", "))
//!     }));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

mod author;

pub(crate) use author::{FnSteps, WaitView};
pub use author::{Plan, StepRef, WaitFor};

use crate::event::{Event, FailureKind, StepRenamed};
use crate::id::{ChannelId, TaskId, truncate_for_display};
use crate::outputs::{ItemOutput, Output, Outputs};
use crate::state::TaskState;
use crate::status::{TaskStatus, snake_case, title_case};

/// The longest step error message stored in the log.
pub const ERROR_MESSAGE_MAX_CHARS: usize = 500;

/// A step's failure, classified: the classification decides retry or fail, and is
/// recorded in the log (`item_failed.kind`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct StepError {
    pub kind: FailureKind,
    pub message: String,
    /// The provider said when to come back (a 429's `Retry-After`): the step's provider key
    /// is paused for every worker until then, and the retry waits at least this long. Such
    /// a refusal does not use up the item's tries (the provider did no work).
    pub retry_after: Option<Duration>,
    /// The request may have reached the provider and been acted on, but its answer never
    /// came (a timeout after sending, a dropped connection, a gateway's 5xx, an accepted
    /// answer that could not be read). A job step treats such a submit as possibly
    /// accepted: its slot stays taken for the job's life and the log records a possible
    /// payment (see [`StepError::unanswered`]).
    pub unanswered: bool,
    /// Not a failure: the item waits for a signal or a time (see [`StepContext::signal`],
    /// [`StepContext::sleep`]). The engine records the wait and parks the task; nothing
    /// counts as a try.
    pub waiting: Option<WaitFor>,
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

    /// The same error, with the provider's `Retry-After`.
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// The same error, marked as a request whose answer was lost after the provider may
    /// have acted on it (see [`StepError::unanswered`](field@StepError::unanswered)).
    pub fn unanswered(mut self) -> Self {
        self.unanswered = true;
        self
    }

    /// The item waits (see [`StepError::waiting`](field@StepError::waiting)).
    pub fn waiting(wait: WaitFor) -> Self {
        let what = match (&wait.signal, &wait.sleep) {
            (Some(signal), _) => format!("waiting for signal {signal}"),
            (None, Some(sleep)) => format!("sleeping ({sleep})"),
            (None, None) => "waiting".to_owned(),
        };
        StepError {
            waiting: Some(wait),
            ..StepError::new(FailureKind::Transient, &what)
        }
    }

    fn new(kind: FailureKind, message: &str) -> Self {
        // The log cannot store a NUL character: a provider's binary garbage in an error
        // message must not make the failure itself unrecordable.
        let message = message.replace('\0', "\u{FFFD}");
        StepError {
            kind,
            message: truncate_for_display(&message, ERROR_MESSAGE_MAX_CHARS),
            retry_after: None,
            unanswered: false,
            waiting: None,
        }
    }
}

/// `?` on JSON inside a step: data that does not (de)serialize fails the same way on every
/// try, so the failure is permanent.
impl From<serde_json::Error> for StepError {
    fn from(err: serde_json::Error) -> Self {
        StepError::permanent(format!("JSON: {err}"))
    }
}

/// `?` on I/O inside a step: what may pass by itself (a timeout, an interruption, a
/// connection refused, reset, aborted or not yet made, a broken pipe) is transient;
/// anything else (not found, permission denied, invalid data, …) is permanent.
impl From<std::io::Error> for StepError {
    fn from(err: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let passing = matches!(
            err.kind(),
            TimedOut
                | Interrupted
                | WouldBlock
                | ConnectionRefused
                | ConnectionReset
                | ConnectionAborted
                | NotConnected
                | BrokenPipe
                | UnexpectedEof
        );
        let message = format!("I/O: {err}");
        if passing {
            StepError::transient(message)
        } else {
            StepError::permanent(message)
        }
    }
}

/// `?` on `tokio::time::timeout` inside a step: a timeout is transient.
impl From<tokio::time::error::Elapsed> for StepError {
    fn from(_: tokio::time::error::Elapsed) -> Self {
        StepError::transient("timed out")
    }
}

/// Exponential backoff with jitter: the one backoff of the orchestrator, the worker and the
/// projector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub multiplier: f64,
    pub max: Duration,
    /// 0.0 = none; 0.2 = the delay is drawn from ±20% around the nominal value.
    pub jitter: f64,
}

impl Backoff {
    /// No wait at all (tests, examples, and steps whose retries need none).
    pub const fn none() -> Self {
        Backoff {
            initial: Duration::ZERO,
            multiplier: 1.0,
            max: Duration::ZERO,
            jitter: 0.0,
        }
    }

    /// `initial`, doubling up to `max`, without jitter (add it with [`Backoff::with_jitter`]).
    pub const fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            multiplier: 2.0,
            max,
            jitter: 0.0,
        }
    }

    /// The same backoff with the delay drawn from ±`jitter` around the nominal value.
    pub const fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before retry number `retry` (1 = the first retry); `unit` in [0, 1) picks
    /// the point in the jitter band, so this stays a pure function.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let nominal = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = nominal.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 + self.jitter * (2.0 * unit - 1.0));
        Duration::from_secs_f64(jittered.clamp(0.0, self.max.as_secs_f64()))
    }

    /// [`Backoff::delay`] with the jitter drawn at random.
    pub fn random_delay(&self, retry: u32) -> Duration {
        self.delay(retry, rand::random::<f64>())
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
            backoff: Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30))
                .with_jitter(0.2),
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

impl TaskRetryPolicy {
    /// How many claims a task may take without finishing before it fails: four per
    /// attempt of the budget, at least 10. Attempts count failures; claims also count
    /// crashes, shutdowns and takeovers, which this bounds without letting a few deploys
    /// during a long task fail it.
    pub fn claim_limit(&self) -> u32 {
        self.max_attempts.saturating_mul(4).max(10)
    }
}

impl Default for TaskRetryPolicy {
    fn default() -> Self {
        TaskRetryPolicy {
            max_attempts: 5,
            backoff: Backoff::exponential(Duration::from_secs(30), Duration::from_secs(3600))
                .with_jitter(0.2),
        }
    }
}

/// What a step's code gets to know about the item it runs, and the task's results so far:
/// the task's input (as `I`: untyped JSON unless the step's closure asks for a type),
/// earlier steps' outputs, the signals it may wait for, and its cancellation.
#[derive(Clone, Debug)]
pub struct StepContext<I = Value> {
    pub task_id: TaskId,
    pub channel_id: ChannelId,
    pub workflow: Arc<str>,
    pub step: Arc<str>,
    /// The task attempt (1 on the first run, +1 per retry or takeover).
    pub attempt: u32,
    /// The try of this item within the attempt (1 = first try).
    pub try_number: u32,
    /// The item (1-based).
    pub item: u32,
    /// The task's input.
    pub input: Arc<I>,
    /// The completed items of the earlier steps, as the log records them (earlier attempts
    /// included; never this step's own): read with [`StepContext::output`] and
    /// [`StepContext::outputs`].
    pub outputs: Arc<Outputs>,
    /// Cancelled when the task is cancelled, the lease is lost or the worker shuts down:
    /// long-running work should stop early.
    pub cancel: CancellationToken,
    /// Signals and recorded waits (see [`StepContext::signal`]).
    pub(crate) waits: Arc<WaitView>,
}

impl StepContext {
    /// The task's input as `T` (a parse error is permanent: retrying cannot fix the input).
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        T::deserialize(&*self.input)
            .map_err(|e| StepError::permanent(format!("invalid input: {e}")))
    }

    /// The same context with the input as `J` (no copy when it already is one).
    pub(crate) fn typed<J>(self) -> Result<StepContext<J>, StepError>
    where
        J: DeserializeOwned + Send + Sync + 'static,
    {
        Ok(StepContext {
            input: author::typed_input(&self.input)?,
            task_id: self.task_id,
            channel_id: self.channel_id,
            workflow: self.workflow,
            step: self.step,
            attempt: self.attempt,
            try_number: self.try_number,
            item: self.item,
            outputs: self.outputs,
            cancel: self.cancel,
            waits: self.waits,
        })
    }
}

impl<I> StepContext<I> {
    /// The output of the one-item step `step` (its item 1), as the step's output type.
    pub fn get<T: DeserializeOwned>(&self, step: &StepRef<T>) -> Result<T, StepError> {
        self.outputs.get(step)
    }

    /// Every completed output of `step`, in item order, as the step's output type.
    pub fn get_all<T: DeserializeOwned>(&self, step: &StepRef<T>) -> Result<Vec<T>, StepError> {
        self.outputs.get_all(step)
    }

    /// The output of `item` of `step`, as the step's output type.
    pub fn get_item<T: DeserializeOwned>(
        &self,
        step: &StepRef<T>,
        item: u32,
    ) -> Result<T, StepError> {
        self.outputs.get_item(step, item)
    }

    /// The output `item` of `step` recorded, as `T`.
    pub fn output<T: DeserializeOwned>(&self, step: &str, item: u32) -> Result<T, StepError> {
        self.outputs.output(step, item)
    }

    /// Every completed item's output of `step`, in item order, as `T`.
    pub fn outputs<T: DeserializeOwned>(&self, step: &str) -> Result<Vec<T>, StepError> {
        self.outputs.outputs(step)
    }

    /// The artifact `item` of `step` recorded (a path or URL).
    pub fn artifact(&self, step: &str, item: u32) -> Result<&str, StepError> {
        self.outputs.artifact(step, item)
    }
}

/// A boxed, sendable future: what a step's work returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A step's code: plans its items from the input, and runs one item.
pub trait StepWork: Send + Sync + 'static {
    /// How many items the step has for this input (deterministic). Atomic steps: 1.
    fn plan(&self, input: &Value) -> Result<u32, StepError>;

    /// How many items the step has, from the input and the earlier steps' outputs (what
    /// the engine calls; by default [`StepWork::plan`] of the input). Override it to size
    /// the step by an earlier result.
    fn plan_from(&self, plan: &Plan) -> Result<u32, StepError> {
        self.plan(&plan.input)
    }

    /// Runs one item (1-based).
    fn run(&self, ctx: StepContext, item: u32) -> BoxFuture<Result<ItemOutput, StepError>>;
}

/// Where a provider job stands, as its poll saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum JobStatus {
    /// Still running (or queued, or throttled by the provider): poll again, after
    /// `next_poll` when the provider hinted one (the hint wins over the step's poll backoff).
    Pending { next_poll: Option<Duration> },
    /// Finished: the item's output.
    Done(ItemOutput),
    /// The job ended without a result. Transient (lost, expired, a provider-side crash):
    /// the item is submitted anew, within its retry policy. Permanent (refused content, bad
    /// input): the item gives up.
    Failed(StepError),
}

/// One submission of an item: its number and the idempotency key to send with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    /// 1 for the item's first submission, +1 for each new one.
    pub number: u32,
    /// Derived from (task, step, item, submission number): the same for a retried submit
    /// whose acceptance was never recorded (a crash), new for a deliberate resubmission.
    /// Send it where the provider's API takes one.
    pub idempotency_key: String,
}

/// A step whose items are provider jobs: submit once, then poll until done. Every accepted
/// submission is recorded (`item_submitted`) before anything else happens, so any later
/// run (after a crash, a takeover, a retry) polls the job instead of paying for it again.
/// While every item in flight waits on a job, the task is parked and holds no worker slot.
pub trait JobWork: Send + Sync + 'static {
    /// How many items the step has for this input (deterministic).
    fn plan(&self, input: &Value) -> Result<u32, StepError>;

    /// How many items the step has, from the input and the earlier steps' outputs (what
    /// the engine calls; by default [`JobWork::plan`] of the input).
    fn plan_from(&self, plan: &Plan) -> Result<u32, StepError> {
        self.plan(&plan.input)
    }

    /// Submits item `item`'s job and returns what polling it needs (the provider's job id,
    /// and anything else), as soon as the provider accepted it.
    fn submit(
        &self,
        ctx: StepContext,
        item: u32,
        submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>>;

    /// Asks the provider about a job `submit` returned. An `Err` is a failed poll (the
    /// request failed, not the job): a transient one is polled again later, until the
    /// step's job timeout declares the job lost; a permanent one fails the item.
    fn poll(
        &self,
        ctx: StepContext,
        item: u32,
        job: Value,
    ) -> BoxFuture<Result<JobStatus, StepError>>;
}

/// What a step runs: one call per item, or a job per item.
#[derive(Clone)]
pub(crate) enum Work {
    Calls(Arc<dyn StepWork>),
    Jobs(Arc<dyn JobWork>),
}

impl Work {
    pub(crate) fn plan(&self, plan: &Plan) -> Result<u32, StepError> {
        match self {
            Work::Calls(work) => work.plan_from(plan),
            Work::Jobs(work) => work.plan_from(plan),
        }
    }
}

/// A provider's limits, shared by every step that calls the same account: how many jobs or
/// calls may be in flight at once across every worker, and how many requests per second
/// (submits, polls and calls) they may send. A worker can override both by key
/// (`reel worker --max-in-flight KEY=N --rate KEY=R`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderLimits {
    pub key: Arc<str>,
    /// Jobs or calls in flight at once, fleet-wide (`None`: no cap).
    pub max_in_flight: Option<u32>,
    /// Requests per second, fleet-wide (`None`: no rate limit).
    pub rate: Option<f64>,
}

impl ProviderLimits {
    /// The provider account called `key`, without limits until they are set.
    pub fn new(key: &str) -> Self {
        ProviderLimits {
            key: Arc::from(key),
            max_in_flight: None,
            rate: None,
        }
    }

    /// At most `n` jobs or calls in flight at once (at least 1).
    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.max_in_flight = Some(n.max(1));
        self
    }

    /// At most `per_second` requests per second.
    pub fn rate(mut self, per_second: f64) -> Self {
        self.rate = Some(per_second).filter(|r| r.is_finite() && *r > 0.0);
        self
    }
}

/// The status a task shows while a step runs: its storage name and the name people see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepStatus {
    pub status: TaskStatus,
    pub display: Arc<str>,
}

impl StepStatus {
    /// `storage` (snake_case, not a lifecycle status) shown as `display`.
    ///
    /// # Panics
    /// When `storage` is not a valid status name or is one of the engine's lifecycle
    /// statuses, or `display` is empty: both are mistakes in a workflow's definition.
    pub fn new(storage: &str, display: &str) -> Self {
        let status = TaskStatus::parse(storage).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            status.is_step_status(),
            "{storage:?} is a lifecycle status of the engine; a step needs a status of its own"
        );
        assert!(
            !display.trim().is_empty(),
            "a step status needs a display name"
        );
        StepStatus {
            status,
            display: Arc::from(display.trim()),
        }
    }

    /// The default for a step called `step`: its name in snake_case, shown in title case
    /// (`"sections"` → `sections`, "Sections").
    fn for_step(step: &str) -> Self {
        let storage = snake_case(step);
        let storage = if TaskStatus::parse(&storage).is_ok_and(TaskStatus::is_lifecycle) {
            format!("{storage}_step")
        } else {
            storage
        };
        let display = title_case(&storage);
        StepStatus::new(&storage, &display)
    }
}

/// How many items at once a call step runs by default when its provider has a request
/// rate but no cap on calls in flight: the rate paces them (see [`Step::width`]).
pub const RATE_PACED_WIDTH: usize = 8;

/// How a job step polls by default: after 1 s, doubling to 30 s, ±10%.
pub const DEFAULT_POLL_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30)).with_jitter(0.1);

/// How long a job may go unanswered (its polls failing) before it counts as lost.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(3600);

/// One step of a workflow, whose items return `O` (JSON, `Value`, for untyped steps).
///
/// | | one item | N items |
/// |---|---|---|
/// | a closure that calls | [`Step::call`] | [`Step::fan_out`] |
/// | your type that calls ([`StepWork`]) | [`Step::call_with`] | [`Step::fan_out_with`] |
/// | provider jobs: submit, then poll ([`JobWork`]) | | [`Step::jobs`] |
///
/// One item is one unit of work: a failure runs it again whole. N items are planned
/// (`step_started` records how many) and each completion is recorded as it happens, so a
/// retry runs only the missing ones.
pub struct Step<O = Value> {
    pub(crate) name: Arc<str>,
    pub(crate) status: StepStatus,
    pub(crate) atomic: bool,
    pub(crate) work: Work,
    pub(crate) retry: RetryPolicy,
    /// Items at once, as [`Step::concurrency`] set it (`None`: see [`Step::width`]).
    pub(crate) concurrency: Option<usize>,
    /// Whether an item's slot frees before its completion is durable (see
    /// [`Step::pipelined`]).
    pub(crate) pipelined: bool,
    pub(crate) provider: Option<ProviderLimits>,
    pub(crate) poll_backoff: Backoff,
    pub(crate) job_timeout: Duration,
    pub(crate) min_poll_interval: Duration,
    /// How long a job takes, before the fleet saw one end (see [`Step::expected_job_duration`]).
    pub(crate) expected_job_duration: Option<Duration>,
    /// How long one try of an item may run (see [`Step::timeout`]).
    pub(crate) timeout: Option<Duration>,
    pub(crate) output: std::marker::PhantomData<fn() -> O>,
}

impl<O> Clone for Step<O> {
    fn clone(&self) -> Self {
        Step {
            name: self.name.clone(),
            status: self.status.clone(),
            atomic: self.atomic,
            work: self.work.clone(),
            retry: self.retry,
            concurrency: self.concurrency,
            pipelined: self.pipelined,
            provider: self.provider.clone(),
            poll_backoff: self.poll_backoff,
            job_timeout: self.job_timeout,
            min_poll_interval: self.min_poll_interval,
            expected_job_duration: self.expected_job_duration,
            timeout: self.timeout,
            output: std::marker::PhantomData,
        }
    }
}

impl<O: serde::Serialize + Send + 'static> Step<O> {
    /// A one-item step from a closure: `run(ctx)` makes its [`Output`]. The closure's
    /// context may ask for the input typed (`StepContext<Brief>`: a task whose input does
    /// not parse fails permanently).
    ///
    /// ```no_run
    /// use engine::prelude::*;
    ///
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Script { scenes: u32 }
    ///
    /// let script: Step<Script> = Step::call("script", |_ctx: StepContext| async {
    ///     Ok(Output::of(Script { scenes: 4 }).with_cost_micros(2_000))
    /// });
    /// ```
    pub fn call<I, R, Fut>(name: &str, run: R) -> Self
    where
        I: serde::de::DeserializeOwned + Send + Sync + 'static,
        R: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Output<O>, StepError>> + Send + 'static,
    {
        let work = FnSteps {
            plan: |_: &Plan<I>| Ok(1),
            run: move |ctx, _item| run(ctx),
            types: std::marker::PhantomData,
        };
        Step::from_work(name, true, Work::Calls(Arc::new(work)))
    }

    /// A step of N items from two closures: `plan` sizes it from a [`Plan`] (the input,
    /// typed as the closure asks, and the earlier steps' outputs), and `run(ctx, item)`
    /// makes one item's [`Output`].
    ///
    /// ```no_run
    /// use engine::prelude::*;
    ///
    /// let mut workflow = Workflow::new("film");
    /// let script = workflow.add(Step::call("script", |_ctx: StepContext| async {
    ///     Ok(Output::of(4_u32))
    /// }));
    /// // As many scenes as the script said: the plan reads its output from the log.
    /// workflow.add(Step::fan_out(
    ///     "scenes",
    ///     move |plan: &Plan| plan.get(&script),
    ///     |_ctx: StepContext, item| async move { Ok(Output::of(format!("scene {item}"))) },
    /// ));
    /// ```
    pub fn fan_out<I, P, R, Fut>(name: &str, plan: P, run: R) -> Self
    where
        I: serde::de::DeserializeOwned + Send + Sync + 'static,
        P: Fn(&Plan<I>) -> Result<u32, StepError> + Send + Sync + 'static,
        R: Fn(StepContext<I>, u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Output<O>, StepError>> + Send + 'static,
    {
        let work = FnSteps {
            plan,
            run,
            types: std::marker::PhantomData,
        };
        Step::from_work(name, false, Work::Calls(Arc::new(work)))
    }
}

impl Step {
    /// A one-item step from your own [`StepWork`] (its plan must say 1).
    pub fn call_with(name: &str, work: impl StepWork) -> Self {
        Step::from_work(name, true, Work::Calls(Arc::new(work)))
    }

    /// A step of N items from your own [`StepWork`].
    pub fn fan_out_with(name: &str, work: impl StepWork) -> Self {
        Step::from_work(name, false, Work::Calls(Arc::new(work)))
    }

    /// A step whose items are provider jobs (see [`JobWork`]). Up to its concurrency's
    /// jobs are open at once (default: all of its items; [`Step::provider`]'s cap bounds
    /// them fleet-wide).
    pub fn jobs(name: &str, work: impl JobWork) -> Self {
        Step::from_work(name, false, Work::Jobs(Arc::new(work)))
    }

    /// A one-item step that waits for the signal `signal` and outputs its data (see
    /// [`StepContext::signal`]): the task parks, holding no worker slot, until
    /// `reel signal TASK SIGNAL --data JSON` sends it.
    pub fn wait_for_signal<T>(name: &str, signal: &str) -> Step<T>
    where
        T: serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
    {
        let signal: Arc<str> = Arc::from(signal);
        Step::call(name, move |ctx: StepContext| {
            let signal = signal.clone();
            async move { Ok(Output::of(ctx.signal::<T>(&signal)?)) }
        })
    }

    /// A one-item step that sleeps durably for `duration` (see [`StepContext::sleep`]):
    /// the task parks until then, holding no worker slot, and a restart does not start
    /// the sleep over. Its output is when it woke.
    pub fn sleep(name: &str, duration: Duration) -> Step<chrono::DateTime<chrono::Utc>> {
        Step::call(name, move |ctx: StepContext| async move {
            ctx.sleep("sleep", duration)?;
            Ok(Output::of(ctx.now()))
        })
    }

    /// An itemized step from its code.
    #[deprecated(since = "0.2.0", note = "renamed Step::fan_out_with")]
    pub fn itemized(name: &str, work: impl StepWork) -> Self {
        Step::fan_out_with(name, work)
    }

    /// An atomic step (one unit of work; a failure re-runs it whole) from its code.
    #[deprecated(since = "0.2.0", note = "renamed Step::call_with")]
    pub fn atomic(name: &str, work: impl StepWork) -> Self {
        Step::call_with(name, work)
    }

    /// An itemized step from two closures: `plan(input) -> count` and `run(ctx, item)`.
    #[deprecated(
        since = "0.2.0",
        note = "use Step::fan_out, whose plan gets a Plan (the input and earlier outputs)"
    )]
    pub fn items<P, R, Fut>(name: &str, plan: P, run: R) -> Self
    where
        P: Fn(&Value) -> Result<u32, StepError> + Send + Sync + 'static,
        R: Fn(StepContext, u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ItemOutput, StepError>> + Send + 'static,
    {
        Step::fan_out(name, move |p: &Plan| plan(&p.input), run)
    }

    /// An atomic step from one closure.
    #[deprecated(since = "0.2.0", note = "renamed Step::call")]
    pub fn once<R, Fut>(name: &str, run: R) -> Self
    where
        R: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ItemOutput, StepError>> + Send + 'static,
    {
        Step::call(name, run)
    }
}

impl<O> Step<O> {
    fn from_work(name: &str, atomic: bool, work: Work) -> Self {
        Step {
            name: name.into(),
            status: StepStatus::for_step(name),
            atomic,
            work,
            retry: RetryPolicy::default(),
            concurrency: None,
            pipelined: false,
            provider: None,
            poll_backoff: DEFAULT_POLL_BACKOFF,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            min_poll_interval: Duration::ZERO,
            expected_job_duration: None,
            timeout: None,
            output: std::marker::PhantomData,
        }
    }

    /// A handle later steps read this step's outputs with (see [`Workflow::add`]).
    pub fn handle(&self) -> StepRef<O> {
        StepRef::new(self.name.clone())
    }

    /// The step without its output type (how a workflow keeps it).
    pub(crate) fn erase(self) -> Step {
        Step {
            name: self.name,
            status: self.status,
            atomic: self.atomic,
            work: self.work,
            retry: self.retry,
            concurrency: self.concurrency,
            pipelined: self.pipelined,
            provider: self.provider,
            poll_backoff: self.poll_backoff,
            job_timeout: self.job_timeout,
            min_poll_interval: self.min_poll_interval,
            expected_job_duration: self.expected_job_duration,
            timeout: self.timeout,
            output: std::marker::PhantomData,
        }
    }

    /// The provider account this step's items call, with its default limits: the jobs or
    /// calls in flight and the requests per second, across every worker.
    pub fn provider(mut self, limits: ProviderLimits) -> Self {
        self.provider = Some(limits);
        self
    }

    /// How a job step polls when the provider gives no hint (default
    /// [`DEFAULT_POLL_BACKOFF`]: after 1 s, doubling to 30 s).
    pub fn poll_backoff(mut self, backoff: Backoff) -> Self {
        self.poll_backoff = backoff;
        self
    }

    /// The shortest time between two polls of one job, whatever the provider hints, the
    /// backoff's jitter or a shared polling round say (default: none beyond 10 ms).
    pub fn min_poll_interval(mut self, floor: Duration) -> Self {
        self.min_poll_interval = floor;
        self
    }

    /// How long a job of this step usually takes, until the fleet has seen some end (then
    /// what it saw wins: `job_durations` keeps a moving average per step). A job step
    /// without a provider's hint polls by its backoff while a job is far from its expected
    /// end, and near it often enough that an ended job is seen within a tenth of its
    /// duration; while nobody knows the duration, that from the first poll on.
    pub fn expected_job_duration(mut self, duration: Duration) -> Self {
        self.expected_job_duration = Some(duration);
        self
    }

    /// How long a job's polls may keep failing before the job counts as lost and the item
    /// is submitted anew (default [`DEFAULT_JOB_TIMEOUT`], an hour); also how long a job
    /// may run at the provider: a submit that got no answer keeps a slot this long.
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// How long one try of a call step's item may run: past it the try is abandoned
    /// (its future dropped, its cancellation token fired) and recorded as a transient
    /// failure (`item_failed`, "timed out after …"), retried within the step's policy.
    /// Default: no limit. (A job step's items are bounded by [`Step::job_timeout`].)
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether the step's items are provider jobs.
    pub fn is_jobs(&self) -> bool {
        matches!(self.work, Work::Jobs(_))
    }

    /// The provider account the step calls, if it declared one.
    pub fn provider_limits(&self) -> Option<&ProviderLimits> {
        self.provider.as_ref()
    }

    /// The status the task shows while this step runs: `storage` (snake_case; stored in
    /// the log and the `tasks` table) shown as `display` (the CLI, Notion).
    ///
    /// # Panics
    /// See [`StepStatus::new`].
    pub fn status(mut self, storage: &str, display: &str) -> Self {
        self.status = StepStatus::new(storage, display);
        self
    }

    /// Sets the in-process retry policy for this step's items.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Runs up to `n` items at once, in each run of the step (at least 1). Without it a
    /// step is as wide as its provider allows (see [`Step::width`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }

    /// How many items one run of the step runs at once, under the provider limits that
    /// apply (`limits`: the step's own, after a worker's `--max-in-flight` and `--rate`):
    /// [`Step::concurrency`] when set; otherwise a job step opens all its jobs, and a call
    /// step runs as many items as the provider's cap takes ([`ProviderLimits::max_in_flight`]),
    /// [`RATE_PACED_WIDTH`] when the provider has a rate but no cap, and one at a time
    /// without a provider. The cap still bounds every worker together: a task's items that
    /// find no free slot wait for one.
    pub fn width(&self, limits: Option<&ProviderLimits>) -> usize {
        if let Some(n) = self.concurrency {
            return n;
        }
        if self.is_jobs() {
            return usize::MAX;
        }
        match limits {
            Some(ProviderLimits {
                max_in_flight: Some(cap),
                ..
            }) => usize::try_from(*cap).unwrap_or(usize::MAX).max(1),
            Some(ProviderLimits { rate: Some(_), .. }) => RATE_PACED_WIDTH,
            _ => 1,
        }
    }

    /// Lets the next item start while the last one's completion is still being written.
    ///
    /// By default an item's slot frees once its completion is durable, so no item starts
    /// after a cancel (or a lost lease) that the run could have seen: right for items that
    /// call a paid provider. A pipelined step's items free their slot as soon as their
    /// completion is queued: completions that arrive while an append is in flight share
    /// the next commit, so fast items cost a fraction of a round trip each, and a cancel
    /// is seen one append later (the items started meanwhile are never recorded). For
    /// items that are cheap to run again: computations, lookups, local work.
    pub fn pipelined(mut self) -> Self {
        self.pipelined = true;
        self
    }

    /// The step's name (as stored in events).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The status shown while the step runs.
    pub fn step_status(&self) -> &StepStatus {
        &self.status
    }
}

impl<O> fmt::Debug for Step<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("status", &self.status)
            .field("atomic", &self.atomic)
            .field("retry", &self.retry)
            .field("concurrency", &self.concurrency)
            .field("pipelined", &self.pipelined)
            .field("jobs", &self.is_jobs())
            .field("provider", &self.provider)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Checks a task's input against the workflow's input type.
type InputCheck = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// A named, ordered list of steps; optionally a human review at the end.
#[derive(Clone)]
pub struct Workflow {
    pub(crate) name: String,
    /// The workflow's version (see [`Workflow::version`]).
    pub(crate) version: u32,
    pub(crate) steps: Vec<Step>,
    pub(crate) task_retry: TaskRetryPolicy,
    pub(crate) review: bool,
    input_check: Option<InputCheck>,
    /// The declared input type's name, for the shape.
    input_type: Option<&'static str>,
    /// Older versions whose tasks this version takes over (see [`Workflow::accepts`]).
    accepts: std::collections::BTreeSet<u32>,
    /// Steps of older versions known here under another name, old name to new.
    renamed: BTreeMap<String, String>,
    /// Steps of older versions this version no longer has, on purpose.
    removed: std::collections::BTreeSet<String>,
}

impl Workflow {
    /// An empty workflow called `name` (the `workflow` of its tasks). Without
    /// [`Workflow::review_gate`] its tasks end `completed` after the last step.
    pub fn new(name: impl Into<String>) -> Self {
        Workflow {
            name: name.into(),
            version: 1,
            steps: Vec::new(),
            task_retry: TaskRetryPolicy::default(),
            review: false,
            input_check: None,
            input_type: None,
            accepts: Default::default(),
            renamed: BTreeMap::new(),
            removed: Default::default(),
        }
    }

    /// Takes over tasks of the older version `older`: a worker serving this version claims
    /// them too, and moves each to this version (`task_upgraded`) before running it, as
    /// the rules declared here say — [`Workflow::renamed`], [`Workflow::removed`]; a step
    /// of this version the older one did not have runs. A task whose history the rules do
    /// not cover (a step it ran that this version neither has, renames nor removes) is
    /// refused, not guessed at: nothing completed runs again, no open job is submitted
    /// again.
    ///
    /// # Panics
    /// When `older` is 0.
    pub fn accepts(mut self, older: u32) -> Self {
        assert!(older >= 1, "workflow {:?}: versions start at 1", self.name);
        self.accepts.insert(older);
        self
    }

    /// Step `old` of the older versions this one accepts is step `new` here: an upgraded
    /// task's completed items, outputs and open provider jobs of `old` carry over to `new`
    /// (provider idempotency keys keep the old name, so a retried submit is still known to
    /// the provider).
    pub fn renamed(mut self, old: &str, new: &str) -> Self {
        self.renamed.insert(old.to_owned(), new.to_owned());
        self
    }

    /// Step `old` of the older versions this one accepts is gone here, on purpose: an
    /// upgraded task keeps its events and outputs (readable under `old`), and nothing of it
    /// runs again. Without this (or a rename), a task with history in a step this version
    /// does not have is refused.
    pub fn removed(mut self, old: &str) -> Self {
        self.removed.insert(old.to_owned());
        self
    }

    /// Whether this version takes over tasks of version `older` (see [`Workflow::accepts`]).
    pub fn accepts_version(&self, older: u32) -> bool {
        older < self.version && self.accepts.contains(&older)
    }

    /// The older versions this one takes over.
    pub fn accepted_versions(&self) -> Vec<u32> {
        self.accepts
            .iter()
            .copied()
            .filter(|v| *v < self.version)
            .collect()
    }

    /// The `task_upgraded` event that moves the task folded to `state` to this version,
    /// or why the rules declared here do not allow it. `from_shape` is the older version's
    /// shape as its workers recorded it (see [`Workflow::shape`]), when known: it tells a
    /// step this version adds from one the task simply has not reached.
    pub fn upgrade(&self, state: &TaskState, from_shape: Option<&str>) -> Result<Event, String> {
        let from = state.workflow_version.max(1);
        if state.workflow != self.name {
            return Err(format!(
                "the task is of workflow {:?}, not {:?}",
                state.workflow, self.name
            ));
        }
        if from >= self.version {
            return Err(format!(
                "the task is on v{from}, not older than v{}",
                self.version
            ));
        }
        if !self.accepts_version(from) {
            return Err(format!(
                "{} v{} does not accept v{from} tasks: declare .accepts({from}) on it",
                self.name, self.version
            ));
        }
        // A cancelled task with provider jobs open still has them to follow to their end.
        let status = state.status();
        if status == TaskStatus::COMPLETED
            || (status == TaskStatus::CANCELLED && state.open_jobs() == 0)
        {
            return Err(format!(
                "the task is {status}: there is nothing left to run"
            ));
        }
        let mut renamed = Vec::new();
        let mut removed = Vec::new();
        for step in &state.steps {
            let name = step.name.as_str();
            if let Some(version) = step.removed_in {
                // History only: its names stay taken.
                for used in std::iter::once(name).chain(step.first_name.as_deref()) {
                    if self.step_index(used).is_some() {
                        return Err(format!(
                            "v{}'s step {used:?} would take the name of the task's step {name:?}, which v{version} removed: its provider idempotency keys would repeat that step's; give it another name",
                            self.version
                        ));
                    }
                }
                continue;
            }
            if self.removed.contains(name) && self.step_index(name).is_some() {
                return Err(format!(
                    "removed({name:?}), but v{} has a step {name:?}",
                    self.version
                ));
            }
            let open = step.open_jobs.len();
            // Where the step's history goes: a renamed step, a kept one, or none (removed).
            let carried_to = match self.renamed.get(name) {
                Some(new) => {
                    if state.step(new).is_some() {
                        return Err(format!(
                            "renamed({name:?}, {new:?}): the task already has history under {new:?}"
                        ));
                    }
                    renamed.push(StepRenamed {
                        from: name.to_owned(),
                        to: new.clone(),
                    });
                    let Some(index) = self.step_index(new) else {
                        return Err(format!(
                            "renamed({name:?}, {new:?}): v{} has no step {new:?}",
                            self.version
                        ));
                    };
                    Some(&self.steps[index])
                }
                None => self.step_index(name).map(|i| &self.steps[i]),
            };
            match carried_to {
                // An open job is followed to its end by a job step, never run again as a call.
                Some(to) if open > 0 && !to.is_jobs() => {
                    return Err(format!(
                        "step {name:?} has {open} provider job(s) open and {:?} is not a job step in v{}",
                        to.name(),
                        self.version
                    ));
                }
                Some(_) => {}
                None if self.removed.contains(name) && open == 0 => removed.push(name.to_owned()),
                None if self.removed.contains(name) => {
                    return Err(format!(
                        "removed({name:?}): the task has {open} provider job(s) of it open; let it finish on v{from}"
                    ));
                }
                None => {
                    return Err(format!(
                        "the task ran step {name:?} ({} item(s) done), which v{} does not have: declare .renamed({name:?}, NEW) or .removed({name:?})",
                        step.items.len(),
                        self.version
                    ));
                }
            }
            // A name the step ran under may not go to another step of this version: that
            // step's provider idempotency keys (and orphaned jobs) would be this one's.
            let destination = carried_to.map(Step::name);
            for used in std::iter::once(name).chain(step.first_name.as_deref()) {
                if self.step_index(used).is_some() && destination != Some(used) {
                    return Err(format!(
                        "v{}'s step {used:?} would take the name the task's step {name:?} ran under{}: its provider idempotency keys would repeat that step's; give it another name",
                        self.version,
                        destination
                            .map(|d| format!(" (now {d:?})"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
        let older_steps: Option<Vec<&str>> = from_shape.map(|shape| {
            shape
                .lines()
                .filter_map(|line| line.strip_prefix("step "))
                .filter_map(|rest| rest.split(' ').next())
                .collect()
        });
        let added = self
            .steps
            .iter()
            .map(|s| s.name.to_string())
            .filter(|name| {
                let carried = state.step(name).is_some() || renamed.iter().any(|r| &r.to == name);
                let older = older_steps.as_ref().is_some_and(|older| {
                    older
                        .iter()
                        .any(|o| o == name || self.renamed.get(*o).is_some_and(|new| new == name))
                });
                !carried && !older
            })
            .collect();
        Ok(Event::TaskUpgraded {
            from,
            to: self.version,
            renamed,
            added,
            removed,
            steps: self.steps.iter().map(|s| s.name.to_string()).collect(),
            by: None,
        })
    }

    /// Sets the workflow's version (default 1). Raise it when the workflow changes in a way
    /// its tasks in flight must not meet unawares: a step renamed, added or removed, a
    /// step's items planned differently. Tasks record the version they were submitted
    /// with. A worker records the shape of each version it serves (see
    /// [`Workflow::shape`]) and warns when a version's shape differs from the one first
    /// recorded for it.
    ///
    /// # Panics
    /// When `version` is 0.
    pub fn version(mut self, version: u32) -> Self {
        assert!(
            version >= 1,
            "workflow {:?}: versions start at 1",
            self.name
        );
        self.version = version;
        self
    }

    /// The workflow's version (1 unless [`Workflow::version`] set another).
    pub fn version_number(&self) -> u32 {
        self.version
    }

    /// What a version's tasks depend on, one line each: the steps in order with their kind
    /// (`atomic`, or `itemized` and `call` or `job`), the review gate, the input type. Two
    /// builds with the same shape run a task the same way; a different shape under the
    /// same version is what [`Workflow::version`] exists to make explicit.
    pub fn shape(&self) -> String {
        let mut lines: Vec<String> = self
            .steps
            .iter()
            .map(|step| {
                let kind = match (&step.work, step.atomic) {
                    (Work::Jobs(_), _) => "itemized job",
                    (Work::Calls(_), true) => "atomic",
                    (Work::Calls(_), false) => "itemized call",
                };
                format!("step {} {kind}", step.name)
            })
            .collect();
        if self.review {
            lines.push("review gate".to_owned());
        }
        if let Some(input) = self.input_type {
            lines.push(format!("input {input}"));
        }
        lines.join("\n")
    }

    /// A short digest of [`Workflow::shape`] (16 hex digits of its SHA-256).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.shape().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Appends a step.
    ///
    /// # Panics
    /// When a step of the same name or the same status is already there.
    pub fn step<O>(mut self, step: Step<O>) -> Self {
        self.push(step.erase());
        self
    }

    /// Appends a step and returns the handle later steps read its outputs with, typed by
    /// what the step returns (see [`StepRef`]).
    ///
    /// # Panics
    /// When a step of the same name or the same status is already there.
    pub fn add<O>(&mut self, step: Step<O>) -> StepRef<O> {
        let handle = step.handle();
        self.push(step.erase());
        handle
    }

    fn push(&mut self, step: Step) {
        for other in &self.steps {
            assert!(
                other.name != step.name,
                "workflow {:?} has two steps called {:?}",
                self.name,
                step.name
            );
            assert!(
                other.status.status != step.status.status,
                "steps {:?} and {:?} of workflow {:?} share the status {}",
                other.name,
                step.name,
                self.name,
                step.status.status
            );
        }
        self.steps.push(step);
    }

    /// After the last step, the task waits in `final_review` for a human to approve it
    /// (`completed`) or reject it back to a step.
    pub fn review_gate(mut self) -> Self {
        self.review = true;
        self
    }

    /// Declares the input type: a task whose input does not parse as `T` is refused at
    /// submit by tools that know the workflow, and fails permanently with the parse error
    /// when it runs. Steps read it with [`StepContext::input`].
    pub fn input<T: DeserializeOwned + 'static>(mut self) -> Self {
        self.input_check = Some(Arc::new(|input: &Value| {
            T::deserialize(input).map(drop).map_err(|e| e.to_string())
        }));
        self.input_type = Some(std::any::type_name::<T>());
        self
    }

    /// Whether `input` fits the declared input type (always, when none is declared).
    pub fn check_input(&self, input: &Value) -> Result<(), String> {
        match &self.input_check {
            Some(check) => check(input).map_err(|e| truncate_for_display(&e, 300)),
            None => Ok(()),
        }
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

    /// Whether tasks wait for a human review after the last step.
    pub fn has_review(&self) -> bool {
        self.review
    }

    /// The position of the step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| &*s.name == name)
    }
}

impl fmt::Debug for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workflow")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .field("task_retry", &self.task_retry)
            .field("review", &self.review)
            .field("typed_input", &self.input_check.is_some())
            .finish()
    }
}

/// A workflow version a worker serves: what its claims match. From a bare name, version 1
/// (every task recorded before versions, and every workflow that does not set one).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkflowVersion {
    pub workflow: String,
    pub version: u32,
}

impl WorkflowVersion {
    pub fn new(workflow: impl Into<String>, version: u32) -> Self {
        WorkflowVersion {
            workflow: workflow.into(),
            version,
        }
    }

    /// The names and the versions, as two columns for `unnest($1::text[], $2::int[])`.
    pub(crate) fn columns(served: &[WorkflowVersion]) -> (Vec<String>, Vec<i32>) {
        served
            .iter()
            .map(|s| {
                (
                    s.workflow.clone(),
                    i32::try_from(s.version).unwrap_or(i32::MAX),
                )
            })
            .unzip()
    }
}

impl From<&str> for WorkflowVersion {
    fn from(workflow: &str) -> Self {
        WorkflowVersion::new(workflow, 1)
    }
}

impl From<String> for WorkflowVersion {
    fn from(workflow: String) -> Self {
        WorkflowVersion::new(workflow, 1)
    }
}

impl fmt::Display for WorkflowVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.workflow, self.version)
    }
}

/// The workflows a worker can run, by name and version.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    workflows: HashMap<String, BTreeMap<u32, Arc<Workflow>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a workflow version (or replaces the same version of it). Several versions of one
    /// workflow may be registered at once, so that a deploy keeps serving the older one
    /// while its tasks drain; new tasks get the newest.
    pub fn register(mut self, workflow: Workflow) -> Self {
        self.workflows
            .entry(workflow.name.clone())
            .or_default()
            .insert(workflow.version, Arc::new(workflow));
        self
    }

    /// The names of the registered workflows.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.workflows.keys().cloned().collect();
        names.sort();
        names
    }

    /// The newest registered version of the workflow called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Workflow>> {
        self.workflows
            .get(name)
            .and_then(|versions| versions.values().next_back())
            .cloned()
    }

    /// Version `version` of the workflow called `name`, if registered.
    pub fn get_version(&self, name: &str, version: u32) -> Option<Arc<Workflow>> {
        self.workflows.get(name)?.get(&version).cloned()
    }

    /// The workflow versions registered here: what a worker with this registry claims.
    pub fn served(&self) -> Vec<WorkflowVersion> {
        self.versions()
            .iter()
            .map(|w| WorkflowVersion::new(w.name(), w.version_number()))
            .collect()
    }

    /// What a worker with this registry claims: the versions it serves, and the older ones
    /// a served version takes over (see [`Workflow::accepts`]).
    pub fn claimable(&self) -> Vec<WorkflowVersion> {
        let mut claimable = self.served();
        for workflow in self.versions() {
            for older in workflow.accepted_versions() {
                let version = WorkflowVersion::new(workflow.name(), older);
                if !claimable.contains(&version) {
                    claimable.push(version);
                }
            }
        }
        claimable.sort();
        claimable
    }

    /// The newest registered version of `name` that takes over tasks of version `from`.
    pub fn upgrade_target(&self, name: &str, from: u32) -> Option<Arc<Workflow>> {
        self.workflows
            .get(name)?
            .values()
            .rev()
            .find(|w| w.accepts_version(from))
            .cloned()
    }

    /// Every registered workflow version, by name, then version.
    pub fn versions(&self) -> Vec<Arc<Workflow>> {
        let mut names: Vec<&String> = self.workflows.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|name| self.workflows[name].values().cloned())
            .collect()
    }

    /// The provider accounts the workflows' steps call, by key, with their default limits
    /// (where steps sharing a key disagree, the stricter limit).
    pub fn providers(&self) -> std::collections::BTreeMap<String, ProviderLimits> {
        let mut providers = std::collections::BTreeMap::new();
        for workflow in self.workflows.values().flat_map(BTreeMap::values) {
            for limits in workflow.steps.iter().filter_map(|s| s.provider.as_ref()) {
                providers
                    .entry(limits.key.to_string())
                    .and_modify(|known: &mut ProviderLimits| {
                        known.max_in_flight = min_some(known.max_in_flight, limits.max_in_flight);
                        known.rate = min_some(known.rate, limits.rate);
                    })
                    .or_insert_with(|| limits.clone());
            }
        }
        providers
    }
}

fn min_some<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b < a { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn question_marks_classify_errors() {
        fn json() -> Result<u32, StepError> {
            Ok(serde_json::from_str::<u32>("\"seven\"")?)
        }
        fn io(kind: std::io::ErrorKind) -> Result<(), StepError> {
            Err(std::io::Error::new(kind, "boom"))?
        }
        assert_eq!(json().map_err(|e| e.kind), Err(FailureKind::Permanent));
        assert_eq!(
            io(std::io::ErrorKind::TimedOut).map_err(|e| e.kind),
            Err(FailureKind::Transient)
        );
        assert_eq!(
            io(std::io::ErrorKind::ConnectionReset).map_err(|e| e.kind),
            Err(FailureKind::Transient)
        );
        assert_eq!(
            io(std::io::ErrorKind::NotFound).map_err(|e| e.kind),
            Err(FailureKind::Permanent)
        );
        let elapsed: StepError = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(async {
                tokio::time::timeout(Duration::from_millis(1), std::future::pending::<()>())
                    .await
                    .expect_err("elapsed")
            })
            .into();
        assert_eq!(elapsed.kind, FailureKind::Transient);
    }
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (1..=5).map(|r| backoff.delay(r, 0.5).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert_eq!(Backoff::none().delay(7, 0.9), Duration::ZERO);
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

    fn noop(name: &str) -> Step {
        Step::call(name, |_ctx: StepContext| async {
            Ok(ItemOutput::default())
        })
    }

    #[test]
    fn steps_get_a_status_from_their_name_unless_they_declare_one() {
        let step = noop("Write sections");
        assert_eq!(step.step_status().status.as_str(), "write_sections");
        assert_eq!(&*step.step_status().display, "Write Sections");
        assert_eq!(noop("queued").step_status().status.as_str(), "queued_step");
        let step = noop("video").status("generating_video", "Generating Video");
        assert_eq!(step.step_status().status.as_str(), "generating_video");
        assert_eq!(&*step.step_status().display, "Generating Video");
    }

    #[test]
    #[should_panic(expected = "lifecycle status")]
    fn a_step_cannot_take_a_lifecycle_status() {
        let _ = noop("x").status("final_review", "Final Review");
    }

    #[test]
    #[should_panic(expected = "share the status")]
    fn two_steps_cannot_share_a_status() {
        let _ = Workflow::new("w")
            .step(noop("a").status("busy", "Busy"))
            .step(noop("b").status("busy", "Busy"));
    }

    #[test]
    fn typed_input_is_checked() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Input {
            topic: String,
        }
        let workflow = Workflow::new("w").input::<Input>();
        assert!(
            workflow
                .check_input(&serde_json::json!({"topic": "Rome"}))
                .is_ok()
        );
        let err = workflow
            .check_input(&serde_json::json!({"topic": 7}))
            .expect_err("a number is not a topic");
        assert!(err.contains("invalid type"), "{err}");
        assert!(Workflow::new("untyped").check_input(&Value::Null).is_ok());
    }

    fn clips(name: &str) -> Step {
        Step::fan_out(
            name,
            |_: &Plan| Ok(3),
            |_ctx: StepContext, _item| async { Ok(ItemOutput::default()) },
        )
    }

    #[test]
    fn a_shape_names_the_steps_their_kinds_the_review_and_the_input() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Topic {
            topic: String,
        }
        let workflow = Workflow::new("video")
            .step(noop("plan"))
            .step(clips("clips"))
            .review_gate()
            .input::<Topic>();
        let shape = workflow.shape();
        assert_eq!(
            shape.lines().collect::<Vec<_>>()[..3],
            [
                "step plan atomic",
                "step clips itemized call",
                "review gate"
            ]
        );
        assert!(shape.ends_with("::Topic"), "{shape}");
        assert_eq!(workflow.fingerprint().len(), 16);
    }

    #[test]
    fn the_fingerprint_is_stable_and_changes_with_the_shape() {
        let base = || {
            Workflow::new("video")
                .step(noop("plan"))
                .step(clips("clips"))
        };
        assert_eq!(base().fingerprint(), base().fingerprint());
        // Neither the version nor a step's status is the shape.
        assert_eq!(
            base().version(2).fingerprint(),
            Workflow::new("video")
                .step(noop("plan").status("planning", "Planning"))
                .step(clips("clips"))
                .fingerprint()
        );
        let changed = [
            Workflow::new("video")
                .step(noop("plan"))
                .step(clips("video")),
            Workflow::new("video")
                .step(clips("clips"))
                .step(noop("plan")),
            Workflow::new("video")
                .step(noop("plan"))
                .step(clips("clips"))
                .step(noop("assemble")),
            Workflow::new("video")
                .step(noop("plan"))
                .step(noop("clips")),
            base().review_gate(),
            base().input::<String>(),
        ];
        for other in changed {
            assert_ne!(
                other.fingerprint(),
                base().fingerprint(),
                "{}",
                other.shape()
            );
        }
    }

    #[test]
    fn a_registry_keeps_several_versions_and_gives_the_newest() {
        let registry = Registry::new()
            .register(Workflow::new("video").version(3).step(noop("a")))
            .register(Workflow::new("video").version(2).step(noop("b")))
            .register(Workflow::new("other"));
        assert_eq!(registry.names(), ["other", "video"]);
        assert_eq!(registry.get("video").map(|w| w.version_number()), Some(3));
        assert_eq!(
            registry
                .get_version("video", 2)
                .map(|w| w.steps()[0].name().to_owned()),
            Some("b".to_owned())
        );
        assert!(registry.get_version("video", 1).is_none());
        let versions: Vec<(String, u32)> = registry
            .versions()
            .iter()
            .map(|w| (w.name().to_owned(), w.version_number()))
            .collect();
        assert_eq!(
            versions,
            [
                ("other".to_owned(), 1),
                ("video".to_owned(), 2),
                ("video".to_owned(), 3)
            ]
        );
    }

    /// A v1 task that finished `a` (3 items), has `b` item 1's job open, and has not
    /// reached `c`.
    fn v1_history() -> TaskState {
        use crate::event::Event;
        let channel = ChannelId::parse("deploys").expect("channel");
        crate::state::fold(&crate::event::RecordedEvent::in_memory_stream(
            TaskId::new(),
            [
                Event::TaskSubmitted {
                    workflow: "video".into(),
                    channel_id: channel,
                    input: Value::Null,
                    notion_page_id: None,
                    idempotency_key: None,
                    workflow_version: None,
                },
                Event::StepStarted {
                    step: "a".into(),
                    attempt: 1,
                    items: 3,
                    atomic: false,
                },
            ]
            .into_iter()
            .chain((1..=3).map(|item| Event::ItemCompleted {
                step: "a".into(),
                item,
                attempt: 1,
                artifact: format!("a/{item}"),
                cost_micros: 10,
                duration_ms: 1,
                output: None,
            }))
            .chain([
                Event::StepStarted {
                    step: "b".into(),
                    attempt: 1,
                    items: 1,
                    atomic: false,
                },
                Event::ItemSubmitted {
                    step: "b".into(),
                    item: 1,
                    attempt: 1,
                    submission: 1,
                    job: serde_json::json!({"id": "job-1"}),
                },
            ]),
        ))
    }

    struct NoJobs;

    impl JobWork for NoJobs {
        fn plan(&self, _: &Value) -> Result<u32, StepError> {
            Ok(1)
        }
        fn submit(
            &self,
            _: StepContext,
            _: u32,
            _: Submission,
        ) -> BoxFuture<Result<Value, StepError>> {
            Box::pin(async { Ok(Value::Null) })
        }
        fn poll(
            &self,
            _: StepContext,
            _: u32,
            _: Value,
        ) -> BoxFuture<Result<JobStatus, StepError>> {
            Box::pin(async { Ok(JobStatus::Pending { next_poll: None }) })
        }
    }

    fn v2() -> Workflow {
        Workflow::new("video")
            .version(2)
            .step(clips("alpha"))
            .step(Step::jobs("film", NoJobs))
            .step(noop("c"))
            .step(noop("d"))
    }

    #[test]
    fn an_upgrade_needs_accepts_and_a_rule_for_every_step_the_task_ran() {
        let state = v1_history();
        let refused = |workflow: Workflow| workflow.upgrade(&state, None).expect_err("refused");
        assert!(
            refused(v2()).contains("declare .accepts(1)"),
            "{}",
            refused(v2())
        );
        let missing = refused(v2().accepts(1).renamed("b", "film"));
        assert!(
            missing.contains(r#"ran step "a" (3 item(s) done)"#)
                && missing.contains(r#".renamed("a", NEW) or .removed("a")"#),
            "{missing}"
        );
        let nowhere = refused(v2().accepts(1).renamed("a", "omega").renamed("b", "film"));
        assert!(nowhere.contains(r#"v2 has no step "omega""#), "{nowhere}");
        // An open job cannot be dropped, nor carried to a step that is not a job step.
        let dropped = refused(v2().accepts(1).renamed("a", "alpha").removed("b"));
        assert!(
            dropped.contains("1 provider job(s) of it open"),
            "{dropped}"
        );
        let to_calls = refused(
            Workflow::new("video")
                .version(2)
                .step(clips("a"))
                .step(noop("b"))
                .accepts(1),
        );
        assert!(to_calls.contains("is not a job step in v2"), "{to_calls}");

        let upgraded = v2()
            .accepts(1)
            .renamed("a", "alpha")
            .renamed("b", "film")
            .upgrade(
                &state,
                Some("step a itemized call\nstep b itemized job\nstep c atomic"),
            )
            .expect("the rules cover the history");
        let Event::TaskUpgraded {
            from,
            to,
            renamed,
            added,
            removed,
            steps,
            by,
        } = upgraded
        else {
            panic!("not an upgrade: {upgraded:?}");
        };
        assert_eq!((from, to, by), (1, 2, None));
        assert_eq!(steps, ["alpha", "film", "c", "d"]);
        let renamed: Vec<(&str, &str)> = renamed
            .iter()
            .map(|r| (r.from.as_str(), r.to.as_str()))
            .collect();
        assert_eq!(renamed, [("a", "alpha"), ("b", "film")]);
        // `c` was in v1 (the task had not reached it); `d` is new.
        assert_eq!(added, ["d"]);
        assert!(removed.is_empty());
        // Without v1's shape, every step the task has no history in counts as added.
        let Event::TaskUpgraded { added, .. } = v2()
            .accepts(1)
            .renamed("a", "alpha")
            .renamed("b", "film")
            .upgrade(&state, None)
            .expect("upgrade")
        else {
            panic!("not an upgrade");
        };
        assert_eq!(added, ["c", "d"]);
    }

    /// Review of issue 28: an open job renamed onto a call step would be run (and paid)
    /// again as a call; a name the task's step ran under, taken by another step of the new
    /// version, would repeat that step's provider idempotency keys.
    #[test]
    fn an_upgrade_never_lets_a_paid_job_run_again_or_its_key_be_reused() {
        let state = v1_history();
        let onto_calls = Workflow::new("video")
            .version(2)
            .step(clips("alpha"))
            .step(noop("film"))
            .accepts(1)
            .renamed("a", "alpha")
            .renamed("b", "film")
            .upgrade(&state, None)
            .expect_err("refused");
        assert!(
            onto_calls
                .contains(r#"step "b" has 1 provider job(s) open and "film" is not a job step"#),
            "{onto_calls}"
        );
        // a and b swapped: b has history (its open job), so a's would land on it.
        let swapped = Workflow::new("video")
            .version(2)
            .step(Step::jobs("a", NoJobs))
            .step(clips("b"))
            .accepts(1)
            .renamed("a", "b")
            .renamed("b", "a")
            .upgrade(&state, None)
            .expect_err("refused");
        assert!(swapped.contains("already has history"), "{swapped}");
        // a renamed away, and a new step called a.
        let reused = v2()
            .step(clips("a"))
            .accepts(1)
            .renamed("a", "alpha")
            .renamed("b", "film")
            .upgrade(&state, None)
            .expect_err("refused");
        assert!(
            reused.contains(
                r#"step "a" would take the name the task's step "a" ran under (now "alpha")"#
            ),
            "{reused}"
        );
    }

    /// Review of issue 28: a step that an upgrade removed keeps its name: a later version
    /// may not bring back a step under it (the new step would find the old one's items
    /// done, and repeat its keys), and a version may not both remove a step and have it.
    #[test]
    fn a_removed_steps_name_is_never_taken_again() {
        let mut state = v1_history();
        let removed = Workflow::new("video")
            .version(2)
            .step(clips("alpha"))
            .step(Step::jobs("b", NoJobs))
            .accepts(1)
            .renamed("a", "alpha")
            .removed("a");
        // Renamed and removed at once: the rename wins (it is looked at first).
        assert!(removed.upgrade(&state, None).is_ok());
        let contradiction = Workflow::new("video")
            .version(2)
            .step(clips("a"))
            .step(Step::jobs("b", NoJobs))
            .accepts(1)
            .removed("a")
            .upgrade(&state, None)
            .expect_err("refused");
        assert!(
            contradiction.contains(r#"removed("a"), but v2 has a step "a""#),
            "{contradiction}"
        );

        let v2 = Workflow::new("video")
            .version(2)
            .step(Step::jobs("b", NoJobs))
            .accepts(1)
            .removed("a");
        let upgraded = v2.upgrade(&state, None).expect("a removed");
        let version = state.version + 1;
        state.apply(&crate::event::RecordedEvent::in_memory(
            state.task_id.expect("task"),
            version,
            upgraded,
        ));
        assert_eq!(state.step("a").and_then(|s| s.removed_in), Some(2));
        let v3 = Workflow::new("video")
            .version(3)
            .step(clips("a"))
            .step(Step::jobs("b", NoJobs))
            .accepts(2)
            .upgrade(&state, None)
            .expect_err("refused");
        assert!(v3.contains(r#"which v2 removed"#), "{v3}");
    }

    #[test]
    fn accepted_versions_are_claimed_and_the_newest_taker_upgrades() {
        let registry = Registry::new()
            .register(
                Workflow::new("video")
                    .version(3)
                    .step(noop("a"))
                    .accepts(1)
                    .accepts(2),
            )
            .register(Workflow::new("video").version(2).step(noop("a")).accepts(1))
            // Accepting a newer version means nothing.
            .register(Workflow::new("other").step(noop("a")).accepts(4));
        let claimable: Vec<String> = registry
            .claimable()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(claimable, ["other v1", "video v1", "video v2", "video v3"]);
        assert_eq!(
            registry
                .upgrade_target("video", 1)
                .map(|w| w.version_number()),
            Some(3)
        );
        assert!(registry.upgrade_target("video", 3).is_none());
        assert!(registry.upgrade_target("other", 1).is_none());
    }
}
