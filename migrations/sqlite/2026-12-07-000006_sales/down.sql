DROP INDEX inventory_by_sale;
ALTER TABLE inventory DROP COLUMN sale_id;
DROP TABLE sales;
