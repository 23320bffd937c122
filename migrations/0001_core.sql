-- cmdflow core tables: commands, their append-only history, dedupe of processed events, and the outbox.

CREATE TYPE command_state AS ENUM ('pending', 'running', 'waiting', 'completed', 'failed', 'aborted');

CREATE TABLE commands (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL,
    owner       text NOT NULL,
    parent_id   uuid,
    root_id     uuid NOT NULL,
    depth       integer NOT NULL DEFAULT 0,
    state       command_state NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    result      jsonb,
    reason      text,
    ui          jsonb,
    version     bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    CONSTRAINT commands_kind_len CHECK (length(kind) BETWEEN 1 AND 64),
    CONSTRAINT commands_owner_len CHECK (length(owner) BETWEEN 3 AND 200),
    CONSTRAINT commands_ended_when_terminal
        CHECK ((state IN ('completed', 'failed', 'aborted')) = (ended_at IS NOT NULL))
);

-- A person's recent commands (owner feed, "the last 10 queries you ran").
CREATE INDEX commands_owner_recent ON commands (owner, created_at DESC, id DESC);
-- A person's open commands (pending conditions): small, partial.
CREATE INDEX commands_owner_open ON commands (owner, kind)
    WHERE state IN ('pending', 'running', 'waiting');
-- Children by parent, trees by root.
CREATE INDEX commands_parent ON commands (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX commands_root ON commands (root_id);
-- Archival: terminal trees by age.
CREATE INDEX commands_ended ON commands (ended_at) WHERE ended_at IS NOT NULL AND parent_id IS NULL;

-- Append-only history: what came in, what went out, state changes, what was ignored and why.
CREATE TABLE command_events (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id  uuid NOT NULL,
    version     bigint NOT NULL,
    entry       text NOT NULL CHECK (entry IN ('received', 'emitted', 'state_changed', 'ignored')),
    event_id    text,
    event_type  text,
    from_state  command_state,
    to_state    command_state,
    detail      jsonb,
    -- When the line was written (not when its transaction began), so latencies measured
    -- against it include the work of the transaction.
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX command_events_by_command ON command_events (command_id, seq);

-- Exactly-once effect: an event (CloudEvents source + id) is applied to a command at most once.
CREATE TABLE processed_events (
    command_id    uuid NOT NULL,
    source        text NOT NULL,
    event_id      text NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (command_id, source, event_id)
);

-- Events decided inside a transaction, published after commit and deleted once the broker confirms.
CREATE TABLE outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id  uuid NOT NULL,
    event_id    text NOT NULL,
    event_type  text NOT NULL,
    body        jsonb NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- The sweeper publishes rows a crashed publisher left behind, oldest first.
CREATE INDEX outbox_created ON outbox (created_at, id);
