-- Elderly quota rides given back by the card office (docs/transit.md "Quota rides given back").
--
-- A ride that used one of the holder's free elderly rides costs nothing, so a fare correction (money) cannot
-- undo it. The journal now says which fare rows used a quota ride, and the card office can give that ride
-- back to the holder's quota of the ride's year, once per fare.
--
-- NULL for every other row and for rows written before this migration (whose quota rides cannot be told
-- apart from other free rides, so they cannot be given back). A column without a default: no table rewrite.
ALTER TABLE txn_journal ADD COLUMN quota_ride boolean;

-- One row per fare whose quota ride was given back (its primary key: at most once). A few a day for a
-- city; never pruned. The request's key (terminal_id, terminal_seq) is kept for good in topup_key, in the
-- card office's key space, like a fare correction's.
CREATE TABLE quota_ride_return (
    card_id          bigint NOT NULL,                    -- the fare's card
    fare_txn_id      bigint NOT NULL,                    -- the fare's journal row (quota_ride true)
    holder_id        bigint NOT NULL,                    -- whose quota got the ride back
    quota_year       int NOT NULL,                       -- the local year the ride was charged in
    rides_left       int NOT NULL,                       -- the holder's elderly rides left after it
    reason           text NOT NULL,                      -- protocols.clearing.CorrectionReason
    terminal_id      text NOT NULL,
    terminal_seq     bigint NOT NULL,
    staff            text NOT NULL,                      -- the card-office operator who made it
    at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (card_id, fare_txn_id)
);
CREATE TRIGGER quota_ride_return_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON quota_ride_return
    FOR EACH STATEMENT EXECUTE FUNCTION cardsvc_append_only();
