-- Concessions managed by the card office (docs/transit.md "Concessions"): registering, the elderly
-- extra quota (once per calendar year) and ending a concession, each with an append-only event.
--
-- An ended concession keeps its row (ended_at set): the year's elderly ride count survives an end and a
-- new registration, so ending and re-registering never gives a fresh quota. The tap engine reads only
-- rows with ended_at IS NULL.
ALTER TABLE concession DROP COLUMN extra_granted;
ALTER TABLE concession ADD COLUMN extra_year int;            -- the calendar year the extra rides were granted
ALTER TABLE concession ADD COLUMN ended_at timestamptz;
ALTER TABLE concession ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

CREATE TABLE concession_event (
    event_id       bigint GENERATED ALWAYS AS IDENTITY,
    holder_id      bigint NOT NULL,
    op             text NOT NULL,                           -- set | extra_quota | end
    kind_before    text,
    kind_after     text,
    rides_left     int,                                     -- the elderly rides left after the event
    terminal_id    text NOT NULL,
    operator       text,
    request_id     text,
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (holder_id, event_id)
);
CREATE TRIGGER concession_event_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON concession_event
    FOR EACH STATEMENT EXECUTE FUNCTION cardsvc_append_only();
