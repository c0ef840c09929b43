ALTER TABLE inventory DROP COLUMN draw_window_ms;
