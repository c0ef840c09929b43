-- Sold-out policy per SKU: `instant` answers sold out; `waitlist` lets a
-- caller who asks for it wait in line (a WAITLISTED reservation) and hands
-- returned units to the oldest waiting entry inside the transaction that
-- returned them, so they never reach stock a newcomer could take.
ALTER TABLE inventory
    ADD COLUMN sold_out_policy VARCHAR(16) NOT NULL DEFAULT 'instant'
        CHECK (sold_out_policy IN ('instant', 'waitlist')),
    -- Waiting entries allowed at once; 0 = the server's default.
    ADD COLUMN waitlist_limit INTEGER NOT NULL DEFAULT 0 CHECK (waitlist_limit >= 0);

ALTER TABLE reservations DROP CONSTRAINT reservations_state_check;
ALTER TABLE reservations ADD CONSTRAINT reservations_state_check
    CHECK (state IN ('waitlisted', 'held', 'confirmed', 'released', 'expired', 'rejected'));

-- One waiting entry per user per SKU.
CREATE UNIQUE INDEX reservations_one_wait_per_user ON reservations (sku, user_id)
    WHERE state = 'waitlisted';
-- The hand-off and the positions read the line oldest first.
CREATE INDEX reservations_waitlist_order ON reservations (sku, created_at, reservation_id)
    WHERE state = 'waitlisted';
