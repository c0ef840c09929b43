DROP TABLE queue_partitions;
