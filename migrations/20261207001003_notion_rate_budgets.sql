-- One request budget per Notion token (issue 26): every projector using the token takes
-- its turns here, so two projectors on one token stay within Notion's 3 requests/s
-- together. `budget` is a SHA-256 of the token, never the token. A request reserves the
-- next free time (`next_at` moves on by one interval) and waits until its own; a 429 or
-- 529 moves `paused_until`, which every projector's next reservation respects.
CREATE TABLE notion_rate_budgets (
    budget       text        PRIMARY KEY,
    next_at      timestamptz NOT NULL,
    paused_until timestamptz NOT NULL DEFAULT '-infinity'
);
