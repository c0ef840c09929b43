DROP INDEX reservations_waitlist_order;
DROP INDEX reservations_one_wait_per_user;
UPDATE reservations SET state = 'expired' WHERE state = 'waitlisted';
ALTER TABLE inventory DROP COLUMN waitlist_limit;
ALTER TABLE inventory DROP COLUMN sold_out_policy;
