-- `cardsvc audit --record` (the nightly deploy/cardsvc-audit.timer): one row per recorded run, so that
-- /metrics shows when the ledger's invariants were last checked and whether they held, and the history
-- of the checks stays with the ledger (docs/operations.md "Nightly audit"). A few hundred bytes a night.
CREATE TABLE audit_run (
    run_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snapshot_at timestamptz NOT NULL,                        -- the snapshot every check read
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ok          boolean NOT NULL,
    failed      text[] NOT NULL,                             -- the names of the checks that failed
    checks      jsonb NOT NULL                               -- every check's counts (internal card ids only)
);
