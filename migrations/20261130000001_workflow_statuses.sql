-- Statuses belong to the workflows: the engine owns the lifecycle (queued, retry_scheduled,
-- final_review, completed, failed, cancelled) and each step declares the status shown while
-- it runs. The CHECK that listed the video pipeline's names becomes a shape check (the same
-- one `engine::TaskStatus::parse` applies), and the row keeps the name people see, copied
-- from `status_changed.to_display` (NULL for rows last changed by an older build: readers
-- fall back to the status's default name).
ALTER TABLE tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_status_shape
    CHECK (status ~ '^[a-z][a-z0-9_]{0,63}$');
ALTER TABLE tasks ADD COLUMN status_display text;
