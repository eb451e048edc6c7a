-- Terminal changes in commit order, so that every worker's terminal cache reads only what changed
-- (cardsvc/security/terminals.py). Before this, each NOTIFY and each fallback timer re-read and decrypted
-- every terminal's keys, blocking the worker's event loop for ~25 µs a terminal: ~0.14 s at 5,500
-- terminals, seconds at a city's 100,000.
--
-- Every change to a terminal or to one of its keys gives the terminal row the next `change_seq`, taken from
-- the single `terminal_head` row like the hotlist's versions (0001): the row lock is held until commit, so
-- a change numbered N+1 commits after N. A cache that has read every change up to N in one snapshot has
-- therefore missed none below N; a sequence would not promise that (N+1 can commit first).
-- Terminal changes are administration (registration, key rotation, disabling): a few a minute.
CREATE TABLE terminal_head (
    one            boolean PRIMARY KEY DEFAULT true CHECK (one),
    version        bigint NOT NULL
);

ALTER TABLE terminal ADD COLUMN change_seq bigint;
UPDATE terminal t SET change_seq = s.n
FROM (SELECT terminal_id, row_number() OVER (ORDER BY created_at, terminal_id) AS n FROM terminal) s
WHERE s.terminal_id = t.terminal_id;
INSERT INTO terminal_head VALUES (true, (SELECT coalesce(max(change_seq), 0) FROM terminal));
ALTER TABLE terminal ALTER COLUMN change_seq SET NOT NULL;
CREATE UNIQUE INDEX terminal_change_seq ON terminal (change_seq);

CREATE FUNCTION cardsvc_terminal_change_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE terminal_head SET version = version + 1 RETURNING version INTO NEW.change_seq;
    RETURN NEW;
END $$;
CREATE TRIGGER terminal_change_seq BEFORE INSERT OR UPDATE ON terminal
    FOR EACH ROW EXECUTE FUNCTION cardsvc_terminal_change_seq();

-- A key added, changed or removed is a change of its terminal (whose row the cache reads again, keys and all).
CREATE FUNCTION cardsvc_terminal_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE terminal SET change_seq = change_seq
    WHERE terminal_id = CASE WHEN TG_OP = 'DELETE' THEN OLD.terminal_id ELSE NEW.terminal_id END;
    RETURN NULL;
END $$;
CREATE TRIGGER terminal_key_change_seq AFTER INSERT OR UPDATE OR DELETE ON terminal_key
    FOR EACH ROW EXECUTE FUNCTION cardsvc_terminal_key_changed();

-- Terminals are disabled, never deleted: their ids stay in the journal and the clearing files, and a cache
-- that reads changes would not see a row that is gone.
CREATE FUNCTION cardsvc_terminal_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'terminals are disabled, not deleted (cardsvc terminal disable)'
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER terminal_kept BEFORE DELETE OR TRUNCATE ON terminal
    FOR EACH STATEMENT EXECUTE FUNCTION cardsvc_terminal_kept();
