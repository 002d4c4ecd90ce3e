-- The notion-projector's intake asks, for each new-looking card, whether a task already owns
-- its page (issue 26: a card the projector made, whose Task ID someone cleared, must not
-- become a second task). Cards are looked up by page.
CREATE INDEX notion_cards_page ON notion_cards (page_id);
