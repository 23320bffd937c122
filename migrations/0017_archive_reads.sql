-- What a person sees does not change when ops archive: the owner feed reads pending conditions
-- (commands carrying a UI hint) and messages from the archive as well as the live tables, and
-- `GET /v1/commands/{id}/tree` walks an archived tree by parent. These indexes serve those reads;
-- the live one lets the archiver skip, cheaply, a tree whose messages still wait for delivery.
-- Re-runnable: a database whose ledger lost this migration can run it again.
CREATE INDEX IF NOT EXISTS archive_commands_owner_ui ON archive.commands (owner) WHERE ui IS NOT NULL;
CREATE INDEX IF NOT EXISTS archive_commands_parent ON archive.commands (parent_id);
CREATE INDEX IF NOT EXISTS messages_undelivered_by_command ON messages (command_id) WHERE delivery = 'pending';

INSERT INTO schema_compat (version, compatible, note) VALUES
    (17, true, 'adds indexes for the archive reads of the feed and the tree')
    ON CONFLICT (version) DO NOTHING;
