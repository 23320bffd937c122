-- How a group's children report to their parent: `each` (an event to the parent per child, then
-- `children.settled`) or `settled` (each child counts itself into this row in the transaction
-- that ends it; the parent hears only `children.settled`).
ALTER TABLE child_groups
    ADD COLUMN reports text NOT NULL DEFAULT 'each' CHECK (reports IN ('each', 'settled'));
