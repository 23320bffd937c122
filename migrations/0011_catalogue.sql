-- The kind catalogue: what workers can run, published by each worker at start-up, read by the
-- gateway (which links no handler code) to check `POST /v1/commands`.
CREATE TYPE kind_source AS ENUM ('rust', 'funnel');

CREATE TABLE kinds (
    name        text PRIMARY KEY,
    -- JSON Schema of the start data (`{"type": "object"}` when the kind declares none).
    schema      jsonb NOT NULL,
    -- Broadcast event types that start a command of this kind (owner = the event's subject).
    starts_on   text[] NOT NULL DEFAULT '{}',
    -- The kind's own version, and the build of the binary that published it.
    version     text NOT NULL,
    build       text NOT NULL,
    -- How the kind is defined: `rust` (a handler in a binary) or `funnel` (a data file).
    source      kind_source NOT NULL,
    description text,
    published_at timestamptz NOT NULL DEFAULT now()
);

-- Replay jobs are run by workers: one claims a running job under a lease it renews, so a job
-- survives the restart of whoever started it, and another worker takes over an expired lease.
-- `max_id` bounds a job to the dead letters that existed when it started: its own new dead
-- letters are not replayed again.
ALTER TABLE replay_jobs
    ADD COLUMN claimed_by  text,
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN max_id      bigint,
    ADD COLUMN error       text;
ALTER TABLE replay_jobs DROP CONSTRAINT replay_jobs_state_check;
CREATE TYPE replay_state AS ENUM ('running', 'finished', 'interrupted', 'failed');
ALTER TABLE replay_jobs ALTER COLUMN state TYPE replay_state USING state::replay_state;
CREATE INDEX replay_jobs_running ON replay_jobs (created_at) WHERE state = 'running';
