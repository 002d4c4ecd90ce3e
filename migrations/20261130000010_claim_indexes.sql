-- Index-backed claims (issue 14): a claim reads a worker's own leases through
-- `tasks_lease_owner` (few rows), then walks the runnable tasks in due order through
-- `tasks_due` and stops at the first free one, instead of sorting every runnable task.
-- `COALESCE(next_run_at, created_at)` is the due time: a task without `next_run_at` is due
-- since it was created.
CREATE INDEX tasks_due ON tasks ((COALESCE(next_run_at, created_at)))
    WHERE status NOT IN ('final_review', 'completed', 'failed', 'cancelled');
CREATE INDEX tasks_lease_owner ON tasks (lease_owner)
    WHERE lease_owner IS NOT NULL;
