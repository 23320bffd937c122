-- Archive: command trees that ended long ago move here, whole, with their history and messages,
-- so the live tables stay small. Same shapes as the live tables, plus when each row moved.
CREATE SCHEMA archive;

CREATE TABLE archive.commands (LIKE public.commands INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE archive.commands ADD COLUMN archived_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE archive.commands ADD PRIMARY KEY (id);
CREATE INDEX archive_commands_owner_recent ON archive.commands (owner, created_at DESC, id DESC);
CREATE INDEX archive_commands_root ON archive.commands (root_id);

CREATE TABLE archive.command_events (LIKE public.command_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE archive.command_events ADD PRIMARY KEY (seq);
CREATE INDEX archive_command_events_by_command ON archive.command_events (command_id, seq);

CREATE TABLE archive.messages (LIKE public.messages INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE archive.messages ADD PRIMARY KEY (id);
CREATE INDEX archive_messages_owner_recent ON archive.messages (owner, created_at DESC);
