-- The web console: command search newest first (keyset on created_at, id), and the overview's
-- throughput. `created_at` and `kind` never change, so once updates of a command are HOT
-- (0008), these indexes cost one entry per command created, not one per event applied; only
-- the two searches that cannot be served otherwise get a full index, and failures a partial one.

-- Every command, newest first: the search without owner or kind, and its time ranges.
CREATE INDEX commands_recent ON commands (created_at DESC, id DESC);

-- One kind, newest first. Without it, a rare kind would walk the whole recency index.
CREATE INDEX commands_kind_recent ON commands (kind, created_at DESC, id DESC);

-- Failed and aborted commands, newest first. A command enters once, as it ends, and is never
-- updated again, so the index costs one insert per failure, not one per event.
CREATE INDEX commands_failed_recent ON commands (created_at DESC, id DESC)
    WHERE state IN ('failed', 'aborted');

-- Events processed and failed attempts by time, for events per second. Both tables are
-- append-only in time order, where a BRIN index is a few pages and almost free to maintain.
CREATE INDEX processed_events_at ON processed_events USING brin (processed_at) WITH (pages_per_range = 32);
CREATE INDEX event_attempts_at ON event_attempts USING brin (at) WITH (pages_per_range = 32);
