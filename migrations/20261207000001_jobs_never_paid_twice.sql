-- Provider jobs, hardened (issue 25).
--
-- A submit whose answer was lost (a timeout, a dropped connection, a gateway error) may
-- have started a job the provider charges for. Its slot is kept, as a row of its own, for
-- the job's expected life: `unanswered` numbers such rows per item (1, 2, ...); 0 is the
-- item's own slot, as before.
ALTER TABLE provider_slots ADD COLUMN unanswered int NOT NULL DEFAULT 0;
ALTER TABLE provider_slots DROP CONSTRAINT provider_slots_pkey;
ALTER TABLE provider_slots ADD PRIMARY KEY (key, task_id, step, item, unanswered);

-- A failed or cancelled task whose provider jobs were left open stays parked (`parked`,
-- `next_run_at` = its next poll) until every such job has ended and its cost is recorded:
-- claims find those tasks through this index (empty unless some task is settling).
CREATE INDEX tasks_settling ON tasks (workflow, next_run_at)
    WHERE parked AND status IN ('failed', 'cancelled');
