-- Workflows: children, fan-in groups, and commands started by broadcast events.

-- How a child relates to its parent: the fan-in group it reports to (NULL: fire-and-forget, no
-- ACK), and what happens to it when the parent ends first.
ALTER TABLE commands
    ADD COLUMN group_name   text,
    ADD COLUMN parent_close text NOT NULL DEFAULT 'abort'
        CHECK (parent_close IN ('abort', 'abandon'));

-- Open children of a parent (abort cascades, parent-close policy, the parent's view).
CREATE INDEX commands_parent_open ON commands (parent_id)
    WHERE parent_id IS NOT NULL AND state IN ('pending', 'running', 'waiting');

-- A parent's fan-in groups: the policy and the outcome of every child that reported back.
CREATE TABLE child_groups (
    parent_id   uuid NOT NULL,
    name        text NOT NULL,
    policy      text NOT NULL CHECK (policy IN ('all', 'any', 'quorum', 'all_settled')),
    quorum      integer,
    total       integer NOT NULL,
    completed   integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    aborted     integer NOT NULL DEFAULT 0,
    -- child id → {state, kind, result | reason}; a child counts once, however often it reports.
    outcomes    jsonb NOT NULL DEFAULT '{}'::jsonb,
    state       text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'succeeded', 'failed')),
    deadline_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    settled_at  timestamptz,
    PRIMARY KEY (parent_id, name)
);

-- A broadcast event starts each kind registered for its type at most once.
CREATE TABLE event_starts (
    source      text NOT NULL,
    event_id    text NOT NULL,
    kind        text NOT NULL,
    command_id  uuid NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id, kind)
);
