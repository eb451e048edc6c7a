-- Top-up keys, kept for good (docs/api.md "Retries, idempotency and replay").
--
-- A top-up's answer lives in terminal_txn under (terminal_id, terminal_seq), like a tap's, and maintenance
-- prunes terminal_txn after TERMINAL_TXN_RETENTION_DAYS. A tap carries its time, so a copy sent after that
-- is refused by the clock window; a top-up has no time of its own, and a bank channel resending it a week
-- later (a re-processed file) credited the purse a second time. Every top-up's key and answer is also kept
-- here, never pruned: a top-up whose key has no answer in terminal_txn is answered from this table.
-- A top-up is a few rows a month per card, far fewer than taps: ~80 bytes each.
CREATE TABLE topup_key (
    terminal_id     text NOT NULL,
    terminal_seq    bigint NOT NULL,
    request_hash    bytea NOT NULL,             -- as in terminal_txn: SM3 of the request body and the card
    card_id         bigint NOT NULL,
    amount_fen      bigint NOT NULL,            -- signed: a refund is negative
    balance_fen     bigint NOT NULL,            -- the balance the answer gave
    txn_id          bigint NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (terminal_id, terminal_seq)
);

-- The top-ups still answered in terminal_txn (the last retention period); older ones were pruned with
-- their answers and cannot be recovered from it.
INSERT INTO topup_key (terminal_id, terminal_seq, request_hash, card_id, amount_fen, balance_fen, txn_id, at)
SELECT t.terminal_id, t.terminal_seq, t.request_hash, t.card_id, t.amount_fen, t.balance_fen, t.txn_id, t.at
FROM terminal_txn t
WHERE t.detail IS NULL AND t.result = 'approved' AND t.txn_id IS NOT NULL AND t.card_id IS NOT NULL
  AND t.balance_fen IS NOT NULL;
