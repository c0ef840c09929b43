-- Units operators made available for a SKU in all (set or adjusted stock),
-- so the invariant checker can verify conservation: no order operation
-- changes stock + held + confirmed, only SetStock and AdjustStock change
-- `supplied`, so the two must stay equal. An oversell breaks it.
ALTER TABLE inventory ADD COLUMN supplied BIGINT NOT NULL DEFAULT 0;
UPDATE inventory SET supplied = stock + COALESCE(
    (SELECT SUM(quantity) FROM reservations r
      WHERE r.sku = inventory.sku AND r.state IN ('held', 'confirmed')), 0);
