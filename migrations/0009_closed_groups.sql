-- A parent that ends (completed early, failed, aborted) before one of its fan-in groups settled
-- closes that group: it no longer waits, and the children's late reports find it `closed`
-- instead of leaving it `open` for ever.
ALTER TABLE child_groups DROP CONSTRAINT child_groups_state_check;
ALTER TABLE child_groups
    ADD CONSTRAINT child_groups_state_check CHECK (state IN ('open', 'succeeded', 'failed', 'closed'));
