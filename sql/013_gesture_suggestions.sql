-- ============================================
-- SUGGESTED NOTES
-- Migration: 013_gesture_suggestions
-- A suggestion the service made, so that a gesture sent with its id within an hour, by the
-- same sender in the same relationship, is stored with ai_generated and the context the
-- suggestion drew on (the service writes ai_context_used, never the client).
-- ============================================

CREATE TABLE IF NOT EXISTS gesture_suggestions (
    id UUID PRIMARY KEY,
    relationship_id UUID NOT NULL REFERENCES relationships(id) ON DELETE CASCADE,
    sent_by TEXT NOT NULL CHECK (sent_by IN ('partner_a', 'partner_b')),
    gesture_type TEXT NOT NULL CHECK (gesture_type IN ('hug', 'kiss', 'thinking_of_you')),
    -- {"suggestion_id", "source": "builtin" | "provider", "context_used": [names]}
    context JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

-- The relay's periodic clean-up deletes expired suggestions by age.
CREATE INDEX IF NOT EXISTS idx_gesture_suggestions_created
    ON gesture_suggestions(created_at);
