-- The aggregate upserts are planned once per connection instead of once
-- per statement.
--
-- Why: 20261202000008 ran them in a LANGUAGE sql function called with
-- PERFORM. Postgres plans such a function's body again on every call (it is
-- not inlinable: it writes), so each single-row insert paid ~0.5 ms of
-- planning for the two upserts: an insert with the trigger took ~1.0 ms,
-- against ~0.5 ms now (300 single-review inserts in one session, psql,
-- rolled back). Here they are statements of the PL/pgSQL trigger function,
-- whose plans the connection keeps. Same statements, same key order, same
-- row locks.
CREATE OR REPLACE FUNCTION reviews_maintain_aggregates_per_statement() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    offers text[];
    authors text[];
    ratings smallint[];
    deltas integer[];
BEGIN
    -- A row counts when it is PUBLISHED and live: take out what the old
    -- rows contributed and add what the new ones do. Each branch names
    -- only the transition tables its event has.
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(offer_id), array_agg(author_id), array_agg(rating), array_agg(1)
        INTO offers, authors, ratings, deltas
        FROM new_reviews WHERE status = 'PUBLISHED' AND deleted_at IS NULL;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(offer_id), array_agg(author_id), array_agg(rating), array_agg(-1)
        INTO offers, authors, ratings, deltas
        FROM old_reviews WHERE status = 'PUBLISHED' AND deleted_at IS NULL;
    ELSE
        SELECT array_agg(offer_id), array_agg(author_id), array_agg(rating), array_agg(delta)
        INTO offers, authors, ratings, deltas
        FROM (
            SELECT offer_id, author_id, rating, -1 AS delta FROM old_reviews
            WHERE status = 'PUBLISHED' AND deleted_at IS NULL
            UNION ALL
            SELECT offer_id, author_id, rating, 1 FROM new_reviews
            WHERE status = 'PUBLISHED' AND deleted_at IS NULL
        ) c;
    END IF;
    IF offers IS NULL THEN
        RETURN NULL;
    END IF;
    -- Summed per offer and per author; each aggregate row upserted once, in
    -- key order (concurrent statements lock aggregate rows in the same order).
    INSERT INTO offer_ratings AS o (offer_id, review_count, rating_sum, stars_1, stars_2, stars_3, stars_4, stars_5)
    SELECT offer_id, n, s, s1, s2, s3, s4, s5 FROM (
        SELECT c.offer_id, sum(c.delta) AS n, sum(c.delta * c.rating) AS s,
               coalesce(sum(c.delta) FILTER (WHERE c.rating = 1), 0) AS s1,
               coalesce(sum(c.delta) FILTER (WHERE c.rating = 2), 0) AS s2,
               coalesce(sum(c.delta) FILTER (WHERE c.rating = 3), 0) AS s3,
               coalesce(sum(c.delta) FILTER (WHERE c.rating = 4), 0) AS s4,
               coalesce(sum(c.delta) FILTER (WHERE c.rating = 5), 0) AS s5
        FROM unnest(offers, ratings, deltas) AS c (offer_id, rating, delta) GROUP BY c.offer_id
    ) per_offer
    WHERE n <> 0 OR s1 <> 0 OR s2 <> 0 OR s3 <> 0 OR s4 <> 0 OR s5 <> 0
    ORDER BY offer_id
    ON CONFLICT (offer_id) DO UPDATE SET
        review_count = o.review_count + EXCLUDED.review_count,
        rating_sum   = o.rating_sum + EXCLUDED.rating_sum,
        stars_1      = o.stars_1 + EXCLUDED.stars_1,
        stars_2      = o.stars_2 + EXCLUDED.stars_2,
        stars_3      = o.stars_3 + EXCLUDED.stars_3,
        stars_4      = o.stars_4 + EXCLUDED.stars_4,
        stars_5      = o.stars_5 + EXCLUDED.stars_5;
    INSERT INTO author_review_counts AS a (author_id, review_count)
    SELECT author_id, n FROM (
        SELECT c.author_id, sum(c.delta) AS n FROM unnest(authors, deltas) AS c (author_id, delta) GROUP BY c.author_id
    ) per_author
    WHERE n <> 0
    ORDER BY author_id
    ON CONFLICT (author_id) DO UPDATE SET review_count = a.review_count + EXCLUDED.review_count;
    RETURN NULL;
END;
$$;

DROP FUNCTION reviews_apply_changes(text[], text[], smallint[], integer[]);
