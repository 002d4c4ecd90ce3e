-- reel_notion_page_key reads a page id exactly as notion-projector's PageId::parse does
-- (review of issue 26): surrounding Unicode white space is trimmed, and only a last path
-- segment that is 32 hex digits (dashes allowed), or a URL's `Title-<32 hex>` segment,
-- names a page. The first version trimmed spaces only (missing `<id>\r\n`) and took the
-- last 32 hex digits of anything (matching `page-<id>`, which names no page).
CREATE OR REPLACE FUNCTION reel_notion_page_key(raw text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$
    WITH trimmed AS (
        SELECT regexp_replace(raw,
            '^[[:space:]\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\u0085]+|[[:space:]\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\u0085]+$',
            '', 'g') AS s
    ), segment AS (
        SELECT s, substring(rtrim(split_part(split_part(s, '?', 1), '#', 1), '/') FROM '[^/]*$') AS g
          FROM trimmed
    )
    SELECT lower(CASE
        WHEN replace(g, '-', '') ~ '^[0-9A-Fa-f]{32}$' THEN replace(g, '-', '')
        WHEN position('/' IN s) > 0 THEN substring(g FROM '-([0-9A-Fa-f]{32})$')
    END) FROM segment
$$;

REINDEX INDEX tasks_notion_page_key;
