DROP TABLE queue_progress;
DROP SEQUENCE order_tickets;
