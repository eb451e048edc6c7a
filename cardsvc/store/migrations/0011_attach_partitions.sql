-- New journal partitions are made apart and attached (docs/operations.md "Maintenance done by the service").
--
-- CREATE TABLE ... PARTITION OF takes an ACCESS EXCLUSIVE lock on txn_journal: behind a long reader of the
-- journal (`cardsvc audit`'s snapshot, a clearing run, pg_dump) it waited up to lock_timeout, and every tap,
-- upload and top-up queued behind its lock request, each time a worker's maintenance tried again. ATTACH
-- PARTITION takes SHARE UPDATE EXCLUSIVE on the journal, which neither reads nor writes wait for (ACCESS
-- EXCLUSIVE only on the new, empty table); the CHECK constraint matching the bounds spares it the scan of
-- the new table, and the journal's indexes are made on it as it is attached. txn_id keeps coming from the
-- journal's identity: rows are always written through txn_journal.
CREATE OR REPLACE FUNCTION cardsvc_ensure_partitions(p_from date, p_months int) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    m date;
    name text;
BEGIN
    FOR i IN 0 .. p_months - 1 LOOP
        m := date_trunc('month', p_from)::date + make_interval(months => i);
        name := format('txn_journal_%s', to_char(m, 'YYYYMM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE txn_journal INCLUDING DEFAULTS)', name);
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (at >= %L AND at < %L)',
                           name, name || '_bounds', m, (m + interval '1 month')::date);
            EXECUTE format('ALTER TABLE txn_journal ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           name, m, (m + interval '1 month')::date);
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', name, name || '_bounds');
        END IF;
    END LOOP;
END $$;
