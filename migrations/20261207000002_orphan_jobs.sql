-- Jobs a provider accepted that their worker could not record in the log (issue 25): it
-- lost the task's lease — another worker claimed the task — while PostgreSQL was out of
-- reach. The fact cannot go in the log without the lease, so it waits here until the
-- task's next run records it as the item's submission and polls it, instead of paying
-- for the item again. A row is deleted once its job is in the log.
CREATE TABLE orphan_jobs (
    task_id    uuid        NOT NULL,
    step       text        NOT NULL,
    item       int         NOT NULL,
    submission int         NOT NULL,
    job        jsonb       NOT NULL,
    worker     text        NOT NULL,
    found_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, step, item, submission)
);
