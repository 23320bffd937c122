-- People: identities joined across the funnel, messages sent to them, and the indexes the owner
-- feed reads.

-- The same person is first a cookie, then a lead, a member, a client. Every owner id that has
-- been linked points at one person key (the owner id the links converge on).
CREATE TABLE identities (
    owner      text PRIMARY KEY,
    person     text NOT NULL,
    linked_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX identities_person ON identities (person);

-- Automatic answers to a person, rendered from templates with their own data. `trigger_key`
-- makes a message go out once per triggering event, however often the event is delivered.
CREATE TABLE messages (
    id           uuid PRIMARY KEY,
    owner        text NOT NULL,
    command_id   uuid NOT NULL,
    trigger_key  text NOT NULL UNIQUE,
    template     text NOT NULL,
    channel      text NOT NULL CHECK (channel IN ('in_app', 'email')),
    subject      text NOT NULL,
    body         text NOT NULL,
    email_to     text,
    -- in_app: shown in the app only; pending: an e-mail to send; sent: the SMTP server took it;
    -- kept: no SMTP configured, shown in the app instead.
    delivery     text NOT NULL CHECK (delivery IN ('in_app', 'pending', 'sent', 'kept')),
    read_at      timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    last_error   text
);
CREATE INDEX messages_owner_recent ON messages (owner, created_at DESC);
CREATE INDEX messages_owner_unread ON messages (owner) WHERE read_at IS NULL;
CREATE INDEX messages_to_send ON messages (created_at) WHERE delivery = 'pending';

-- One open funnel command per person and funnel.
CREATE UNIQUE INDEX commands_one_open_funnel ON commands (owner, kind)
    WHERE kind LIKE 'funnel.%' AND state IN ('pending', 'running', 'waiting');

-- Conditions a UI should show: commands with a `ui` hint, open or (for conditions that outlive
-- the command, such as an approved membership) ended.
CREATE INDEX commands_owner_ui ON commands (owner, updated_at DESC) WHERE ui IS NOT NULL;
