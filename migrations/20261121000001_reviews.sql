-- Reviews of offers, their per-offer and per-author aggregates, and the
-- transactional outbox of entity-change events.
--
-- Every list the API serves is a keyset-paginated range scan of one partial
-- index below (only PUBLISHED, not deleted rows are ever listed):
--   offer, NEWEST / OLDEST   -> reviews_offer_time     (forward / backward scan)
--   offer, HIGHEST_RATING    -> reviews_offer_rating   (backward scan)
--   offer, LOWEST_RATING     -> reviews_offer_low      (backward scan on -rating)
--   author, newest first     -> reviews_author_time
-- Ties are always broken by (created_at DESC, id DESC) so a page boundary is
-- a single row-value comparison the index can seek to.

CREATE TABLE reviews (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    offer_id    text        NOT NULL CHECK (length(offer_id) BETWEEN 1 AND 64),
    author_id   text        NOT NULL CHECK (length(author_id) BETWEEN 1 AND 64),
    rating      smallint    NOT NULL CHECK (rating BETWEEN 1 AND 5),
    body        text        NOT NULL CHECK (length(body) BETWEEN 1 AND 5000),
    status      text        NOT NULL DEFAULT 'PUBLISHED'
                            CHECK (status IN ('PUBLISHED', 'PENDING', 'REJECTED')),
    -- Millisecond precision: what the API prints is exactly what is stored,
    -- so cursors built from printed values round-trip.
    created_at  timestamptz NOT NULL DEFAULT date_trunc('milliseconds', now()),
    updated_at  timestamptz NOT NULL DEFAULT date_trunc('milliseconds', now()),
    deleted_at  timestamptz,
    -- Bumped on every change; caches and the stale-read detector compare it.
    version     bigint      NOT NULL DEFAULT 1
);

-- One live review per (offer, author); a soft-deleted one does not count.
CREATE UNIQUE INDEX reviews_one_live_per_author
    ON reviews (offer_id, author_id) WHERE deleted_at IS NULL;

CREATE INDEX reviews_offer_time ON reviews (offer_id, created_at, id)
    WHERE status = 'PUBLISHED' AND deleted_at IS NULL;
CREATE INDEX reviews_offer_rating ON reviews (offer_id, rating, created_at, id)
    WHERE status = 'PUBLISHED' AND deleted_at IS NULL;
CREATE INDEX reviews_offer_low ON reviews (offer_id, (-rating), created_at, id)
    WHERE status = 'PUBLISHED' AND deleted_at IS NULL;
CREATE INDEX reviews_author_time ON reviews (author_id, created_at, id)
    WHERE status = 'PUBLISHED' AND deleted_at IS NULL;

-- Aggregates over PUBLISHED, live reviews. Maintained by a row trigger in the
-- same transaction as the review change rather than computed on read:
--   * exact under concurrency: the trigger's UPSERT row-locks the aggregate
--     row, so concurrent writers to one offer serialise on it and never lose
--     an update, and a reader sees either all of a transaction or none of it;
--   * every write path (mutations, external events, manual SQL) keeps them
--     right, because none can forget to call it;
--   * a read is one primary-key lookup per offer instead of a scan over a
--     hot offer's tens of thousands of reviews.
-- Bulk loads (seed) disable the trigger and rebuild these tables in one pass.
CREATE TABLE offer_ratings (
    offer_id     text   PRIMARY KEY,
    review_count bigint NOT NULL DEFAULT 0,
    rating_sum   bigint NOT NULL DEFAULT 0,
    stars_1      bigint NOT NULL DEFAULT 0,
    stars_2      bigint NOT NULL DEFAULT 0,
    stars_3      bigint NOT NULL DEFAULT 0,
    stars_4      bigint NOT NULL DEFAULT 0,
    stars_5      bigint NOT NULL DEFAULT 0
);

CREATE TABLE author_review_counts (
    author_id    text   PRIMARY KEY,
    review_count bigint NOT NULL DEFAULT 0
);

CREATE FUNCTION reviews_apply_aggregate(p_offer text, p_author text, p_rating smallint, p_delta integer)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO offer_ratings AS o (offer_id, review_count, rating_sum, stars_1, stars_2, stars_3, stars_4, stars_5)
    VALUES (p_offer, p_delta, p_delta * p_rating,
            CASE WHEN p_rating = 1 THEN p_delta ELSE 0 END,
            CASE WHEN p_rating = 2 THEN p_delta ELSE 0 END,
            CASE WHEN p_rating = 3 THEN p_delta ELSE 0 END,
            CASE WHEN p_rating = 4 THEN p_delta ELSE 0 END,
            CASE WHEN p_rating = 5 THEN p_delta ELSE 0 END)
    ON CONFLICT (offer_id) DO UPDATE SET
        review_count = o.review_count + EXCLUDED.review_count,
        rating_sum   = o.rating_sum + EXCLUDED.rating_sum,
        stars_1      = o.stars_1 + EXCLUDED.stars_1,
        stars_2      = o.stars_2 + EXCLUDED.stars_2,
        stars_3      = o.stars_3 + EXCLUDED.stars_3,
        stars_4      = o.stars_4 + EXCLUDED.stars_4,
        stars_5      = o.stars_5 + EXCLUDED.stars_5;
    INSERT INTO author_review_counts AS a (author_id, review_count)
    VALUES (p_author, p_delta)
    ON CONFLICT (author_id) DO UPDATE SET review_count = a.review_count + EXCLUDED.review_count;
$$;

CREATE FUNCTION reviews_maintain_aggregates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A row counts when it is PUBLISHED and live; take out what the old row
    -- contributed and add what the new one does.
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'PUBLISHED' AND OLD.deleted_at IS NULL THEN
        PERFORM reviews_apply_aggregate(OLD.offer_id, OLD.author_id, OLD.rating, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status = 'PUBLISHED' AND NEW.deleted_at IS NULL THEN
        PERFORM reviews_apply_aggregate(NEW.offer_id, NEW.author_id, NEW.rating, 1);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER reviews_aggregates
    AFTER INSERT OR UPDATE OF status, rating, deleted_at, offer_id, author_id OR DELETE ON reviews
    FOR EACH ROW EXECUTE FUNCTION reviews_maintain_aggregates();

-- Transactional outbox: every mutation appends its entity-change event here in
-- the same transaction as the data change, so an invalidation can never be
-- lost to a crash between commit and publish.
CREATE TABLE outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event        jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    processed_at timestamptz
);
CREATE INDEX outbox_unprocessed ON outbox (id) WHERE processed_at IS NULL;
