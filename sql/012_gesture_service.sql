-- ============================================
-- WHAT THE RULES NEED
-- Migration: 012_gesture_service
-- Idempotency keys, the transactional outbox of Redis events, and the index that serves
-- the keyset pagination of recent gestures.
-- ============================================

-- One row a key a sender a relationship. A key older than the idempotency window is taken
-- over by the next request that uses it (ON CONFLICT ... WHERE created_at < ...).
CREATE TABLE IF NOT EXISTS gesture_idempotency (
    relationship_id UUID NOT NULL REFERENCES relationships(id) ON DELETE CASCADE,
    sent_by TEXT NOT NULL CHECK (sent_by IN ('partner_a', 'partner_b')),
    key TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    gesture_id UUID NOT NULL
        REFERENCES connection_gestures(id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (relationship_id, sent_by, key)
);

CREATE INDEX IF NOT EXISTS idx_gesture_idempotency_created
    ON gesture_idempotency(created_at);

-- Events written in the same transaction as the change they announce, published after
-- commit and deleted once Redis took them.
CREATE TABLE IF NOT EXISTS gesture_outbox (
    id BIGSERIAL PRIMARY KEY,
    channel TEXT NOT NULL,
    payload BYTEA NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_gestures_recent
    ON connection_gestures(relationship_id, sent_at DESC, id DESC);
