-- A request of the notion-projector that got no clear answer (a timeout, a cut connection,
-- a gateway's 502/504) may still be applied by Notion until its own deadline (60 s after it
-- was sent), after a newer status landed (issue 26). Until this time the task's newest
-- status is owed once more: it is sent again after it. Kept with the pending retry, so a
-- crash or a new leader still sends it.
ALTER TABLE sync_retries ADD COLUMN unsettled_until timestamptz;
