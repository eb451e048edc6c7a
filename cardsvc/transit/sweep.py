"""Timed-out metro journeys, and held exits whose entry never came, charged without waiting for the
card's next tap (docs/transit.md "Open metro journeys").

A rider who taps in and never taps out (an emergency gate, a broken validator) owes the maximum fare
(`fares.close_open_journey`). The tap engine charges it at the card's next tap, which may be days later
and lands in another clearing day, or never. The sweep charges it once the journey has been open for
`journey_timeout_s`, at the moment it timed out. A ride-code gate's exit uploaded with no entry is
held for its entry (docs/fares.md "Late uploads"); when none has come `journey_timeout_s` after the exit,
the sweep charges it the maximum fare (`fares.charge_held_exits`), the same way:

1. the candidates are the cards with a metro entry in the journal (an online tap-in writes a 0-fen fare
   row) between the last sweep's watermark (`journey_sweep.swept_to`; an hour back on the first run) and
   now − `journey_timeout_s`, read through the clearing index (operator, time), whose purse still shows
   an open journey that timed out or a held exit now due (read without a lock: most of those riders have
   left; a held exit's own row is a 0-fen fare row at its station); and the new
   cards of the replacements since the window began (the fare state moved there), through a partial
   index of replaced cards. The journal is read a window of at most `WINDOW_MAX` at a time, and the
   purses of its cards `CANDIDATE_CHUNK` at a time: looking up a window's purses costs a random read
   each, and at rush hour at 40M cards one statement for them all outlasted the command timeout, so
   the window never passed and every later journey went unswept (docs/transit.md "Open metro journeys");
2. per chunk, one transaction: their purses locked `FOR UPDATE` in card order (as the tap engine does), the
   journey re-read under the lock and closed only if it is still open and timed out; the penalty and the
   purse in one statement. A card that cannot pay (below its overdraft) is left open: its next tap, after
   a top-up, charges it;
3. the watermark moves to the end of the window.

A gate's upload hours after the ride (an entry opening a journey already timed out, an exit held past its
timeout) is behind the watermark: the tap batch that writes it lists the card in `journey_sweep_retry`
(`limits.SWEEP_BEHIND_MARGIN_S`), and the next sweep charges it; a listed card not due yet stays listed.

A card whose due charge is at a station the fare table does not know (neither served nor retired) cannot be
charged; it is kept in `journey_sweep_retry` (migration 0015), in the chunk's transaction, and every later
sweep looks at those cards first, so that once the table is fixed (the station listed under
metro.retired) the next sweep charges them; a card leaves the list when nothing at an unknown station is
due any more.

Idempotent and safe to run concurrently with taps and with itself (a session advisory lock lets one run
at a time; a journey closed once is no longer open). Journal rows carry `source` 5 (SOURCE_SWEEP) and the
terminal `system`; clearing counts them like any penalty, on the day the journey timed out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import cast

import asyncpg

from cardsvc import limits
from protocols.card import CardStatus

from . import clearing, fares
from .taps import KIND_FARE, KIND_PENALTY, SOURCE_SWEEP

__all__ = ["SWEEP_TERMINAL", "SweepResult", "due_cards", "metro_operators", "sweep_timed_out_journeys"]

SWEEP_TERMINAL = "system"
CHUNK_CARDS = 500
FIRST_LOOK_BACK = dt.timedelta(hours=1)  # the first sweep of a database: entries of the hour before the timeout
# The journal is read this much at a time. Behind by more (a first run, the service stopped for a while), a
# run goes through the windows one by one, moving the watermark after each.
WINDOW_MAX = dt.timedelta(minutes=15)
# A window's cards have their purses looked at this many per statement: a purse is a random read in a table
# of 40M, and one statement for a rush-hour window's 169,288 metro entries took 9.7 s at 40M cards, past
# the pool's command timeout, every time it was retried. 5,000 of them take a fraction of a second.
CANDIDATE_CHUNK = 5_000
_LOCK_KEY = 0x6A6F75726E6579  # pg advisory lock: one sweep at a time across workers and hosts


@dataclasses.dataclass(frozen=True, slots=True)
class SweepResult:
    candidates: int = 0
    closed: int = 0  # open journeys charged
    charged_fen: int = 0  # for journeys and held exits
    unpaid: int = 0  # cards with something due that the purse cannot pay: left for the card's next tap
    held_exits: int = 0  # held exits charged
    skipped: bool = False  # another sweep was running
    swept_to: dt.datetime | None = None
    # cards with something due at a station the fare table does not know (neither served nor retired):
    # left for the card's next tap; docs/fares.md "Closing a station"
    unpriced: int = 0
    unknown_stations: tuple[str, ...] = ()  # those stations' ids, sorted


# A purse that still shows an open journey that timed out or a held exit now due, by then ($cut: unix
# seconds). Read without locks: most riders have left, and only the others are locked and re-checked.
_DUE_SQL = """(
    (jsonb_typeof(p.journey -> 'journey') = 'object' AND (p.journey -> 'journey' ->> 'time')::bigint <= {cut})
    OR (p.journey ? 'unpaired' AND jsonb_path_exists(
        p.journey, '$.unpaired[*] ? (@.direction == "out" && @.charged == false && @.time <= $cut)',
        jsonb_build_object('cut', {cut}::bigint)))
)"""
# The cards with a metro tap in the window: an entry, or a held exit (0-fen fare rows at a station).
_ENTRIES_SQL = """
SELECT DISTINCT card_id FROM txn_journal
WHERE counterparty = ANY($1::text[]) AND at >= $2 AND at < $3
  AND kind = $4 AND amount_fen = 0 AND station_id IS NOT NULL
