-- Queue tickets shared by every API replica, so a caller's position in the
-- order queue ("position 14,832") means the same whichever replica answers.
-- A sequence is not transactional: a ticket is never handed out twice and
-- taking one never waits on another transaction.
CREATE SEQUENCE order_tickets;

-- How far the order processor got (the highest ticket it settled), so a
-- replica that starts mid-sale computes positions without waiting for the
-- processor's next notice. One row.
CREATE TABLE queue_progress (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    done_through BIGINT  NOT NULL DEFAULT 0
);
INSERT INTO queue_progress (id) VALUES (1);
