-- A SKU's fair opening: calls in the first `draw_window_ms` after
-- `opens_at` are entered in a draw instead of admitted on arrival (0: no
-- draw). The draw itself is the stock gate's; the database keeps the
-- setting so that every replica's gate is loaded with it.
ALTER TABLE inventory
    ADD COLUMN draw_window_ms INTEGER NOT NULL DEFAULT 0,
    ADD CONSTRAINT inventory_draw_window_check
        CHECK (draw_window_ms >= 0 AND (draw_window_ms = 0 OR opens_at IS NOT NULL));
