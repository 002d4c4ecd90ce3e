-- Whether a later pass of the projector should try a failed sync again: true for
-- transient failures whose retries ran out (5xx, timeouts, unreachable), false for what a
-- retry cannot fix (400/401/403/404, an invalid page id, an undecodable event).
ALTER TABLE sync_failures ADD COLUMN retryable boolean NOT NULL DEFAULT false;
CREATE INDEX sync_failures_open ON sync_failures (projector, task_id)
    WHERE resolved_at IS NULL;
