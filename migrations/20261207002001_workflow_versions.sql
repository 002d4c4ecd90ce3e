-- Workflow versions (issue 28). Each task records the version of its workflow it was
-- submitted for (tasks from before versions are version 1), and each worker records, at
-- start, the shape of every workflow version it serves (its steps, their kinds, the review
-- gate, the input type): a build whose shape differs from the one first recorded under the
-- same version is seen, and with `reel worker --strict-versions` refused.
ALTER TABLE tasks ADD COLUMN workflow_version integer NOT NULL DEFAULT 1;

CREATE TABLE workflow_versions (
    workflow      text        NOT NULL,
    version       integer     NOT NULL CHECK (version >= 1),
    fingerprint   text        NOT NULL,
    shape         text        NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    first_seen_by text        NOT NULL,
    PRIMARY KEY (workflow, version, fingerprint)
);
