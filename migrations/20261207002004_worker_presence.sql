-- Worker presence (issue 28): each worker says, with a heartbeat, which workflow versions
-- it claims (those it runs and the older ones it upgrades). A task of a version no live
-- worker claims is stranded: `reel tasks --stranded` lists such tasks, and workers warn
-- while any exist. A worker that stops cleanly removes its row; one that dies stops
-- counting once its row expires.
CREATE TABLE workers (
    worker_id  text        PRIMARY KEY,
    workflows  text[]      NOT NULL,
    versions   integer[]   NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    CHECK (cardinality(workflows) = cardinality(versions))
);

-- The first shape recorded for a workflow version is marked: two workers recording
-- different shapes for one version at the same moment no longer each see their own as
-- the first (the second waits for the first's mark and finds it).
ALTER TABLE workflow_versions ADD COLUMN first boolean NOT NULL DEFAULT false;
UPDATE workflow_versions w SET first = true
 WHERE (w.first_seen_at, w.fingerprint) = (
       SELECT o.first_seen_at, o.fingerprint FROM workflow_versions o
        WHERE o.workflow = w.workflow AND o.version = w.version
        ORDER BY o.first_seen_at, o.fingerprint LIMIT 1);
CREATE UNIQUE INDEX workflow_versions_first ON workflow_versions (workflow, version) WHERE first;
