-- How long a job step's provider jobs take, learned from the jobs the fleet saw end
-- (issue 33): a job is polled often only near its expected end, so an ended job is seen
-- within a tenth of its duration without polling it in a loop from the start. One row per
-- workflow step; a running mean of the first samples, then a moving average that follows
-- a provider getting faster or slower. Additive; losing it only makes polls follow the
-- job's age until jobs end again.
CREATE TABLE job_durations (
    workflow    text        NOT NULL,
    step        text        NOT NULL,
    expected_ms bigint      NOT NULL CHECK (expected_ms >= 0),
    samples     bigint      NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow, step)
);
