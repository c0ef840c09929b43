-- Same tables and constraints as migrations/postgres, in SQLite's dialect,
-- for the embedded profile. Keep the two in step.
CREATE TABLE inventory (
    sku          VARCHAR(64) PRIMARY KEY NOT NULL,
    stock        BIGINT      NOT NULL CHECK (stock >= 0),
    version      BIGINT      NOT NULL DEFAULT 0,
    max_per_user INTEGER     NOT NULL DEFAULT 0 CHECK (max_per_user >= 0),
    created_at   TIMESTAMP   NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at   TIMESTAMP   NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE reservations (
    reservation_id  VARCHAR(36)  PRIMARY KEY NOT NULL,
    sku             VARCHAR(64)  NOT NULL REFERENCES inventory (sku),
    user_id         VARCHAR(128) NOT NULL,
    idempotency_key VARCHAR(128),
    quantity        INTEGER      NOT NULL CHECK (quantity > 0),
    state           VARCHAR(16)  NOT NULL
        CHECK (state IN ('held', 'confirmed', 'released', 'expired', 'rejected')),
    reject_reason   TEXT,
    expires_at      TIMESTAMP,
    created_at      TIMESTAMP    NOT NULL,
    updated_at      TIMESTAMP    NOT NULL,
    UNIQUE (user_id, idempotency_key)
);

CREATE INDEX reservations_live_by_user ON reservations (sku, user_id)
    WHERE state IN ('held', 'confirmed');
CREATE INDEX reservations_hold_expiry ON reservations (expires_at)
    WHERE state = 'held';
