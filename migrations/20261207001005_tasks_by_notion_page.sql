-- The notion-projector's intake asks whether a task already names a card's page as its
-- Notion page (`reel submit --notion-page`, `NewTask::notion_page_id`): such a card must not
-- become a second task (issue 26 review). Tasks keep the page as it was given (a dashed or
-- undashed id, or a page URL), so they are looked up by the page's 32 hex digits.
CREATE FUNCTION reel_notion_page_key(raw text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$
    SELECT lower(substring(
        replace(rtrim(split_part(split_part(btrim(raw), '?', 1), '#', 1), '/'), '-', '')
        FROM '([0-9A-Fa-f]{32})$'))
$$;

CREATE INDEX tasks_notion_page_key ON tasks (reel_notion_page_key(notion_page_id))
    WHERE notion_page_id IS NOT NULL;
