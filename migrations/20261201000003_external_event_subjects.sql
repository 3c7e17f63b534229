-- What an external event was about, so that a key reused for another
-- subject or another kind is recognised (409) instead of silently dropped.
-- Rows from before this migration have none and keep behaving as duplicates.
ALTER TABLE external_events ADD COLUMN subject text;
