-- Operations: every attempt of a retried event, dead letters kept for people to inspect, replay
-- or discard, the replay jobs, and the audit of what ops did.

-- One row per failed attempt of an event that was retried.
CREATE TABLE event_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_source text,
    event_id    text,
    event_type  text,
    command_id  uuid,
    attempt     integer NOT NULL,
    error       text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_attempts_by_event ON event_attempts (event_source, event_id, attempt);

CREATE TABLE dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The id cmdflow gave the dead-lettering, so a redelivered dead letter is kept once.
    dead_id         text UNIQUE,
    event_source    text,
    event_id        text,
    event_type      text,
    routing_key     text NOT NULL,
    command_id      uuid,
    kind            text,
    owner           text,
    -- The original event, byte for byte.
    body            bytea NOT NULL,
    reason          text NOT NULL,
    error_class     text NOT NULL,
    -- The attempts' errors, oldest first.
    error_chain     jsonb NOT NULL DEFAULT '[]'::jsonb,
    -- What failures are grouped by: the error class and the handler (kind) that failed.
    signature       text NOT NULL,
    attempts        integer NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    state           text NOT NULL DEFAULT 'dead' CHECK (state IN ('dead', 'replayed', 'discarded')),
    replayed_at     timestamptz,
    discarded_at    timestamptz,
    discard_reason  text,
    kept_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_open ON dead_letters (id) WHERE state = 'dead';
CREATE INDEX dead_letters_signature ON dead_letters (signature, id) WHERE state = 'dead';
CREATE INDEX dead_letters_type ON dead_letters (event_type, id);
CREATE INDEX dead_letters_kind ON dead_letters (kind, id);
CREATE INDEX dead_letters_owner ON dead_letters (owner, id);
CREATE INDEX dead_letters_failed ON dead_letters (last_failed_at);

-- A replay of a filter: resumable from `last_id`, throttled to `rate` per second.
CREATE TABLE replay_jobs (
    id          uuid PRIMARY KEY,
    actor       text NOT NULL,
    filter      jsonb NOT NULL,
    rate        integer,
    total       integer NOT NULL,
    replayed    integer NOT NULL DEFAULT 0,
    last_id     bigint NOT NULL DEFAULT 0,
    state       text NOT NULL CHECK (state IN ('running', 'finished', 'interrupted')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Who did what to dead letters, when, with which filter, and to how many.
CREATE TABLE ops_audit (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    filter  jsonb NOT NULL,
    count   integer NOT NULL,
    detail  text
);
