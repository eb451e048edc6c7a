-- Who registered each cardholder: the terminal, the clerk (HolderCreate.operator, accepted since the
-- first release but not kept until this migration) and the request id, as card_event keeps them for a
-- card's lifecycle. Append-only. A separate table rather than columns of cardholder: the 40 million
-- seeded holders have no such row (and would each carry a null bitmap, ~8 bytes a row, 0.3 GB).
CREATE TABLE holder_event (
    event_id       bigint GENERATED ALWAYS AS IDENTITY,
    holder_id      bigint NOT NULL,
    op             text NOT NULL,                           -- create
    terminal_id    text NOT NULL,
    operator       text,
    request_id     text,
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (holder_id, event_id)
);
CREATE TRIGGER holder_event_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON holder_event
    FOR EACH STATEMENT EXECUTE FUNCTION cardsvc_append_only();
