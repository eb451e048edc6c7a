-- A clearing file's header time and digest, committed before the file is renamed into place and deleted
-- in the transaction that commits the day's report. The report commits only once its file is in place,
-- so a run that renamed the file and then could not commit (a lost connection, a failed directory sync, a
-- crash) left a file without a report; if the operator's transfer job took that file meanwhile, the next
-- run had nothing to take the first creation time from and sent a second version of the day with the same
-- lines. With this row the next run writes the same bytes again, or, when the journal says otherwise
-- since, a new version dated after the first.
CREATE TABLE clearing_pending (
    operator_id     text NOT NULL,
    business_date   date NOT NULL,
    created_at      timestamptz NOT NULL,
    digest          text NOT NULL,
    PRIMARY KEY (operator_id, business_date)
);
