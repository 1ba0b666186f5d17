-- ============================================
-- THE DELIVERY MARK, PLANNED WITH THE TABLE AS IT IS
-- Migration: 015_delivery_mark
-- The mark of delivered gestures and the events that announce them, in one statement
-- (store.mark_delivered_from). As a prepared statement it ran on a plan that PostgreSQL
-- may cache after five executions, costed with the table's size at that moment: on a new
-- database a hash join over a sequential scan of a few hundred rows, then kept while the
-- table grew until an ANALYZE replaced it (17 ms a mark at 20,000 rows, growing with the
-- table). A SQL function's body is planned again on each call, with the table's current
-- size, and the SET keeps that plan on the primary key even while the statistics are
-- stale. Steady-state cost is the same as the statement's (docs/performance.md).
-- ============================================

CREATE OR REPLACE FUNCTION mark_gestures_delivered(
    p_ids UUID[],
    p_at TIMESTAMP WITH TIME ZONE,
    p_node BIGINT,
    p_channels TEXT[],
    p_payloads BYTEA[],
    p_relationships UUID[]
) RETURNS TABLE (
    gesture_id UUID,
    event_channel TEXT,
    event_payload BYTEA,
    event_relationship_id UUID,
    event_created_at TIMESTAMP WITH TIME ZONE
)
LANGUAGE sql
VOLATILE
SET enable_seqscan = off
AS $$
    WITH m AS (
        UPDATE connection_gestures g SET delivered_at = p_at
        FROM unnest(p_ids) AS t(id)
        WHERE g.id = t.id AND coalesce(g.acknowledged_at, g.delivered_at) IS NULL
        RETURNING g.id),
    e AS (
        INSERT INTO gesture_events (node, channel, payload, relationship_id)
        SELECT p_node, e_channel, e_payload, e_rel
        FROM unnest(p_ids, p_channels, p_payloads, p_relationships)
            AS e(e_gid, e_channel, e_payload, e_rel)
        JOIN m ON m.id = e.e_gid
        RETURNING channel, payload, relationship_id, created_at)
    SELECT NULL::uuid, channel, payload, relationship_id, created_at FROM e
    UNION ALL SELECT id, NULL, NULL, NULL, NULL FROM m
$$;
