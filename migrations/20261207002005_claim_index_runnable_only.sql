-- The claim's index by workflow version (20261207002002) lost the WHERE of the index it
-- replaced: it held every task, finished ones included, and a claim walked past all of a
-- version's finished tasks (older, so first in due order) before the first runnable one —
-- with 200,000 finished tasks, 11 ms a claim for one version and 31 ms for three instead
-- of 0.5. It holds only the tasks that may run again, as before.
DROP INDEX tasks_workflow_version_due;
CREATE INDEX tasks_workflow_version_due
    ON tasks (workflow, workflow_version, (COALESCE(next_run_at, created_at)))
    WHERE status NOT IN ('final_review', 'completed', 'failed', 'cancelled');