ORDER BY 1
"""
_DUE_PURSES_SQL = f"SELECT p.card_id FROM purse p WHERE p.card_id = ANY($1::bigint[]) AND {_DUE_SQL.format(cut='$2')}"
# A replacement since the window began may have taken an open journey to the new card. The status is
# written in, not a parameter: a generic plan could not use the partial index `card_replaced_at` (status 5).
_REPLACED_SQL = f"""
SELECT p.card_id FROM card c
JOIN purse p ON p.card_id = c.replaced_by
WHERE c.status = {int(CardStatus.REPLACED)} AND c.status_changed_at >= $1 AND {_DUE_SQL.format(cut='$2')}
"""

_RETRY_SQL = """
WITH gone AS (
    DELETE FROM journey_sweep_retry WHERE card_id = ANY($1::bigint[]) AND card_id <> ALL($2::bigint[])
)
INSERT INTO journey_sweep_retry (card_id) SELECT unnest($2::bigint[]) ON CONFLICT (card_id) DO NOTHING
"""

_LOCK_SQL = """
SELECT card_id, balance_fen, journey FROM purse WHERE card_id = ANY($1::bigint[]) ORDER BY card_id FOR UPDATE
"""

_WRITE_SQL = """
WITH pu AS (
    UPDATE purse p SET balance_fen = v.balance_fen, journey = v.journey, updated_at = now()
    FROM unnest($1::bigint[], $2::bigint[], $3::jsonb[]) AS v(card_id, balance_fen, journey)
    WHERE p.card_id = v.card_id
    RETURNING 1
)
INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty,
                         line_id, station_id, source)
SELECT v.card_id, $4::smallint, $5::text, 0, v.amount_fen, 1, v.at, v.counterparty, v.line_id, v.station_id,
       $6::smallint
FROM unnest($12::bigint[], $7::bigint[], $8::timestamptz[], $9::text[], $10::text[], $11::text[])
     AS v(card_id, amount_fen, at, counterparty, line_id, station_id)
