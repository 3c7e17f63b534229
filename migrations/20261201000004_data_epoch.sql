-- The data epoch: bumped by every bulk change made outside the mutations
-- (`seed`), which writes no outbox events. Every shared cache key carries
-- it, so no entry or token written before the change is ever read after it,
-- and every instance drops its L1 when it changes (NOTIFY ugc_epoch).
CREATE TABLE data_epoch (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch     bigint  NOT NULL
);
INSERT INTO data_epoch (epoch) VALUES (1);
