-- Work partitions: a namespace's events are split into partition queues by command, and each
-- partition is consumed by one worker at a time, so one command's events are applied in the
-- order they were accepted. A worker claims partitions here under a lease it renews; workers
-- share them evenly, and a dead worker's partitions are taken over when its lease runs out.
CREATE TABLE work_partitions (
    namespace   text NOT NULL,
    partition   integer NOT NULL,
    owner       text,
    lease_until timestamptz,
    PRIMARY KEY (namespace, partition)
);

-- Which workers are alive, so each knows its fair share of the partitions.
CREATE TABLE worker_heartbeats (
    namespace text NOT NULL,
    worker    text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, worker)
);

-- Events for a command whose start has not been applied yet: parked in the order they came,
-- applied right after the start, in that order (the start may come the slower way, forwarded
-- from `ns.work`, or be still in a parent's outbox). One not claimed by a start within
-- CMDFLOW_START_WAIT becomes a dead letter.
CREATE TABLE parked_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id  uuid NOT NULL,
    partition   integer NOT NULL,
    source      text NOT NULL,
    event_id    text NOT NULL,
    routing_key text NOT NULL,
    body        bytea NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (command_id, source, event_id)
);
CREATE INDEX parked_events_by_command ON parked_events (command_id, id);
CREATE INDEX parked_events_by_partition ON parked_events (partition);
CREATE INDEX parked_events_by_age ON parked_events (parked_at);
