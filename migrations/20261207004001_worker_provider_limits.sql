-- The provider limits each live worker applies (issue 30, the console's providers page):
-- `{"<key>": {"max_in_flight": 5, "rate": 1.0}, ...}`, its workflows' defaults with its
-- `--max-in-flight`/`--rate` overrides, written with its heartbeat. Limits are worker
-- configuration, not shared state: each acquisition passes its worker's own cap, so this
-- says what the fleet applies (workers that disagree show as such). Additive.
ALTER TABLE workers ADD COLUMN providers jsonb NOT NULL DEFAULT '{}'::jsonb;
