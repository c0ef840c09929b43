-- Queue tickets shared by every API replica, so a caller's position in the
-- order queue ("position 14,832") means the same whichever replica answers.
-- A sequence is not transactional: a ticket is never handed out twice and
-- taking one never waits on another transaction.
CREATE SEQUENCE order_tickets;
