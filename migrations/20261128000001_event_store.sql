-- reel's event store. The `events` table is the log: append-only, the source of truth.
-- Everything else here is derived and can be rebuilt from it.
-- Column names, event types and payload fields are a public contract (DESIGN.md, "the log format").

CREATE TABLE events (
    global_position bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id       uuid        NOT NULL,
    stream_version  int         NOT NULL CHECK (stream_version >= 1),
    event_id        uuid        NOT NULL UNIQUE,
    event_type      text        NOT NULL,
    schema_version  smallint    NOT NULL DEFAULT 1,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    -- The writing transaction's id: global readers order by (tx_id, global_position) and
    -- only read below the oldest running xid, so a late commit is never skipped.
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_tx_order ON events (tx_id, global_position);

-- The derived row per task (one task = one stream). Updated in the same transaction as
-- every append to the task's stream; the lease columns are the workers' coordination.
CREATE TABLE tasks (
    id               uuid        PRIMARY KEY,
    workflow         text        NOT NULL,
    channel_id       text        NOT NULL,
    status           text        NOT NULL CHECK (status IN (
                         'queued', 'generating_assets', 'generating_composites',
                         'generating_video', 'generating_audio', 'generating_sfx',
                         'assembling', 'retry_scheduled', 'final_review', 'completed',
                         'failed', 'cancelled')),
    -- The stream's current version: the append's optimistic-concurrency check.
    version          int         NOT NULL CHECK (version >= 1),
    attempt          int         NOT NULL DEFAULT 0,
    lease_owner      text,
    -- Bumped by every claim; every append checks it (fencing of paused workers).
    lease_epoch      bigint      NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    next_run_at      timestamptz,
    notion_page_id   text,
    idempotency_key  text        UNIQUE,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tasks_runnable ON tasks (next_run_at)
    WHERE status NOT IN ('final_review', 'completed', 'failed', 'cancelled');
CREATE INDEX tasks_channel_status ON tasks (channel_id, status);
CREATE INDEX tasks_status ON tasks (status);

-- Where each global-order reader (projector) stands: the pair, never the position alone.
CREATE TABLE projector_checkpoints (
    projector     text        PRIMARY KEY,
    last_tx_id    xid8        NOT NULL DEFAULT '0',
    last_position bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The Notion mirror's state (rebuildable): the highest stream_version mirrored per task.
CREATE TABLE notion_sync (
    task_id         uuid        PRIMARY KEY,
    applied_version int         NOT NULL,
    applied_status  text        NOT NULL,
    synced_at       timestamptz NOT NULL DEFAULT now()
);

-- Events a projector could not mirror, with a truncated error (never a secret).
CREATE TABLE sync_failures (
    projector       text        NOT NULL,
    global_position bigint      NOT NULL,
    task_id         uuid        NOT NULL,
    http_status     int,
    error           text        NOT NULL,
    attempts        int         NOT NULL DEFAULT 1,
    resolved_at     timestamptz,
    failed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, global_position)
);
CREATE INDEX sync_failures_task ON sync_failures (task_id);
