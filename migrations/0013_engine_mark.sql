-- Only cmdflow speaks for the engine. Its processes read this secret at start-up and mark every
-- engine event they publish with it (an AMQP header); a worker refuses an engine event type
-- (command.*, children.*, timer.*, wait.*) without the mark, so a caller who can publish to the
-- broker cannot forge one. The gateway never passes a caller's headers on. Two random UUIDs (244
-- bits from PostgreSQL's strong random source); nothing but cmdflow reads this table.
CREATE TABLE engine_mark (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    mark text NOT NULL
);
INSERT INTO engine_mark (mark)
VALUES (replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));

-- A dead letter that carried the mark is replayed with it; any other is replayed without, so a
-- refused forgery stays refused however often an operator replays it.
ALTER TABLE dead_letters ADD COLUMN from_engine boolean NOT NULL DEFAULT false;

-- Who joined an identity to a person (`key:shop (from crm)`, `source:identity`); the join is
-- also in ops_audit.
ALTER TABLE identities ADD COLUMN linked_by text;
