-- Cards belong to the board (issue 26). Two projectors on one board (a Status and a Stage
-- property) share its cards: one of them owns the board (a session advisory lock on its
-- leader connection) and makes the cards; the others find them here by board and task.
-- Rows from before carry no board; a projector fills in its own rows' board when it leads.
ALTER TABLE notion_cards ADD COLUMN data_source text;
CREATE INDEX notion_cards_board ON notion_cards (data_source, task_id);

-- A card create sent whose answer was not heard (a timeout, a 5xx, a cut answer, a crash).
-- Notion's query can lag its writes, so for a while after such a create the projector only
-- looks for the card (by Task ID) and does not make it again. Written before the request
-- is sent; deleted when the card is recorded or Notion refused the create.
CREATE TABLE notion_card_creates (
    data_source text        NOT NULL,
    task_id     uuid        NOT NULL,
    projector   text        NOT NULL,
    sent_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (data_source, task_id)
);
