DROP SEQUENCE order_tickets;
