-- A worker claims only the workflow versions it serves (issue 28): its claim walks each
-- served (workflow, version) in due order. This index replaces the one by workflow alone
-- (the count of a worker's unfinished tasks uses its prefix too).
CREATE INDEX tasks_workflow_version_due
    ON tasks (workflow, workflow_version, (COALESCE(next_run_at, created_at)));
DROP INDEX tasks_workflow_due;
