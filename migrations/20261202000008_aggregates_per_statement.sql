-- The aggregates are maintained once per statement instead of once per row.
--
-- Why: a statement that changes many reviews of one offer (an offer
-- removed with its 12,000 reviews) updated the same offer_ratings row once
-- per review, each update walking the row versions the earlier ones had
-- left in the same transaction: quadratic, 5 s for 12,000 reviews (past
-- the statement timeout). Now the statement's changed rows (its transition
-- tables) are summed per offer and per author, and each aggregate row is
-- upserted once, in key order (concurrent statements lock aggregate rows
-- in the same order). Same transaction, same row locks, same write paths.
--
-- Transition tables allow one event per trigger: three triggers, one
-- function. An UPDATE trigger with transition tables cannot name columns,
-- so an edit of the text alone fires it too; its deltas sum to zero and
-- nothing is written.

-- Adds summed deltas of (offer, author, rating, ±1) changes to the aggregates.
CREATE FUNCTION reviews_apply_changes(p_offer text[], p_author text[], p_rating smallint[], p_delta integer[])
RETURNS void LANGUAGE sql AS $$
    WITH changes AS (
        SELECT * FROM unnest(p_offer, p_author, p_rating, p_delta) AS c (offer_id, author_id, rating, delta)
    ), offers AS (
        INSERT INTO offer_ratings AS o (offer_id, review_count, rating_sum, stars_1, stars_2, stars_3, stars_4, stars_5)
        SELECT offer_id, n, s, s1, s2, s3, s4, s5 FROM (
            SELECT offer_id, sum(delta) AS n, sum(delta * rating) AS s,
                   coalesce(sum(delta) FILTER (WHERE rating = 1), 0) AS s1,
                   coalesce(sum(delta) FILTER (WHERE rating = 2), 0) AS s2,
                   coalesce(sum(delta) FILTER (WHERE rating = 3), 0) AS s3,
                   coalesce(sum(delta) FILTER (WHERE rating = 4), 0) AS s4,
                   coalesce(sum(delta) FILTER (WHERE rating = 5), 0) AS s5
            FROM changes GROUP BY offer_id
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
            stars_5      = o.stars_5 + EXCLUDED.stars_5
    )
    INSERT INTO author_review_counts AS a (author_id, review_count)
    SELECT author_id, n FROM (SELECT author_id, sum(delta) AS n FROM changes GROUP BY author_id) per_author
    WHERE n <> 0
    ORDER BY author_id
    ON CONFLICT (author_id) DO UPDATE SET review_count = a.review_count + EXCLUDED.review_count;
$$;

CREATE FUNCTION reviews_maintain_aggregates_per_statement() RETURNS trigger LANGUAGE plpgsql AS $$
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
    IF offers IS NOT NULL THEN
        PERFORM reviews_apply_changes(offers, authors, ratings, deltas);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER reviews_aggregates ON reviews;
DROP FUNCTION reviews_maintain_aggregates();
DROP FUNCTION reviews_apply_aggregate(text, text, smallint, integer);

CREATE TRIGGER reviews_aggregates_insert AFTER INSERT ON reviews
    REFERENCING NEW TABLE AS new_reviews
    FOR EACH STATEMENT EXECUTE FUNCTION reviews_maintain_aggregates_per_statement();
CREATE TRIGGER reviews_aggregates_update AFTER UPDATE ON reviews
    REFERENCING OLD TABLE AS old_reviews NEW TABLE AS new_reviews
    FOR EACH STATEMENT EXECUTE FUNCTION reviews_maintain_aggregates_per_statement();
CREATE TRIGGER reviews_aggregates_delete AFTER DELETE ON reviews
    REFERENCING OLD TABLE AS old_reviews
    FOR EACH STATEMENT EXECUTE FUNCTION reviews_maintain_aggregates_per_statement();
