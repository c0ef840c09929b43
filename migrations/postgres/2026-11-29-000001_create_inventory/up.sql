-- The source of truth for stock. `stock` counts units still available:
-- held and confirmed units have already been taken out of it, so the
-- optimistic commit is a single conditional row update.
CREATE TABLE inventory (
    sku          VARCHAR(64) PRIMARY KEY,
    stock        BIGINT      NOT NULL CHECK (stock >= 0),
    version      BIGINT      NOT NULL DEFAULT 0,
    max_per_user INTEGER     NOT NULL DEFAULT 0 CHECK (max_per_user >= 0),
    created_at   TIMESTAMP   NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    updated_at   TIMESTAMP   NOT NULL DEFAULT (now() AT TIME ZONE 'utc')
);

-- One row per reservation that reached the database. The primary key makes
-- a redelivered queue message find its order instead of creating another;
-- (user_id, idempotency_key) makes a retried request do the same.
CREATE TABLE reservations (
    reservation_id  VARCHAR(36)  PRIMARY KEY,
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

-- The per-user cap sums a user's live units of one SKU.
CREATE INDEX reservations_live_by_user ON reservations (sku, user_id)
    WHERE state IN ('held', 'confirmed');
-- The expiry sweeper scans only holds.
CREATE INDEX reservations_hold_expiry ON reservations (expires_at)
    WHERE state = 'held';
