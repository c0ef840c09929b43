DROP INDEX reservations_by_cart;
ALTER TABLE reservations DROP COLUMN cart_id;
