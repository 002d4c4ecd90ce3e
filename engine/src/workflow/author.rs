//! The workflow author's typed side: handles to earlier steps' outputs, plans that read
//! them, closures that take the typed input, and durable waits.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{BoxFuture, StepContext, StepError, StepWork};
use crate::id::TaskId;
use crate::outputs::{ItemOutput, Output, Outputs};
use crate::state::{SignalRecord, WaitRecord};

/// A handle to a step's outputs, typed by what the step returns: what later steps read
/// it with ([`StepContext::get`], [`Plan::get_all`], …). [`Workflow::add`] gives it. A
/// step that does not exist, or an output read as another type, does not compile:
///
/// ```compile_fail
/// use engine::prelude::*;
///
/// let mut workflow = Workflow::new("w");
/// let script = workflow.add(Step::call("script", |_ctx: StepContext| async {
///     Ok(Output::of(3_u32))
/// }));
/// workflow.add(Step::call("scenes", move |ctx: StepContext| {
///     let script = script.clone();
///     async move {
///         // `script` holds a u32, not a String: a compile error.
///         let text: String = ctx.get(&script)?;
///         Ok(Output::of(text))
///     }
/// }));
/// ```
///
/// ```compile_fail
/// use engine::prelude::*;
///
/// let mut workflow = Workflow::new("w");
/// let script = workflow.add(Step::call("script", |_ctx: StepContext| async {
///     Ok(Output::of(3_u32))
/// }));
/// workflow.add(Step::call("scenes", move |ctx: StepContext| {
///     let script = script.clone();
///     async move {
///         // A step named wrong is a name that does not exist: a compile error.
///         let scenes: u32 = ctx.get(&scirpt)?;
///         Ok(Output::of(scenes))
///     }
/// }));
/// ```
///
/// With the right name and type, the same compiles:
///
/// ```no_run
/// use engine::prelude::*;
///
/// let mut workflow = Workflow::new("w");
/// let script = workflow.add(Step::call("script", |_ctx: StepContext| async {
///     Ok(Output::of(3_u32))
/// }));
/// workflow.add(Step::call("scenes", move |ctx: StepContext| {
///     let script = script.clone();
///     async move {
///         let scenes: u32 = ctx.get(&script)?;
///         Ok(Output::of(scenes))
///     }
/// }));
/// ```
///
/// [`Workflow::add`]: crate::Workflow::add
pub struct StepRef<T> {
    name: Arc<str>,
    output: PhantomData<fn() -> T>,
}

impl<T> StepRef<T> {
    pub(crate) fn new(name: Arc<str>) -> Self {
        StepRef {
            name,
            output: PhantomData,
        }
    }

    /// The step's name (as stored in events).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<T> Clone for StepRef<T> {
    fn clone(&self) -> Self {
        StepRef::new(self.name.clone())
    }
}

impl<T> fmt::Debug for StepRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StepRef({:?}: {})",
            self.name,
            std::any::type_name::<T>()
        )
    }
}

/// What a step's plan sees: the task's input (typed as the plan asks) and the earlier
/// steps' outputs, as the log recorded them. The plan is recorded (`step_started`) before
/// any item runs, and depends on nothing but these, so a resume plans the same.
#[derive(Clone, Debug)]
pub struct Plan<I = Value> {
    pub task_id: TaskId,
    /// The task attempt.
    pub attempt: u32,
    /// The task's input.
    pub input: Arc<I>,
    /// The completed items of the earlier steps.
    pub outputs: Arc<Outputs>,
}

impl<I> Plan<I> {
    /// The output of the one-item step `step`.
    pub fn get<T: DeserializeOwned>(&self, step: &StepRef<T>) -> Result<T, StepError> {
        self.outputs.get(step)
    }

    /// Every output of `step`, in item order.
    pub fn get_all<T: DeserializeOwned>(&self, step: &StepRef<T>) -> Result<Vec<T>, StepError> {
        self.outputs.get_all(step)
    }
}

impl Plan<Value> {
    /// The plan with the input as `J` (no copy when it already is).
    pub(crate) fn typed<J: DeserializeOwned + Send + Sync + 'static>(
        &self,
    ) -> Result<Plan<J>, StepError> {
        Ok(Plan {
            task_id: self.task_id,
            attempt: self.attempt,
            input: typed_input(&self.input)?,
            outputs: self.outputs.clone(),
        })
    }

    /// The task's input as `T` (a parse error is permanent).
    pub fn input_as<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        T::deserialize(&*self.input)
            .map_err(|e| StepError::permanent(format!("invalid input: {e}")))
    }
}

/// The input as `J`: the same value when it already is one, else parsed (a parse error is
/// permanent: retrying cannot fix the input).
pub(crate) fn typed_input<J>(input: &Arc<Value>) -> Result<Arc<J>, StepError>
where
    J: DeserializeOwned + Send + Sync + 'static,
{
    let any: Arc<dyn Any + Send + Sync> = input.clone();
    if let Ok(same) = any.downcast::<J>() {
        return Ok(same);
    }
    J::deserialize(&**input)
        .map(Arc::new)
        .map_err(|e| StepError::permanent(format!("invalid input: {e}")))
}

/// What a waiting item waits for: a signal, a time, or a signal until a time. Carried by
/// the [`StepError`] that [`StepContext::signal`] and [`StepContext::sleep`] return while
/// the item must wait; the engine records it (`wait_started`) and parks the task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitFor {
    pub signal: Option<String>,
    pub sleep: Option<String>,
    /// When the wait ends by itself (the database's clock).
    pub until: Option<DateTime<Utc>>,
}

