-- Before `cardsvc migrate` applies migration 0007 to a large journal: its column and indexes, made
-- while the service keeps writing (docs/operations.md "Upgrading a large journal").
--
--   psql "$CARDSVC_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/sql/0007_before_migrate.sql
--
-- 1. The column, with the constant default '-infinity' only: no table rewrite, but a short exclusive
--    lock on the journal, which waits for running transactions (a clearing run, an audit, a backup) and
--    makes taps wait behind it; lock_timeout gives up after 5 s instead (run it again). The default
--    now() comes with the migration itself: until then the running release clears by ride time, and a
--    row it writes must keep the ride day, or it would be paid again on its writing day.
-- 2. Leftovers of an interrupted run (INVALID indexes) are dropped, then each partition's BRIN index is
--    built CONCURRENTLY under the name PostgreSQL itself gives a partition's index; writes go on.
-- 3. The script fails if an index is still not valid. Run it again until it succeeds.
-- `cardsvc migrate` then attaches these indexes to the journal's index instead of building them.
SET statement_timeout = 0;
SET lock_timeout = '5s';
ALTER TABLE txn_journal ADD COLUMN IF NOT EXISTS posted_at timestamptz NOT NULL DEFAULT '-infinity';
RESET lock_timeout;

SELECT format('DROP INDEX CONCURRENTLY IF EXISTS %I', ic.relname)
FROM pg_inherits i JOIN pg_index x ON x.indrelid = i.inhrelid JOIN pg_class ic ON ic.oid = x.indexrelid
WHERE i.inhparent = 'txn_journal'::regclass AND ic.relname = (SELECT relname FROM pg_class WHERE oid = i.inhrelid) || '_greatest_idx'
  AND NOT x.indisvalid
\gexec

SELECT format(
           'CREATE INDEX CONCURRENTLY IF NOT EXISTS %I ON %I USING brin ((greatest(at, posted_at))) WITH (autosummarize = on)',
           c.relname || '_greatest_idx', c.relname)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'txn_journal'::regclass
ORDER BY c.relname
\gexec

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               LEFT JOIN pg_class ic ON ic.relname = c.relname || '_greatest_idx'
               LEFT JOIN pg_index x ON x.indexrelid = ic.oid
               WHERE i.inhparent = 'txn_journal'::regclass AND NOT coalesce(x.indisvalid, false)) THEN
        RAISE EXCEPTION 'a partition of txn_journal has no valid clearing index yet: run this script again';
    END IF;
END $$;
