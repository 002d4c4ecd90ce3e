//! One try of one job: the task's newest status, one PATCH, and what its answer means for
//! the retry policy. Nothing here sleeps: a retry is recorded and handed back with its due
//! time.

use std::time::Duration;

use engine::Backoff;
use engine::telemetry::{self, TraceContext};
use tokio::time::Instant;
use tracing::Instrument;

use super::cards::Card;
use super::leadership::Halt;
use super::{Failure, MAX_RETRY_AFTER, Projector, ProjectorError, Target, target_of};
use crate::board::property_type;
use crate::notion::NotionError;
use crate::queue::Job;

/// A job after one try.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) job: Job,
    pub(crate) outcome: Outcome,
}

#[derive(Debug)]
pub(crate) enum Outcome {
    /// The page shows the job's status; `notion_sync` says so.
    Synced,
    /// Synced, but an earlier request of the task may still land until this time: the
    /// newest status is recorded (in `sync_retries`) to be sent once more then.
    SyncedUnsettled(Instant),
    /// 429/529: every request is paused for `Retry-After`; this one goes again after the
    /// pause and it does not count as a try.
    RateLimited,
    /// A transient failure: the retry is recorded in `sync_retries`, due at this time.
    RetryAt(Instant),
    /// Recorded in `sync_failures`: a failure no retry can fix, or the retries ran out.
    Failed,
    /// Halted before the answer.
    Interrupted,
}

