-- The hotlist versions served to each terminal over the upload window, an hour at a time (docs/transit.md
-- "Verdicts").
--
-- terminal_hotlist (migration 0010) keeps each terminal's last serve only. Validators poll the hotlist every
-- few minutes and upload their offline records later, so by the upload the last serve is almost always
-- after the records, and a record that claimed an older list than its validator held was judged on its
-- claim. A record is judged as of the highest version served to its terminal at or before its time: the
-- last serve, and here the first and the last serve of each hour in which the terminal moved forward. A
-- record made after a serve that is none of these (one between an hour's first and last) is judged as of
-- the hour's first. One row per terminal and hour with something new (~24 a day per validator when the
-- hotlist changes every hour), kept for the upload window, and each terminal's newest row before it: the
-- version a record early in the window was made under.
CREATE TABLE terminal_hotlist_serve (
    terminal_id     text NOT NULL,
    hour            timestamptz NOT NULL,       -- date_trunc('hour', first_at)
    first_version   bigint NOT NULL,            -- the version the terminal held after the hour's first serve
    first_at        timestamptz NOT NULL,
    last_version    bigint NOT NULL,            -- ... and after its last
    last_at         timestamptz NOT NULL,
    PRIMARY KEY (terminal_id, hour)
);
CREATE INDEX terminal_hotlist_serve_hour ON terminal_hotlist_serve (hour);
INSERT INTO terminal_hotlist_serve (terminal_id, hour, first_version, first_at, last_version, last_at)
SELECT terminal_id, date_trunc('hour', served_at), version, served_at, version, served_at FROM terminal_hotlist;
