-- The first and the last serve of each hour (docs/transit.md "Verdicts"). Migration 0012 kept each hour's
-- first serve only: a block served later in an hour was forgotten once the terminal downloaded again, for
-- every record after a quiet hour. A record is judged as of the highest version served to its terminal at
-- or before its time: the last serve (terminal_hotlist), and the first and the last of each hour in which
-- the terminal moved forward, over the upload window and each terminal's newest hour before it (a record
-- early in the window was made under it). A record made after a serve between an hour's first and last is
-- judged as of the hour's first.
ALTER TABLE terminal_hotlist_serve RENAME COLUMN version TO first_version;
ALTER TABLE terminal_hotlist_serve RENAME COLUMN served_at TO first_at;
ALTER TABLE terminal_hotlist_serve ADD COLUMN last_version bigint;
ALTER TABLE terminal_hotlist_serve ADD COLUMN last_at timestamptz;
UPDATE terminal_hotlist_serve SET last_version = first_version, last_at = first_at;
ALTER TABLE terminal_hotlist_serve ALTER COLUMN last_version SET NOT NULL;
ALTER TABLE terminal_hotlist_serve ALTER COLUMN last_at SET NOT NULL;
DROP INDEX terminal_hotlist_serve_served_at;
CREATE INDEX terminal_hotlist_serve_hour ON terminal_hotlist_serve (hour);
