-- Relay bookkeeping, and idempotency of events from other subgraphs.

-- How often the relay tried to apply an event to the shared cache (a Redis
-- outage keeps the row unprocessed and retried).
ALTER TABLE outbox ADD COLUMN attempts integer NOT NULL DEFAULT 0;

-- Events other subgraphs sent to POST /events, by their idempotency key: a
-- redelivered event is recognised and changes nothing.
CREATE TABLE external_events (
    event_key   text        PRIMARY KEY CHECK (length(event_key) BETWEEN 1 AND 128),
    kind        text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
