-- Before `cardsvc migrate` applies migration 0007 to a large journal: the same schema change, made
-- without blocking writes for long (docs/operations.md "Upgrading a large journal").
--
--   psql "$CARDSVC_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/sql/0007_before_migrate.sql
--
-- 1. The column: a constant default, so no table rewrite; it waits for the running transactions.
-- 2. Each partition's BRIN index, built CONCURRENTLY (writes go on meanwhile), under the name PostgreSQL
--    itself gives a partition's index. Re-running skips what exists; a build that failed leaves an
--    INVALID index: drop it and run again.
-- `cardsvc migrate` then finds the column and attaches these indexes to the journal's index instead
-- of building them (a catalogue change only).
ALTER TABLE txn_journal ADD COLUMN IF NOT EXISTS posted_at timestamptz NOT NULL DEFAULT '-infinity';
ALTER TABLE txn_journal ALTER COLUMN posted_at SET DEFAULT now();
SELECT format(
           'CREATE INDEX CONCURRENTLY IF NOT EXISTS %I ON %I USING brin ((greatest(at, posted_at))) WITH (autosummarize = on)',
           c.relname || '_greatest_idx', c.relname)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'txn_journal'::regclass
ORDER BY c.relname
\gexec
