-- Retention and archival (issue 31). A finished task's stream can move out of `events`
-- into an archive (a directory or an S3-compatible bucket); its row stays, and says so.
-- Additive: a task never archived has NULLs here and reads as before.
ALTER TABLE tasks
    -- When the stream left `events`, and the archive object that holds it (a URL).
    ADD COLUMN archived_at      timestamptz,
    ADD COLUMN archive_location text,
    -- What `reel stats` needs of the stream (spent, saved, items, jobs), kept on the row so
    -- that statistics stay whole without reading archives.
    ADD COLUMN archive_summary  jsonb;

-- The archiver's pick: finished, not archived, oldest first. Small: a finished task leaves
-- it when archived.
CREATE INDEX tasks_archivable ON tasks (updated_at, id)
    WHERE status IN ('completed', 'failed', 'cancelled') AND archived_at IS NULL;
