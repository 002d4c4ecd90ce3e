-- The task list (`reel tasks`, the console) pages newest first by (created_at, id): an
-- index in that order serves any page of a 100,000-task table without a sort.
CREATE INDEX tasks_newest_first ON tasks (created_at DESC, id DESC);
