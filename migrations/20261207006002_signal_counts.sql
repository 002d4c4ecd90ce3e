-- Signals sent (rows of task_signals) and signals the log holds (`signal_received`), per
-- task (issue 32's review: a wake-up was lost when a worker died after parking). A park for
-- a wait that finds more sent than held makes the task due at once, in the same statement
-- and under the row lock a sender takes too, so a signal sent while the run was parking is
-- never left waiting for a wake-up that already passed. `seq` numbers a task's signals in
-- the order they were sent (the value of signals_sent when each came), so a worker reads
-- only those after the last it recorded. Additive.
ALTER TABLE tasks
    ADD COLUMN signals_sent int NOT NULL DEFAULT 0,
    ADD COLUMN signals_seen int NOT NULL DEFAULT 0;
ALTER TABLE task_signals ADD COLUMN seq int;
CREATE UNIQUE INDEX task_signals_seq ON task_signals (task_id, seq);
