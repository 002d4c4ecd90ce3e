-- notion_sync is per projector (issue 14): two projectors with different names (two boards,
-- or a Status and a Stage property) each keep their own mirror state instead of skipping
-- each other's tasks as already mirrored. Existing rows belong to the default projector
-- name, `notion`.
ALTER TABLE notion_sync ADD COLUMN projector text NOT NULL DEFAULT 'notion';
ALTER TABLE notion_sync ALTER COLUMN projector DROP DEFAULT;
ALTER TABLE notion_sync DROP CONSTRAINT notion_sync_pkey;
ALTER TABLE notion_sync ADD PRIMARY KEY (projector, task_id);
