-- Long provider jobs (additive). A task whose items all wait on provider jobs is parked:
-- its lease is released and `next_run_at` is its next poll. `parked` tells the next claim
-- that it resumes the same attempt (no attempt is used by waiting).
ALTER TABLE tasks ADD COLUMN parked boolean NOT NULL DEFAULT false;

-- One row per provider key (a provider account): its request-rate bucket and the pause a
-- 429's Retry-After put on it. Rows are created on first use; the limits themselves come
-- from the workers' configuration.
CREATE TABLE provider_keys (
    key          text             PRIMARY KEY,
    -- Tokens left in the request-rate bucket, as of `refilled_at`.
    tokens       double precision NOT NULL DEFAULT 1,
    refilled_at  timestamptz      NOT NULL DEFAULT now(),
    -- No request of this key goes out before this time (a provider's Retry-After).
    paused_until timestamptz
);

-- The jobs or calls in flight at each provider key, fleet-wide, and the items waiting for
-- one. A row is a lease: a crashed worker's rows expire. `granted` rows count against the
-- key's cap; waiting rows queue in task age order (`priority` is the task's created_at),
-- so a newer task never overtakes an older one at a saturated provider.
CREATE TABLE provider_slots (
    key        text        NOT NULL REFERENCES provider_keys (key),
    task_id    uuid        NOT NULL,
    step       text        NOT NULL,
    item       int         NOT NULL,
    priority   timestamptz NOT NULL,
    granted    boolean     NOT NULL DEFAULT false,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (key, task_id, step, item)
);

CREATE INDEX provider_slots_queue ON provider_slots (key, granted, priority, task_id, item);
CREATE INDEX provider_slots_task ON provider_slots (task_id);
