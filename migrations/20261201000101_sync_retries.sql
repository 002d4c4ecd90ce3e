-- The notion-projector's pending retries (issue 16): a status whose PATCH failed
-- transiently waits here for its next try, instead of holding back the rest of the board.
-- The projector's checkpoint may pass an event whose request awaits a retry only once the
-- retry is recorded here, so a crash or a new leader resumes it; one row per task, and a
-- newer status replaces the pending one. A success deletes the row; retries that run out
-- become a `sync_failures` row. Rebuildable like `notion_sync`: reset the checkpoint and
-- delete the projector's rows of both to mirror again from the log.
CREATE TABLE sync_retries (
    projector       text        NOT NULL,
    task_id         uuid        NOT NULL,
    -- The stream version whose status was sent, and its event (named by the failure row
    -- if the retries run out). A retry sends the task's latest status, never an older one.
    version         int         NOT NULL,
    global_position bigint      NOT NULL,
    -- Failed tries so far (the first try included), against `--max-retries`.
    tries           int         NOT NULL,
    due_at          timestamptz NOT NULL,
    http_status     int,
    error           text        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, task_id)
);
