-- Applying an event to a command updates its row (data, version, updated_at). PostgreSQL can
-- make such an update HOT (heap-only: no new entry in any index) when no indexed column
-- changes and the page has room. `updated_at` was the one indexed column every event changes
-- (in the UI-hints index), so every update wrote an entry into every index of `commands`. The
-- hints of one owner are few: the index finds them by owner, and the feed sorts them.
DROP INDEX commands_owner_ui;
CREATE INDEX commands_owner_ui ON commands (owner) WHERE ui IS NOT NULL;

-- Room on each page for the next versions of its rows, so updates stay on the page (HOT).
ALTER TABLE commands SET (fillfactor = 80);
