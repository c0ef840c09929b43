-- As migrations/postgres 000008.
CREATE TABLE sales (
    sale_id TEXT PRIMARY KEY NOT NULL,
    max_per_user INTEGER NOT NULL DEFAULT 0 CHECK (max_per_user >= 0),
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
ALTER TABLE inventory ADD COLUMN sale_id TEXT REFERENCES sales (sale_id);
CREATE INDEX inventory_by_sale ON inventory (sale_id);
