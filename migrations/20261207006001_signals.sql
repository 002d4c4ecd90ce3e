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

-- Signals sent (new rows above) and signals the log holds (`signal_received`): a park for
-- a wait that finds more sent than held makes the task due at once, in the same statement
-- (under the row lock a sender takes too), so a signal sent while the run was parking is
-- never left waiting for a wake-up that already passed.
ALTER TABLE tasks
    ADD COLUMN signals_sent int NOT NULL DEFAULT 0,
    ADD COLUMN signals_seen int NOT NULL DEFAULT 0;
