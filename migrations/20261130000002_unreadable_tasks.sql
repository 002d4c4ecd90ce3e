-- A task whose history this build cannot read (an event type or schema version from a
-- newer build) is set aside rather than failed: the worker releases it, it waits until
-- `next_run_at` (a wait that grows with how long it has been unreadable), and a newer
-- worker that can read it runs it; its first append clears the mark.
ALTER TABLE tasks ADD COLUMN unreadable_since timestamptz;
