-- Time events and waits: timers a command sets for itself, waits for external events, recent
-- broadcast events (so an event that arrives just before its wait still matches), and events
-- that matched nothing.

CREATE TABLE timers (
    command_id  uuid NOT NULL,
    name        text NOT NULL,
    -- `after`, `at`, `cron`, `wait_timeout` (payload {type, key}), `group_deadline` (payload {group}).
    kind        text NOT NULL CHECK (kind IN ('after', 'at', 'cron', 'wait_timeout', 'group_deadline')),
    due_at      timestamptz NOT NULL,
    cron        text,
    tz          text,
    payload     jsonb,
    fired       integer NOT NULL DEFAULT 0,
    last_fired_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (command_id, name),
    CHECK ((kind = 'cron') = (cron IS NOT NULL))
);
-- The scheduler claims due timers oldest first: an index scan, however many are pending.
CREATE INDEX timers_due ON timers (due_at);

-- Wake the scheduler when a timer is added or moved: it then sleeps until the new earliest.
-- Identical notifications within one transaction are delivered once.
CREATE FUNCTION notify_timer_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cmdflow_timers', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER timers_changed AFTER INSERT OR UPDATE OF due_at ON timers
    FOR EACH ROW EXECUTE FUNCTION notify_timer_change();

CREATE TABLE waits (
    command_id      uuid NOT NULL,
    event_type      text NOT NULL,
    correlation_key text NOT NULL,
    timeout_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (command_id, event_type, correlation_key)
);
CREATE INDEX waits_by_key ON waits (event_type, correlation_key);

-- Broadcast events with a correlation key, kept for the early-event window. Also the dedupe
-- record of broadcast matching: (source, event_id) is matched once.
CREATE TABLE recent_events (
    source          text NOT NULL,
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    correlation_key text NOT NULL,
    body            jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (source, event_id)
);
CREATE INDEX recent_events_by_key ON recent_events (event_type, correlation_key, received_at);
CREATE INDEX recent_events_age ON recent_events (received_at);

-- Broadcast events that started nothing and woke nobody: kept for inspection.
CREATE TABLE unmatched_events (
    source          text NOT NULL,
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    correlation_key text,
    body            jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
);
CREATE INDEX unmatched_events_recent ON unmatched_events (received_at DESC);
CREATE INDEX unmatched_events_by_type ON unmatched_events (event_type, received_at DESC);
