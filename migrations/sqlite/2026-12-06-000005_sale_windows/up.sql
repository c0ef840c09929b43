-- As migrations/postgres 000006. SQLite adds no table constraint to an
-- existing table; the window's order is checked by the server before it
-- writes.
ALTER TABLE inventory ADD COLUMN opens_at TIMESTAMP;
ALTER TABLE inventory ADD COLUMN closes_at TIMESTAMP;
