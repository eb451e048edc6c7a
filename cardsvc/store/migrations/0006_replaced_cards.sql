-- The sweep of timed-out metro journeys also looks at the journeys a replacement moved to the new card
-- (docs/transit.md "Open metro journeys"): the cards replaced since its last run, found without
-- scanning the card table. Replacements are a few thousand a day: the index stays small.
CREATE INDEX card_replaced_at ON card (status_changed_at) WHERE status = 5;
