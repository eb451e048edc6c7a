-- Offline records refused without a place in a card's ledger (docs/transit.md "Storage and idempotency").
--
-- offline_record keeps every record of a known card with its verdict, one per (card, terminal,
-- terminal_seq). Two kinds of record have no row there, and terminal_txn, which is pruned after
-- TERMINAL_TXN_RETENTION_DAYS, was all that kept them:
-- - a record refused `conflict / terminal_seq_reused`: its (terminal, terminal_seq) already answers another
--   transaction (a validator reset that reuses its counter). The key's answer belongs to the first
--   transaction, and for the same card as the first record the ledger's key is taken too;
-- - a record of no known card (`card_unknown`, or `malformed` before the card was looked up).
-- They are kept here, never pruned, like offline_record: for the card office to investigate, and so that
-- a re-upload is answered with the stored verdict (replayed) whenever it comes. Such records are never
-- posted. One key can hold several refused records, one per content: request_hash is SM3 of the record's
-- canonical JSON, as in terminal_txn.
CREATE TABLE offline_refusal (
    terminal_id     text NOT NULL,
    terminal_seq    bigint NOT NULL,
    request_hash    bytea NOT NULL,
    card_id         bigint,                     -- the record's card, NULL when it is not one of ours
    result          text NOT NULL,              -- protocols.transit.RecordResult
    reason          text,
    record          jsonb NOT NULL,             -- protocols.transit.record_to_dict, as uploaded
    batch_id        bigint NOT NULL,
    uploaded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (terminal_id, terminal_seq, request_hash)
);
-- The card office looks a card's refused records up next to its ledger.
CREATE INDEX offline_refusal_card ON offline_refusal (card_id) WHERE card_id IS NOT NULL;

-- Records of unknown cards answered before this migration are still in terminal_txn (detail.record) for
-- the rest of their retention: keep them. One pass over terminal_txn, which takes no lock that writers
-- wait for.
INSERT INTO offline_refusal (terminal_id, terminal_seq, request_hash, card_id, result, reason, record, batch_id,
                             uploaded_at)
SELECT terminal_id, terminal_seq, request_hash, card_id, result, detail->>'reason', detail->'record',
       (detail->>'batch_id')::bigint, at
FROM terminal_txn
WHERE detail->>'kind' = 'offline' AND detail ? 'record'
ON CONFLICT DO NOTHING;
