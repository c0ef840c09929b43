-- As migrations/postgres 000009; the server checks the rule before it
-- writes (SQLite adds no constraint to an existing table).
ALTER TABLE inventory ADD COLUMN draw_window_ms INTEGER NOT NULL DEFAULT 0;
