DROP TABLE reservations;
DROP TABLE inventory;
