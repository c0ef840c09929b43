ALTER TABLE inventory
    DROP CONSTRAINT inventory_draw_window_check,
    DROP COLUMN draw_window_ms;
