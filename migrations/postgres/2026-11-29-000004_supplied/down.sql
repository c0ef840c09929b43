ALTER TABLE inventory DROP COLUMN supplied;
