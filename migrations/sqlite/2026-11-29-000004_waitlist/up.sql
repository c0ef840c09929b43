-- As migrations/postgres 000005. SQLite cannot change a CHECK constraint,
-- so the reservations table is rebuilt with the new state.
ALTER TABLE inventory ADD COLUMN sold_out_policy VARCHAR(16) NOT NULL DEFAULT 'instant'
    CHECK (sold_out_policy IN ('instant', 'waitlist'));
ALTER TABLE inventory ADD COLUMN waitlist_limit INTEGER NOT NULL DEFAULT 0
    CHECK (waitlist_limit >= 0);

CREATE TABLE reservations_next (
    reservation_id  VARCHAR(36)  PRIMARY KEY NOT NULL,
    sku             VARCHAR(64)  NOT NULL REFERENCES inventory (sku),
    user_id         VARCHAR(128) NOT NULL,
    idempotency_key VARCHAR(128),
    quantity        INTEGER      NOT NULL CHECK (quantity > 0),
    state           VARCHAR(16)  NOT NULL
        CHECK (state IN ('waitlisted', 'held', 'confirmed', 'released', 'expired', 'rejected')),
    reject_reason   TEXT,
    expires_at      TIMESTAMP,
    created_at      TIMESTAMP    NOT NULL,
    updated_at      TIMESTAMP    NOT NULL,
    UNIQUE (user_id, idempotency_key)
);
INSERT INTO reservations_next SELECT * FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_next RENAME TO reservations;

CREATE INDEX reservations_live_by_user ON reservations (sku, user_id)
    WHERE state IN ('held', 'confirmed');
CREATE INDEX reservations_hold_expiry ON reservations (expires_at)
    WHERE state = 'held';
CREATE UNIQUE INDEX reservations_one_wait_per_user ON reservations (sku, user_id)
    WHERE state = 'waitlisted';
CREATE INDEX reservations_waitlist_order ON reservations (sku, created_at, reservation_id)
    WHERE state = 'waitlisted';
