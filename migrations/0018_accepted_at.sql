-- When cmdflow accepted a broadcast kept for the early-event window (the gateway's or the
-- engine's `acceptedat`; the worker's first sight of it when the event came straight to the
-- broker without one). An early event matches only the waits of a command that started before
-- it was accepted: the window is for the race between a command's start and its wait, and an
-- event older than the command never decides it. A row without it counts as accepted when it
-- was received.
ALTER TABLE recent_events ADD COLUMN IF NOT EXISTS accepted_at timestamptz;

INSERT INTO schema_compat (version, compatible, note) VALUES
    (18, true, 'adds recent_events.accepted_at (nullable; read as received_at when null)')
ON CONFLICT (version) DO NOTHING;