impl Projector {
    /// Sends the job's task its newest status, once.
    /// `turn`: the limiter's turn this request goes on (see [`crate::Limiter::on_time`]).
    pub(super) async fn attempt(
        &self,
        job: Job,
        halt: &Halt,
        turn: Instant,
    ) -> Result<Attempt, ProjectorError> {
        let span = tracing::info_span!(
            "notion.sync",
            reel.task_id = %job.task(),
            reel.version = job.target.version,
            reel.status = &*job.target.display,
            notion.try = job.tries + 1,
            notion.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let trace = job
            .trace
            .clone()
            .unwrap_or_else(|| TraceContext::of_task(job.task()));
        telemetry::set_parent(&span, &trace);
        let attempt = self
            .attempt_in(job, halt, turn)
            .instrument(span.clone())
            .await;
        let outcome = match &attempt {
            Ok(Attempt { outcome, .. }) => match outcome {
                Outcome::Synced | Outcome::SyncedUnsettled(_) => "synced",
                Outcome::RateLimited => "rate_limited",
                Outcome::RetryAt(_) => "retry",
                Outcome::Failed => "failed",
                Outcome::Interrupted => "interrupted",
            },
            Err(_) => "error",
        };
        span.record("notion.outcome", outcome);
        if matches!(outcome, "failed" | "error") {
            span.record("otel.status_code", "ERROR");
        }
        attempt
    }

    async fn attempt_in(
        &self,
        mut job: Job,
        halt: &Halt,
        mut turn: Instant,
    ) -> Result<Attempt, ProjectorError> {
        // Coalesce late too: while this job waited for its turn, the task may have moved
        // on. Send the newest status and skip the rest of its events when they arrive.
        job.target = self.freshest(job.target).await?;
        if halt.stop.is_cancelled() {
            return Ok(Attempt {
                job,
                outcome: Outcome::Interrupted,
            });
        }
        let page = match (&job.page, &self.board) {
            (Some(page), _) => page.clone(),
            (None, Some(board)) => {
                // A leader that lost its lock stops looking for (and making) the card too:
                // the new leader may be making it.
                let card = tokio::select! {
                    card = self.card_of(board, &job, halt, turn) => card?,
                    _ = halt.lock_lost.cancelled() => Ok(Card::Abandoned),
                };
                match card {
                    Ok(Card::Created(page)) => {
                        job.page = Some(page);
                        self.record_synced(&job).await?;
                        return Ok(Attempt {
                            job,
                            outcome: Outcome::Synced,
                        });
                    }
                    Ok(Card::Found(page)) => {
                        job.page = Some(page.clone());
                        turn = self.limiter.acquire().await;
                        page
                    }
                    Ok(Card::Recorded(page)) => {
                        job.page = Some(page.clone());
                        page
                    }
                    Ok(Card::NotYet(wait, why)) => {
                        job.waits += 1;
                        self.record_retry(&job, None, why, wait).await?;
                        return Ok(Attempt {
                            job,
                            outcome: Outcome::RetryAt(Instant::now() + wait),
                        });
                    }
                    Ok(Card::Abandoned) => {
                        return Ok(Attempt {
                            job,
                            outcome: Outcome::Interrupted,
                        });
                    }
                    Err(error) => {
                        self.metrics.request(error.outcome());
                        let outcome = self.after_failure(&mut job, &error).await?;
                        return Ok(Attempt { job, outcome });
                    }
                }
            }
            // Planned only with a board.
            (None, None) => {
                return Ok(Attempt {
                    job,
                    outcome: Outcome::Failed,
                });
            }
        };
        let (property, kind) = match self.board.as_ref().and_then(|b| b.status.as_ref()) {
            Some(status) => (status.name.as_str(), property_type(status)),
            None => (
                self.options.status_property.as_str(),
                self.options.property_type,
            ),
        };
        let display = job.target.display.clone();
        let card_update = match (&self.board, job.card) {
            (Some(board), true) => Some(board.card_update(&job.task().to_string(), &display)),
            _ => None,
        };
        let request = async {
            match card_update {
                Some(body) => self.client.patch_page(&page, body).await.map(|_| ()),
                None => {
                    self.client
                        .set_status(&page, property, kind, &display)
                        .await
                }
            }
        };
        // Once the lock is lost, another instance may lead and send a newer status: drop
        // the request (closing its connection) rather than let its answer land after the
        // new leader's. SIGTERM lets requests in flight finish.
        self.limiter.on_time(turn).await;
        let sent = Instant::now();
        let result = tokio::select! {
            result = request => result,
            _ = halt.lock_lost.cancelled() => {
                return Ok(Attempt { job, outcome: Outcome::Interrupted });
            }
        };
        let outcome = match result {
            Ok(()) => {
                self.metrics.request("ok");
                self.record_synced(&job).await?;
                tracing::debug!(task_id = %job.task(), status = &*job.target.display, version = job.target.version, "status mirrored");
                self.after_success(&mut job).await?
            }
            Err(error) => {
                self.metrics.request(error.outcome());
                if error.may_land_later() {
                    job.unsettled_until(Some(sent + self.options.late_write_window));
                }
                self.after_failure(&mut job, &error).await?
            }
        };
        Ok(Attempt { job, outcome })
    }

    /// A success while an earlier request of the task may still land (it got no clear
    /// answer): Notion has no conditional update, so the newest status is owed once more,
    /// after that request can no longer be applied.
    async fn after_success(&self, job: &mut Job) -> Result<Outcome, ProjectorError> {
        let now = Instant::now();
        let Some(until) = job.unsettled_until.filter(|until| *until > now) else {
            job.unsettled_until = None;
            return Ok(Outcome::Synced);
        };
        // Recorded with `unsettled_until`: a new leader sends it even though `notion_sync`
        // says the page is up to date.
        job.tries = 0;
        self.record_retry(job, None, UNSETTLED, until - now).await?;
        tracing::info!(task_id = %job.task(), resend_in = ?(until - now), "an earlier request of the task may still land: its newest status goes once more after it");
        Ok(Outcome::SyncedUnsettled(until))
    }

    async fn after_failure(
        &self,
        job: &mut Job,
        error: &NotionError,
    ) -> Result<Outcome, ProjectorError> {
        let task = job.task();
        match error {
            NotionError::RateLimited { retry_after, .. } => {
                // Notion says when: everything waits, and it does not count as a try.
                self.metrics.rate_limited.inc();
                self.metrics.retries.inc();
                let wait = retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(MAX_RETRY_AFTER);
                self.limiter.pause_for(wait);
                tracing::warn!(task_id = %task, error = %error, wait = ?wait, "Notion rate limited: pausing every request");
                Ok(Outcome::RateLimited)
            }
            error if error.is_retryable() => {
                job.tries += 1;
                if job.tries > self.options.max_retries {
                    tracing::warn!(task_id = %task, error = %error, tries = job.tries, "Notion status sync failed: retries exhausted, recorded for a later pass");
                    self.commit(None, &[failure(job, error, true)]).await?;
                    return Ok(Outcome::Failed);
                }
                let delay = self.backoff(job.tries);
                self.metrics.retries.inc();
                self.record_retry(job, error.http_status(), &error.to_string(), delay)
                    .await?;
                tracing::warn!(task_id = %task, error = %error, retry_in = ?delay, try_number = job.tries, "Notion status sync failed: retry recorded");
                Ok(Outcome::RetryAt(Instant::now() + delay))
            }
            error => {
                tracing::error!(task_id = %task, page_id = ?job.page, error = %error, "Notion rejected the status update: not retried, recorded as a sync failure");
                self.commit(None, &[failure(job, error, false)]).await?;
                Ok(Outcome::Failed)
            }
        }
    }

    /// The task's latest status event at or after `target` (committed; this read is per
    /// task, so it does not need the global watermark: a task's versions commit in order).
    async fn freshest(&self, target: Target) -> Result<Target, ProjectorError> {
        let newer = self
            .store
            .read_stream(target.task, target.version + 1)
            .await;
        match newer {
            Ok(events) => Ok(events.iter().rev().find_map(target_of).unwrap_or(target)),
            // An event the projector cannot decode: send what the batch had; the global
            // read records that event as a failure.
            Err(engine::Error::Decode { .. }) => Ok(target),
            Err(other) => Err(other.into()),
        }
    }

    /// `retry_base · 2^(n−1)` with jitter of ×0.5–1.5, at most `retry_max`.
    fn backoff(&self, failed_tries: u32) -> Duration {
        Backoff::exponential(self.options.retry_base, self.options.retry_max)
            .with_jitter(0.5)
            .random_delay(failed_tries)
    }
}

/// Why a task's newest status waits to be sent once more, as `sync_retries.error` shows it.
const UNSETTLED: &str = "an earlier request got no clear answer and may still land: the newest status is sent once more after it";

fn failure(job: &Job, error: &NotionError, retryable: bool) -> Failure {
    Failure {
        position: job.target.position,
        task: job.target.task,
        http_status: error.http_status(),
        error: error.to_string(),
        retryable,
    }
}
