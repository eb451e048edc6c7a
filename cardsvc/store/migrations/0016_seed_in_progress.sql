-- A fresh `cardsvc seed` drops the registry's indexes and constraints, bulk-loads, then rebuilds them. Killed
-- in between (Ctrl-C, SIGKILL, a full disk), it left a registry without its primary keys, unique indexes and
-- foreign keys, and nothing said so: `cardsvc serve` started on it. The seed writes this row in the
-- transaction that drops them and deletes it once they are back; while it is there the service refuses to
-- start and `cardsvc seed` refuses to run, and both say what happened.
CREATE TABLE seed_in_progress (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    started_at  timestamptz NOT NULL DEFAULT now(),
    detail      text NOT NULL
);
