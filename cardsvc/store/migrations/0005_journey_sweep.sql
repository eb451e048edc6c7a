-- The sweep of timed-out metro journeys (docs/transit.md "Open metro journeys"): metro entries up to
-- swept_to have been looked at. One row.
CREATE TABLE journey_sweep (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    swept_to    timestamptz NOT NULL
);
