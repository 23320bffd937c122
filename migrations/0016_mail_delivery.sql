-- Mail delivery: each e-mail is tried on its own, with back-off, and ends `failed` with its
-- reason (`last_error`) after its last attempt or a permanent refusal, instead of staying
-- `pending` at the head of the queue for good.
--
-- `attempts` counts the tries begun; `next_attempt_at` is when the message may be tried again
-- (NULL: at once); `failed_at` is when it was given up. The archive copies rows positionally
-- (`INSERT INTO archive.messages SELECT * FROM messages`), so both tables gain the same columns
-- in the same order. Every statement can run again over itself (a database rolled back by its
-- migration record alone).
ALTER TABLE messages
    ADD COLUMN IF NOT EXISTS attempts        int NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz,
    ADD COLUMN IF NOT EXISTS failed_at       timestamptz;
ALTER TABLE archive.messages
    ADD COLUMN IF NOT EXISTS attempts        int NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz,
    ADD COLUMN IF NOT EXISTS failed_at       timestamptz;

-- failed: given up, `last_error` says why. Only a new state: an older binary never writes it,
-- and its sender, which reads `pending` rows only, leaves failed ones alone.
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_delivery_check;
ALTER TABLE messages ADD CONSTRAINT messages_delivery_check
    CHECK (delivery IN ('in_app', 'pending', 'sent', 'kept', 'failed'));
ALTER TABLE archive.messages DROP CONSTRAINT IF EXISTS messages_delivery_check;
ALTER TABLE archive.messages ADD CONSTRAINT messages_delivery_check
    CHECK (delivery IN ('in_app', 'pending', 'sent', 'kept', 'failed'));

-- The mailer claims due messages in the order they became due (a retry is not starved by new
-- mail); ops list the failed ones, newest first.
CREATE INDEX IF NOT EXISTS messages_due ON messages ((coalesce(next_attempt_at, created_at)))
    WHERE delivery = 'pending';
CREATE INDEX IF NOT EXISTS messages_failed ON messages (failed_at DESC) WHERE delivery = 'failed';

INSERT INTO schema_compat (version, compatible, note) VALUES
    (16, true, 'adds messages.attempts, next_attempt_at, failed_at (also in the archive), the failed delivery state and two indexes')
    ON CONFLICT (version) DO NOTHING;
