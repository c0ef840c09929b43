-- A cart holds several SKUs under one reservation: one row per line, all
-- decided in one transaction, each line's `cart_id` the id of the cart's
-- first line (which alone carries the idempotency key). Lines are rows
-- like any other, so stock, per-user limits, expiry and the invariant
-- checks count them as they count single orders.
ALTER TABLE reservations ADD COLUMN cart_id VARCHAR(36);
CREATE INDEX reservations_by_cart ON reservations (cart_id) WHERE cart_id IS NOT NULL;
