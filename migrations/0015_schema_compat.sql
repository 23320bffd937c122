-- Which migrations a binary older than them may run against. A migration that only adds (a
-- table, a column that is nullable or has a default, an index, a trigger that fills new columns)
-- and never drops, renames or changes what an older binary reads and writes is compatible: after
-- a rollback, the binary from before it starts against the new schema (and its `migrate` leaves
-- the schema as it is). A binary refuses a database holding a migration it does not know that
-- is not listed here as compatible, and says which. Every migration from this one on records
-- itself here, in its own file.
CREATE TABLE schema_compat (
    version    bigint PRIMARY KEY,
    compatible boolean NOT NULL,
    note       text NOT NULL
);

INSERT INTO schema_compat (version, compatible, note) VALUES
    (13, true, 'adds engine_mark; dead_letters.from_engine and identities.linked_by have defaults'),
    (14, true, 'adds the dead-letter body columns, filled by a trigger for older keepers'),
    (15, true, 'adds schema_compat');
