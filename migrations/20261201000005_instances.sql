-- The live instances: each one upserts its row every second while it runs
-- (and deletes it when it stops). A writer waits for every instance whose
-- heartbeat is recent to acknowledge its invalidation before answering; an
-- instance not in this set serves no L1 (see events/visibility.rs).
CREATE TABLE instances (
    origin       bigint      PRIMARY KEY,
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
