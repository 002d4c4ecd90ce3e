-- The notion-projector's cards (issue 15): the Notion page it created (or found by its
-- `Task ID`) for a task submitted without one. Rebuildable: delete the projector's rows
-- and reset its checkpoint; before creating a card it queries the board by `Task ID`, so
-- a rebuilt mapping finds the existing cards instead of making second ones.
CREATE TABLE notion_cards (
    projector  text        NOT NULL,
    task_id    uuid        NOT NULL,
    page_id    text        NOT NULL,
    created    boolean     NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, task_id)
);