"""


def metro_operators(table: fares.FareTable) -> list[str]:
    """The operators the table credits its metro fares to."""
    return sorted(set(table.station_operator.values()))


@dataclasses.dataclass
class _Chunk:
    """What one chunk's transaction writes: purses (one per card) and penalty rows (one or more per card)."""

    ids: list[int] = dataclasses.field(default_factory=list)
    balances: list[int] = dataclasses.field(default_factory=list)
    journeys: list[dict[str, object]] = dataclasses.field(default_factory=list)
    row_cards: list[int] = dataclasses.field(default_factory=list)
    amounts: list[int] = dataclasses.field(default_factory=list)
    ats: list[dt.datetime] = dataclasses.field(default_factory=list)
    operators: list[str] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)  # clearing needs the line of every fare row
    stations: list[str] = dataclasses.field(default_factory=list)
    closed: int = 0
    held: int = 0
    unpaid: int = 0

    unpriced_ids: list[int] = dataclasses.field(default_factory=list)
    unknown_stations: set[str] = dataclasses.field(default_factory=set)
    pending_ids: list[int] = dataclasses.field(default_factory=list)  # listed: something falls due soon

    def row(self, card_id: int, penalty: fares.Penalty, line: str, at_s: int) -> None:
        assert penalty.station is not None
        self.row_cards.append(card_id)
        self.amounts.append(-penalty.amount_fen)
        self.ats.append(dt.datetime.fromtimestamp(at_s, dt.UTC))
        self.operators.append(penalty.operator)
        self.lines.append(line)
        self.stations.append(penalty.station)


async def _close_chunk(
    conn: asyncpg.Connection, table: fares.FareTable, card_ids: Sequence[int], now_s: int, overdraft_fen: int
) -> _Chunk:
    """Charge one chunk's timed-out journeys and due held exits, in one transaction."""
    c = _Chunk()
    timeout = table.rules.journey_timeout_s
    async with conn.transaction():
        for row in await conn.fetch(_LOCK_SQL, list(card_ids)):
            if not row["journey"]:
                continue
            state = fares.JourneyState.from_dict(row["journey"])
            entry = state.journey
            # Held exits first, as a tap does: closing the journey keeps its entry among the unpaired taps,
            # which could otherwise push out a held exit before it is charged.
            held, after = fares.charge_held_exits(table, state, now_s)
            penalty, after = fares.close_open_journey(table, after, now_s)
            # Something due soon (an upload listed it after its time's window was read, limits.
            # SWEEP_BEHIND_MARGIN_S): the card stays listed, since a window may not bring it again.
            if (later := fares.first_due(table, after)) is not None and later <= now_s + limits.SWEEP_BEHIND_MARGIN_S:
                c.pending_ids.append(row["card_id"])
            if penalty is None and not held and after == state:
                continue  # exited, entered again, or the held exit's entry came: nothing due
            cost = (penalty.amount_fen if penalty is not None else 0) + sum(p.amount_fen for _, p in held)
            # Clearing lists each penalty under its station's line: a station the table no longer has (a
            # fare table deployed without listing it under metro.retired) leaves the card for its next tap.
            charges = [] if penalty is None or entry is None else [(penalty, entry.time + timeout)]
            charges += [(p, due_s) for due_s, p in held]
            lines = [fares.station_line(table, p.station or "") for p, _ in charges]
            if None in lines:
                c.unpriced_ids.append(row["card_id"])
                c.unknown_stations.update(p.station or "" for (p, _), ln in zip(charges, lines, strict=True) if ln is None)
                continue
            if cost and row["balance_fen"] - cost < -overdraft_fen:
                c.unpaid += 1
                continue
            c.ids.append(row["card_id"])
            c.balances.append(row["balance_fen"] - cost)
            c.journeys.append(after.to_dict())
            for (p, at_s), line in zip(charges, lines, strict=True):
                c.row(row["card_id"], p, cast(str, line), at_s)  # a journey: at the moment it timed out
            c.closed += 1 if penalty is not None and entry is not None else 0
            c.held += len(held)
        if c.ids:
            await conn.execute(
                _WRITE_SQL, c.ids, c.balances, c.journeys, KIND_PENALTY, SWEEP_TERMINAL, SOURCE_SWEEP, c.amounts,
                c.ats, c.operators, c.lines, c.stations, c.row_cards,
            )  # fmt: skip
        # The cards to look at again: this chunk's unpriced ones and those with a charge due soon in, the
        # others of the chunk out.
        await conn.execute(_RETRY_SQL, list(card_ids), c.unpriced_ids + c.pending_ids)
    return c


