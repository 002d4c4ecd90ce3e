-- Signals sent to tasks (issue 32): `reel signal TASK NAME --data JSON --id ID`. A signal
-- lands here first, whatever the task is doing (a worker running it is never disturbed by
-- an append under it), and wakes the task if it is parked; the worker that runs the task
-- next records it in the log (`signal_received`) before any item reads it. The key makes
-- a signal sent again with the same id change nothing. Additive.
CREATE TABLE task_signals (
    task_id   uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    name      text NOT NULL,
    signal_id text NOT NULL,
    data      jsonb NOT NULL DEFAULT 'null'::jsonb,
    sent_by   text,
    sent_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, name, signal_id)
);
