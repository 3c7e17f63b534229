-- Idempotency-Key: the first answer of a write, stored in the write's own
-- transaction (so a key exists exactly when its write committed). A retry
-- with the same key and request gets that answer again; rows older than a
-- day are pruned by the relay.
CREATE TABLE idempotency_keys (
    user_id     text        NOT NULL,
    key         text        NOT NULL,
    fingerprint text        NOT NULL,
    outcome     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
