-- Kinds decided by a remote service (a decider over HTTP, in any language) are published to the
-- catalogue as such.
ALTER TYPE kind_source ADD VALUE IF NOT EXISTS 'remote';

INSERT INTO schema_compat (version, compatible, note) VALUES
    (19, true, 'adds the kind source remote; a binary before it lists no remote kind it could not read')
ON CONFLICT (version) DO NOTHING;
