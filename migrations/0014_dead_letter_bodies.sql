-- Dead letters are listed by a prefix of their body, and a body is fetched whole only one at a
-- time, streamed in slices (`GET /v1/dead-letters/{id}/body`). Expand only: nothing is dropped or
-- renamed, so a binary from before this migration keeps working against this schema.
--
-- The body stays in `body` (PostgreSQL keeps a large value out of line, in TOAST); what a list
-- needs about it lives beside it:
--   body_size      the size of the message as received, in bytes;
--   body_sha256    the hex SHA-256 of the message as received;
--   body_truncated whether `body` holds only the first CMDFLOW_DEAD_LETTER_MAX_BODY bytes of it
--                  (then size and hash still describe the whole message, and the letter cannot
--                  be replayed).
ALTER TABLE dead_letters
    ADD COLUMN body_size bigint,
    ADD COLUMN body_sha256 text,
    ADD COLUMN body_truncated boolean NOT NULL DEFAULT false;

UPDATE dead_letters SET body_size = length(body), body_sha256 = encode(sha256(body), 'hex');

-- A keeper from before this migration inserts without the new columns: its rows are described
-- here, with the same functions as the backfill above (its bodies are never truncated).
CREATE FUNCTION dead_letters_describe_body() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.body_size := length(NEW.body);
    NEW.body_sha256 := encode(sha256(NEW.body), 'hex');
    RETURN NEW;
END
$$;
CREATE TRIGGER dead_letters_describe_body BEFORE INSERT ON dead_letters
    FOR EACH ROW WHEN (NEW.body_size IS NULL OR NEW.body_sha256 IS NULL)
    EXECUTE FUNCTION dead_letters_describe_body();

ALTER TABLE dead_letters
    ALTER COLUMN body_size SET NOT NULL,
    ALTER COLUMN body_sha256 SET NOT NULL;

-- Bodies are read in slices (the first KiB for a list, 256 KiB at a time for a download). A
-- compressed value is decompressed from its start for every slice; an uncompressed one is read
-- only where the slice lies. So new bodies are stored out of line uncompressed (existing ones
-- keep their storage, and read the same).
ALTER TABLE dead_letters ALTER COLUMN body SET STORAGE EXTERNAL;

-- A replay leaves a truncated letter dead (publishing its first bytes as the event would be a
-- different event) and counts it here; the letter says why (`body_truncated`).
ALTER TABLE replay_jobs ADD COLUMN skipped integer NOT NULL DEFAULT 0;
