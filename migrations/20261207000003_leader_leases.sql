-- Leader locks as lease rows (issue 27), for a projector whose database URL goes through a
-- transaction pooler with no direct URL beside it: there is no session to hold an advisory
-- lock in. A row is held by `holder` until `expires_at`; its holder renews it every
-- second, and anyone may take it once it has expired.
CREATE TABLE leader_leases (
    name       text        PRIMARY KEY,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX leader_leases_holder ON leader_leases (holder);