async def due_cards(
    conn: asyncpg.Connection,
    operators: Sequence[str],
    since: dt.datetime,
    upto: dt.datetime,
    cut_s: int,
    replacements: bool = True,
) -> list[int]:
    """The cards, in order, with a metro tap in [since, upto) credited to one of `operators` whose purse
    shows something due by `cut_s` (unix seconds), and (unless not `replacements`) the new cards of the
    replacements since `since` that do. Read-only: the sweep locks and re-checks them."""
    entries = [r["card_id"] for r in await conn.fetch(_ENTRIES_SQL, list(operators), since, upto, KIND_FARE)]
    found: set[int] = set()
    for start in range(0, len(entries), CANDIDATE_CHUNK):
        rows = await conn.fetch(_DUE_PURSES_SQL, entries[start : start + CANDIDATE_CHUNK], cut_s)
        found.update(r["card_id"] for r in rows)
    if replacements:
        found.update(r["card_id"] for r in await conn.fetch(_REPLACED_SQL, since, cut_s))
    return sorted(found)


async def sweep_timed_out_journeys(
    pool: asyncpg.Pool, table: fares.FareTable, overdraft_fen: int, now: dt.datetime | None = None
) -> SweepResult:
    """Charge the metro journeys that timed out since the last sweep; see the module docstring."""
    now = now or dt.datetime.now(dt.UTC)
    due = now - dt.timedelta(seconds=table.rules.journey_timeout_s)
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            return SweepResult(skipped=True)
        try:
            since = await conn.fetchval("SELECT swept_to FROM journey_sweep") or due - FIRST_LOOK_BACK
            now_s = int(now.timestamp())
            # The listed cards: left before at a station the table did not know (charged now if it does),
            # and those an upload listed after this sweep had read its ride's time.
            retry = [r["card_id"] for r in await conn.fetch("SELECT card_id FROM journey_sweep_retry ORDER BY 1")]
            if not retry and since >= due:
                return SweepResult(swept_to=since)
            # Entries credited to the table's metro operators, and to registered ones: an operator removed
            # from the table (`cardsvc clearing register`) may still have journeys open.
            operators = sorted(set(metro_operators(table)) | await clearing.registered_operators(conn))
            candidates = closed = charged = unpaid = held = 0
            unknown: set[str] = set()
            unpriced: set[int] = set()

            async def close(cards: list[int]) -> None:
                nonlocal candidates, closed, charged, unpaid, held
                for start in range(0, len(cards), CHUNK_CARDS):
                    c = await _close_chunk(conn, table, cards[start : start + CHUNK_CARDS], now_s, overdraft_fen)
                    closed, charged = closed + c.closed, charged - sum(c.amounts)
                    unpaid, held = unpaid + c.unpaid, held + c.held
                    unpriced.update(c.unpriced_ids)
                    unknown.update(c.unknown_stations)
                candidates += len(cards)

            await close(retry)
            retry_set = set(retry)  # looked at already in this run
            # The replacements since the run's first window began, up to now, are looked at once, with it
            # (not again with the later windows).
            replacements = True
            cut_s = now_s - table.rules.journey_timeout_s
            while since < due:  # one bounded window at a time, each with its watermark
                upto = min(due, since + WINDOW_MAX)
                found = await due_cards(conn, operators, since, upto, cut_s, replacements)
                await close([card_id for card_id in found if card_id not in retry_set])
                replacements = False
                await conn.execute(
                    """INSERT INTO journey_sweep (swept_to) VALUES ($1)
                       ON CONFLICT (one) DO UPDATE SET swept_to = greatest(journey_sweep.swept_to, EXCLUDED.swept_to)""",
                    upto,
                )
                since = upto
            return SweepResult(
                candidates, closed, charged, unpaid, held, False, since, len(unpriced), tuple(sorted(unknown))
            )
        finally:
            await _unlock(conn)


async def _unlock(conn: asyncpg.Connection) -> None:
    """Release the sweep's session lock. The pool does not reset connections it takes back, so one that
    could not release it (the unlock cancelled by a shutdown, the server gone) is closed instead: a
    pooled session holding the lock would skip every sweep of every worker from then on."""
    try:
        released = await conn.fetchval("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    except BaseException:
        conn.terminate()
        raise
    if not released:  # never expected: the lock was taken on this session
        conn.terminate()
