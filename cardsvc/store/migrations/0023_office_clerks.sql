-- The clerk of each card-office answer kept for good (top-up, refund, fare correction, quota ride return):
-- a top-up moved money with the clerk accepted and dropped (`operator`), where a fare correction and a
-- quota ride return kept theirs in their own rows. NULL for the answers kept before this migration and
-- for those copied in from terminal_txn by the maintenance; '' when the request named no clerk.
ALTER TABLE topup_key ADD COLUMN staff text;

-- The card office's money trail is append-only, like quota_ride_return and the events (nothing updates or
-- deletes these rows; `cardsvc audit` checks them against the journal).
CREATE TRIGGER topup_key_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON topup_key
    FOR EACH STATEMENT EXECUTE FUNCTION cardsvc_append_only();
CREATE TRIGGER fare_correction_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON fare_correction
    FOR EACH STATEMENT EXECUTE FUNCTION cardsvc_append_only();
