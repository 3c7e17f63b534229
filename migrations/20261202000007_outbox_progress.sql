-- Bounded relay work: an event with many tags (an offer with 100,000
-- reviews removed) is applied to the shared cache in chunks, resumably
-- (`progress` = tags applied so far); failures are retried with back-off
-- (`next_attempt_at`), and an event that keeps failing is parked
-- (`parked_at`, counted in ugc_outbox_parked_total) instead of retried
-- forever. Requeue a parked event with
--   UPDATE outbox SET parked_at = NULL, attempts = 0 WHERE id = …;
ALTER TABLE outbox
    ADD COLUMN progress        integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz,
    ADD COLUMN parked_at       timestamptz;
