ALTER TABLE inventory DROP COLUMN closes_at;
ALTER TABLE inventory DROP COLUMN opens_at;
