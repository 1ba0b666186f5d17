-- ============================================
-- RELATIONSHIPS
-- Migration: 010_relationships
-- The couples. Another system may insert a row with `id` alone and fill the rest later.
-- ============================================

CREATE TABLE IF NOT EXISTS relationships (
    id UUID PRIMARY KEY,
    partner_a_id TEXT,
    partner_b_id TEXT,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);
