-- A sale groups SKUs under one per-user cap: a user's live units (held or
-- confirmed) across all of the sale's SKUs stay at or below
-- `max_per_user` (0 = no cap). A SKU belongs to at most one sale.
CREATE TABLE sales (
    sale_id VARCHAR(64) PRIMARY KEY,
    max_per_user INTEGER NOT NULL DEFAULT 0 CHECK (max_per_user >= 0),
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
ALTER TABLE inventory ADD COLUMN sale_id VARCHAR(64) REFERENCES sales (sale_id);
CREATE INDEX inventory_by_sale ON inventory (sale_id) WHERE sale_id IS NOT NULL;
