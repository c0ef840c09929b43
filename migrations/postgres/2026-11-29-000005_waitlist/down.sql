DROP INDEX reservations_waitlist_order;
DROP INDEX reservations_one_wait_per_user;
UPDATE reservations SET state = 'expired' WHERE state = 'waitlisted';
ALTER TABLE reservations DROP CONSTRAINT reservations_state_check;
ALTER TABLE reservations ADD CONSTRAINT reservations_state_check
    CHECK (state IN ('held', 'confirmed', 'released', 'expired', 'rejected'));
ALTER TABLE inventory DROP COLUMN waitlist_limit, DROP COLUMN sold_out_policy;
