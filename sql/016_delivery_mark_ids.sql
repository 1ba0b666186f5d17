-- ============================================
-- THE DELIVERY MARK, ANSWERING WITH IDS ONLY
-- Migration: 016_delivery_mark_ids
-- The same mark and events as mark_gestures_delivered (015), answering only with the ids
-- it marked and the transaction's now(), which is every event row's created_at: the
-- caller wrote each event's payload and has no need to read it back. A new name, so that
-- a process of the previous version, still running through a rolling deploy, goes on
-- calling the function it knows; 015's may be dropped once none is left.
-- ============================================

CREATE OR REPLACE FUNCTION mark_gestures_delivered_ids(
    p_ids UUID[],
    p_at TIMESTAMP WITH TIME ZONE,
    p_node BIGINT,
    p_channels TEXT[],
    p_payloads BYTEA[],
    p_relationships UUID[]
) RETURNS TABLE (
    gesture_id UUID,
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
        JOIN m ON m.id = e.e_gid)
    SELECT id, now() FROM m
$$;
