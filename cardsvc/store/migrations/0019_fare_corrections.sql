-- Fare corrections (docs/transit.md "Fare corrections"): the card office gives a charged fare back,
-- whole or in part. The correction is a journal row of kind 8 on the card (amount_fen > 0: the purse is
-- credited) whose counterparty is the operator the fare paid (it is debited, through clearing file
-- version 2). This table links it to the fare it corrects, which the journal row cannot say, and keeps
-- the reason. Its key (terminal_id, terminal_seq) is kept for good in topup_key, like a top-up's.
-- A few rows a day for a whole city; never pruned.
CREATE TABLE fare_correction (
    txn_id           bigint PRIMARY KEY,                 -- the correction's journal row
    card_id          bigint NOT NULL,
    corrects_txn_id  bigint NOT NULL,                    -- the fare's journal row (same card)
    amount_fen       bigint NOT NULL CHECK (amount_fen > 0),
    reason           text NOT NULL,                      -- protocols.clearing.CorrectionReason
    fare_ridecode    boolean NOT NULL,                   -- the fare's clearing source: ridecode (else purse)
    terminal_id      text NOT NULL,
    terminal_seq     bigint NOT NULL,
    staff            text NOT NULL,                      -- the card-office operator who made it
    at               timestamptz NOT NULL DEFAULT now(),
    CHECK (corrects_txn_id < txn_id)
);
-- A fare's corrections so far (each new one is checked against what is left of the fare).
CREATE INDEX fare_correction_fare ON fare_correction (card_id, corrects_txn_id);

-- A day's corrections in its clearing report (file version 2): count and sum given back.
ALTER TABLE clearing_report ADD COLUMN correction_count bigint NOT NULL DEFAULT 0,
                            ADD COLUMN correction_fen bigint NOT NULL DEFAULT 0;