/// What an item's waits read: the signals its step can see, the waits recorded for it,
/// and the database's clock.
#[derive(Clone)]
pub(crate) struct WaitView {
    pub(crate) signals: Vec<SignalRecord>,
    pub(crate) waits: Vec<WaitRecord>,
    pub(crate) clock: Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>,
}

impl Default for WaitView {
    fn default() -> Self {
        WaitView {
            signals: Vec::new(),
            waits: Vec::new(),
            clock: Arc::new(Utc::now),
        }
    }
}

impl fmt::Debug for WaitView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitView")
            .field("signals", &self.signals.len())
            .field("waits", &self.waits)
            .finish_non_exhaustive()
    }
}

impl<I> StepContext<I> {
    /// The data of the signal `name` as `T`: the first one received since this step's
    /// run began whose data parses as `T`. While none has come, this returns an error that
    /// (with `?`) ends the item and parks the task, holding no worker slot; the signal
    /// wakes it, and the item runs again from its start. So put the wait before the work
    /// it guards, and let the `?` through (do not map the error away).
    ///
    /// A signal whose data does not parse as `T` is passed over (and logged): the item
    /// keeps waiting, and a corrected signal, sent with a new id, is the one it reads.
    pub fn signal<T: DeserializeOwned>(&self, name: &str) -> Result<T, StepError> {
        crate::store::check_signal_name("name", name)
            .map_err(|e| StepError::permanent(e.to_string()))?;
        for signal in self.waits.signals.iter().filter(|s| s.name == name) {
            match T::deserialize(&signal.data) {
                Ok(data) => return Ok(data),
                Err(err) => tracing::warn!(
                    task = %self.task_id,
                    step = %self.step,
                    signal = name,
                    signal_id = %signal.signal_id,
                    error = %err,
                    "a signal's data does not fit what the step reads: passed over; send a corrected one with a new id"
                ),
            }
        }
        Err(StepError::waiting(WaitFor {
            signal: Some(name.to_owned()),
            sleep: None,
            until: None,
        }))
    }

    /// Like [`StepContext::signal`], but gives up waiting after `timeout` (counted from
    /// the first time the item waited, and recorded then): `None` once it has passed.
    pub fn signal_within<T: DeserializeOwned>(
        &self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<Option<T>, StepError> {
        match self.signal(name) {
            Ok(data) => return Ok(Some(data)),
            Err(err) if err.waiting.is_none() => return Err(err),
            Err(_) => {}
        }
        let now = (self.waits.clock)();
        let until = self
            .waits
            .waits
            .iter()
            .find(|w| w.item == self.item && w.signal.as_deref() == Some(name) && w.until.is_some())
            .and_then(|w| w.until)
            .unwrap_or_else(|| {
                now + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX)
            });
        if now >= until {
            return Ok(None);
        }
        Err(StepError::waiting(WaitFor {
            signal: Some(name.to_owned()),
            sleep: None,
            until: Some(until),
        }))
    }

    /// Sleeps durably for `duration`, once: the first call records when the sleep ends
    /// (by the database's clock) and parks the task until then, holding no worker slot;
    /// the item then runs again from its start, and this call returns at once. `name`
    /// tells an item's sleeps apart.
    pub fn sleep(&self, name: &str, duration: std::time::Duration) -> Result<(), StepError> {
        let now = (self.waits.clock)();
        let until = now + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX);
        self.sleep_until(name, until)
    }

    /// Sleeps durably until `at` (see [`StepContext::sleep`]); the first call's `at` is
    /// the one recorded and kept.
    pub fn sleep_until(&self, name: &str, at: DateTime<Utc>) -> Result<(), StepError> {
        crate::store::check_signal_name("name", name)
            .map_err(|e| StepError::permanent(e.to_string()))?;
        let until = self
            .waits
            .waits
            .iter()
            .find(|w| w.item == self.item && w.sleep.as_deref() == Some(name))
            .and_then(|w| w.until)
            .unwrap_or(at);
        if (self.waits.clock)() >= until {
            return Ok(());
        }
        Err(StepError::waiting(WaitFor {
            signal: None,
            sleep: Some(name.to_owned()),
            until: Some(until),
        }))
    }

    /// The database's time now.
    pub fn now(&self) -> DateTime<Utc> {
        (self.waits.clock)()
    }
}

/// A step from closures: `plan` sizes it from a [`Plan`] over the input typed as `I`, and
/// `run` makes one item's [`Output<O>`].
pub(crate) struct FnSteps<I, O, P, R> {
    pub(crate) plan: P,
    pub(crate) run: R,
    pub(crate) types: PhantomData<fn(I) -> O>,
}

impl<I, O, P, R, Fut> StepWork for FnSteps<I, O, P, R>
where
    I: DeserializeOwned + Send + Sync + 'static,
    O: Serialize + Send + 'static,
    P: Fn(&Plan<I>) -> Result<u32, StepError> + Send + Sync + 'static,
    R: Fn(StepContext<I>, u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Output<O>, StepError>> + Send + 'static,
{
    fn plan(&self, input: &Value) -> Result<u32, StepError> {
        self.plan_from(&Plan {
            task_id: TaskId::from(uuid::Uuid::nil()),
            attempt: 0,
            input: Arc::new(input.clone()),
            outputs: Arc::new(Outputs::default()),
        })
    }

    fn plan_from(&self, plan: &Plan) -> Result<u32, StepError> {
        (self.plan)(&plan.typed::<I>()?)
    }

    fn run(&self, ctx: StepContext, item: u32) -> BoxFuture<Result<ItemOutput, StepError>> {
        let ctx = match ctx.typed::<I>() {
            Ok(ctx) => ctx,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        let running = (self.run)(ctx, item);
        Box::pin(async move { running.await?.into_item() })
    }
}
