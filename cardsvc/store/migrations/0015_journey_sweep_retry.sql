-- Cards the journey sweep could not charge because the fare table does not know a station of what they
-- owe (docs/fares.md "Closing a station"). The sweep's watermark moves on, so without this list they
-- waited for the card's next tap even after the table was fixed; each sweep now looks at them again and
-- drops them once nothing at an unknown station is due (charged, or ended by a tap). Few rows, if any.
CREATE TABLE journey_sweep_retry (
    card_id  bigint PRIMARY KEY,
    since    timestamptz NOT NULL DEFAULT now()
);
