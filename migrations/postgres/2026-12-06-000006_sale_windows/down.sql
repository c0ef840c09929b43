ALTER TABLE inventory
    DROP CONSTRAINT inventory_sale_window_check,
    DROP COLUMN closes_at,
    DROP COLUMN opens_at;
