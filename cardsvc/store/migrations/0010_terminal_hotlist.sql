-- The hotlist version last served to each terminal (docs/transit.md "Verdicts").
--
-- An offline record carries the hotlist version its validator held (`hotlist_version`), and the verdict
-- `hotlisted` is judged as of that version. The version is not covered by the record's TAC (the card signs
-- the debit, not the validator's list), so a validator could claim an older list than it held and have a
-- blocked card's fares paid to its operator. A terminal that downloaded version V at time T held at least V
-- from then on: a record it made after T is judged as of V at least, whatever it claims. One row per
-- terminal, written only when a download moves it forward.
CREATE TABLE terminal_hotlist (
    terminal_id     text PRIMARY KEY,
    version         bigint NOT NULL,            -- the version the terminal holds after the block served
    served_at       timestamptz NOT NULL        -- when that block was served
);
