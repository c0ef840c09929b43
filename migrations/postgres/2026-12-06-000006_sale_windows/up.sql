-- A SKU's sale window: Reserve admits from `opens_at` (inclusive) until
-- `closes_at` (exclusive); NULL leaves that side open. The order's own
-- `created_at` (when its Reserve was decided) is what the database checks.
ALTER TABLE inventory
    ADD COLUMN opens_at TIMESTAMP,
    ADD COLUMN closes_at TIMESTAMP,
    ADD CONSTRAINT inventory_sale_window_check
        CHECK (opens_at IS NULL OR closes_at IS NULL OR opens_at < closes_at);
