-- The fleet's layer switches: one row, replaced whole with a new revision
-- by a compare-and-set on `revision`, so two operators cannot overwrite
-- each other unseen. Every replica polls it.
CREATE TABLE layer_switches (
    id         INTEGER   PRIMARY KEY CHECK (id = 1),
    revision   BIGINT    NOT NULL,
    switches   TEXT      NOT NULL,
    changed_by TEXT      NOT NULL,
    changed_at TIMESTAMP NOT NULL
);

-- Every operator action on the switches, applied or refused.
CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TIMESTAMP NOT NULL,
    actor   TEXT      NOT NULL,
    action  TEXT      NOT NULL,
    outcome TEXT      NOT NULL,
    before  TEXT      NOT NULL,
    after   TEXT      NOT NULL,
    reason  TEXT      NOT NULL
);

-- What each replica last reported running, so an operator sees which
-- replica is on which revision.
CREATE TABLE replicas (
    replica  VARCHAR(200) PRIMARY KEY,
    revision BIGINT       NOT NULL,
    switches TEXT         NOT NULL,
    seen_at  TIMESTAMP    NOT NULL
);
