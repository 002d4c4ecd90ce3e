-- Claims walk the due tasks of each workflow the worker runs, in due order, through this
-- index, so a backlog of another workflow's tasks is never read (a global due index made
-- a worker step over every due task of the workflows it does not run).
CREATE INDEX tasks_workflow_due ON tasks (workflow, (COALESCE(next_run_at, created_at)))
    WHERE status NOT IN ('final_review', 'completed', 'failed', 'cancelled');
DROP INDEX tasks_due;
