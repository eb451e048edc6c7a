-- Offline purse records uploaded by validators (protocols/transit.md, docs/transit.md).
--
-- Every record of a known card is kept here with its verdict, whatever it is (refused records are kept
-- for investigation; nothing is pruned). A posted record (accepted, hotlisted, sequence_gap,
-- balance_mismatch) is unique per (card, extended purse sequence): that is how a duplicate or a
-- conflicting record (cloned card, rewritten record) is recognised, whichever terminal uploads it.
-- The per-(terminal, terminal_seq) answer lives in terminal_txn, like every terminal transaction.
CREATE TABLE offline_record (
    card_id         bigint NOT NULL,
    terminal_id     text NOT NULL,
    terminal_seq    bigint NOT NULL,
    purse_seq       bigint NOT NULL,            -- the card's sequence, unwrapped (extend_purse_seq)
    result          text NOT NULL,              -- protocols.transit.RecordResult
    reason          text,
    posted          boolean NOT NULL,           -- the shadow purse moved (RecordResult.posted)
    record          jsonb NOT NULL,             -- protocols.transit.record_to_dict, as uploaded
    txn_id          bigint,                     -- the journal transfer (posted, amount > 0)
    batch_id        bigint NOT NULL,
    uploaded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (card_id, terminal_id, terminal_seq)
);
CREATE UNIQUE INDEX offline_record_posted ON offline_record (card_id, purse_seq) WHERE posted;

-- The back office asks "was this card blocked as of hotlist version V?" for every uploaded record.
CREATE INDEX hotlist_entry_card ON hotlist_entry (card_id, version);
