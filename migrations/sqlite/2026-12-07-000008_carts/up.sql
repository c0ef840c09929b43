-- As migrations/postgres 000010.
ALTER TABLE reservations ADD COLUMN cart_id VARCHAR(36);
CREATE INDEX reservations_by_cart ON reservations (cart_id) WHERE cart_id IS NOT NULL;
