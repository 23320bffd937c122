-- Versioned definitions. A command keeps the version of its kind it started on
-- (`kind_version`; null for a command started before versions were kept, which runs on the
-- kind's current definition). Its events are applied only by a definition of that version.
ALTER TABLE commands ADD COLUMN IF NOT EXISTS kind_version text;
-- The archive copies a command by position (`commands.*` then `archived_at`): its new column
-- goes before `archived_at`, so a binary of either side of this migration archives alike.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                    WHERE table_schema = 'archive' AND table_name = 'commands'
                      AND column_name = 'kind_version') THEN
        ALTER TABLE archive.commands RENAME COLUMN archived_at TO archived_at_before;
        ALTER TABLE archive.commands ADD COLUMN kind_version text;
        ALTER TABLE archive.commands ADD COLUMN archived_at timestamptz NOT NULL DEFAULT now();
        UPDATE archive.commands SET archived_at = archived_at_before;
        ALTER TABLE archive.commands DROP COLUMN archived_at_before;
    END IF;
END $$;

-- Every version of every flow a worker has run, so that any worker can finish a command on the
-- version it started with after the flow's file changed. A version is the author's `revision`
-- or the hash of the file; one version never names two texts.
CREATE TABLE IF NOT EXISTS flow_versions (
    kind          text NOT NULL,
    version       text NOT NULL,
    hash          text NOT NULL,
    file          text NOT NULL,
    definition    text NOT NULL,
    -- The flow as a Mermaid state diagram, and drawn as SVG, for the console.
    mermaid       text NOT NULL,
    svg           text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    -- When a worker last started with this version as the current one.
    current_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, version)
);

-- An event that waits for something other than its command's start: `version X` when no
-- definition of the command's version is on the worker that holds it. Those do not expire.
ALTER TABLE parked_events ADD COLUMN IF NOT EXISTS waiting_for text;
CREATE INDEX IF NOT EXISTS parked_events_waiting ON parked_events (partition)
    WHERE waiting_for IS NOT NULL;

-- Kinds defined by a flow file (that are not funnels) are published to the catalogue as such.
ALTER TYPE kind_source ADD VALUE IF NOT EXISTS 'flow';

INSERT INTO schema_compat (version, compatible, note) VALUES
    (20, true, 'adds nullable columns commands.kind_version and parked_events.waiting_for, the flow_versions table and the kind source flow (a binary before it cannot list a catalogue that holds a flow kind)')
ON CONFLICT (version) DO NOTHING;
