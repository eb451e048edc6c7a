-- Clearing by posting day (docs/operations.md "Daily clearing"). A journal row is cleared on the day it
-- was written, not on the day of the ride, so that a validator uploading last week's rides adds them to
-- today's clearing instead of changing a day that has been cleared and paid.
--
-- posted_at is the writing transaction's start time (now()). Rows written before this migration get
-- '-infinity' (a constant default: no table rewrite, instant at any size) and are therefore cleared by
-- their ride time `at`, as they always were: the clearing day of a row is greatest(at, posted_at), so
-- every report made before the migration stays equal to its journal.
--
-- IF NOT EXISTS: on a large journal the column and each partition's index can be made beforehand while
-- the service writes (deploy/sql/0007_before_migrate.sql); this migration then attaches those indexes.
ALTER TABLE txn_journal ADD COLUMN IF NOT EXISTS posted_at timestamptz NOT NULL DEFAULT '-infinity';
ALTER TABLE txn_journal ALTER COLUMN posted_at SET DEFAULT now();

-- The rows of one clearing day. greatest(at, posted_at) grows with the insertion order within each
-- partition (online rides are written as they happen, late uploads are appended at the end), which is
-- what a BRIN index needs: a few pages for the whole journal, and next to nothing per insert.
CREATE INDEX IF NOT EXISTS txn_journal_clearing_day ON txn_journal USING brin ((greatest(at, posted_at)))
    WITH (autosummarize = on);

-- An index built beforehand and left INVALID by an interrupted build would be attached as it is (never
-- maintained, never used): refuse, and roll the migration back.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid
               WHERE i.inhparent = 'txn_journal_clearing_day'::regclass AND NOT x.indisvalid) THEN
        RAISE EXCEPTION 'an index of txn_journal_clearing_day is INVALID (an interrupted build): drop it, or run deploy/sql/0007_before_migrate.sql again';
    END IF;
END $$;
