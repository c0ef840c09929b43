-- Tickets and progress of each partition of the order queue
-- (`rabbitmq.partitions` above 1). A caller's position counts the orders
-- ahead of it in its own partition, which its processor takes in order;
-- the other partitions are processed beside it. A row per partition,
-- made by the first publish to it; ticket numbers start at 1 in each.
-- The one-queue deployment keeps `order_tickets` and `queue_progress`.
CREATE TABLE queue_partitions (
    partition    INTEGER PRIMARY KEY CHECK (partition >= 0),
    last_ticket  BIGINT  NOT NULL DEFAULT 0 CHECK (last_ticket >= 0),
    done_through BIGINT  NOT NULL DEFAULT 0 CHECK (done_through >= 0)
);
