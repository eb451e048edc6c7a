-- The hotlist versions served to each terminal over the upload window, an hour at a time (docs/transit.md
-- "Verdicts").
--
-- terminal_hotlist (migration 0010) keeps each terminal's last serve only. Validators poll the hotlist every
-- few minutes and upload their offline records later, so by the upload the last serve is almost always
-- after the records, and a record that claimed an older list than its validator held was judged on its
-- claim. A record is judged as of the highest version served to its terminal at or before its time: the
-- last serve, and here the first serve of each hour in which the terminal moved forward. A record made
-- after a serve that is neither (a later one within the same hour) is judged as of the hour's first. One
-- row per terminal and hour with something new, kept for the upload window (maintenance prunes it):
-- ~24 rows a day per validator when the hotlist changes every hour.
CREATE TABLE terminal_hotlist_serve (
    terminal_id     text NOT NULL,
    hour            timestamptz NOT NULL,       -- date_trunc('hour', served_at)
    version         bigint NOT NULL,            -- the version the terminal held after that serve
    served_at       timestamptz NOT NULL,
    PRIMARY KEY (terminal_id, hour)
);
CREATE INDEX terminal_hotlist_serve_served_at ON terminal_hotlist_serve (served_at);
INSERT INTO terminal_hotlist_serve (terminal_id, hour, version, served_at)
SELECT terminal_id, date_trunc('hour', served_at), version, served_at FROM terminal_hotlist;
