"""Online taps: fare, debit and journal, committed before the answer, coalesced into set-based batches.

A validator that is online sends each tap (terminal, terminal sequence, time, line/station, direction and
the credential). The handler verifies the credential's cryptography first (no database for a card
cryptogram; the e-card's device key for an e-card code), then hands a `TapItem` to the micro-batcher.

One batch is one transaction:
0. the request nonces of the batch's taps (single use: a tap whose nonce is already recorded is answered
   `replayed`, nothing else happens for it), recorded in the same statement as step 1;
1. the terminal transactions already answered (idempotency: a retry gets the stored answer, the same key
   with a different payload is a conflict);
2. the purses and cards of every card in the batch, the purses locked `FOR UPDATE` in card order (so
   two batches never deadlock), and the credential uses already recorded; then, in one more statement,
   the holders' concessions (locked, in holder order) and the batch's e-cards revoked by now;
3. in Python, item by item in arrival order: the pure fare engine on the locked state, updated in memory,
   so one card twice in a batch is charged correctly (the second tap sees the first one's journey);
4. one statement writes everything: credential uses, purse balances and journeys, concession quotas,
   journal transfers and the terminal transactions with their answers.

If a concurrent writer took a key between steps 1–2 and 4 (a retry racing its original on another worker,
or the same card answer at the card-auth endpoint), the write notices (`ON CONFLICT DO NOTHING` returns
fewer rows), the transaction rolls back and the batch runs again: it then sees the other's answer.
Step 2 locks only the purses; the card row comes from its snapshot, taken before any wait for a lock. A
card-office change that held a purse lock and committed during that wait (a replacement that moved the
purse and killed the card) is not in what it read, so the write is a compare-and-set on the card row's
version: if it changed, the batch runs again on the new rows (and a replaced card is then refused). The
holders' concessions are read once the purses are locked, and locked (`_AFTER_LOCK_SQL`): another batch of the
same holder (several gates uploading one rider's rides), a registration, an extra-rides grant or an end
that committed during the wait is then seen at once, instead of costing an attempt (elderly) or being
missed. The quota's write is a compare-and-set too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from cardsvc import limits, metrics
from cardsvc.errors import RETRY_LATER, ApiError
from cardsvc.flows import hotlist as hotlist_flow
from cardsvc.flows.credential_use import KIND_ECARD_CODE
from cardsvc.flows.views import effective_status
from cardsvc.store.batcher import columns
from protocols import transit
from protocols.card import CardStatus
from protocols.clearing import CorrectionReason
from protocols.hotlist import HotlistEntry

from . import fares
from .fare_table import EPOCH_ORDINAL

__all__ = [
    "HELD",
    "KIND_CORRECTION",
    "KIND_FARE",
    "KIND_PENALTY",
    "SOURCE_ONLINE",
    "SOURCE_SWEEP",
    "UPLOADED_ANSWER",
    "TapItem",
    "TapOutcome",
    "blocked_as_of",
    "process_taps",
    "stop_times",
]

# txn_journal.kind
KIND_FARE = 1
KIND_PENALTY = 2
KIND_TOPUP = 3
KIND_OPENING = 4
KIND_OFFLINE = 5
KIND_RIDECODE = 6
KIND_TRANSFER = 7  # purse balance moved to a replacement card
KIND_CORRECTION = 8  # a fare given back by the card office (corrections.py): purse credited, operator debited
# txn_journal.source
SOURCE_ONLINE = 1
SOURCE_OFFLINE = 2
SOURCE_RIDECODE = 3
SOURCE_OFFICE = 4
SOURCE_SWEEP = 5  # a timed-out metro journey charged by the sweep (no terminal transaction)

BATCH_ATTEMPTS_MAX = 3


class _Retry(Exception):
    """Roll the batch back and run it again; `moved`: e-cards a replacement moved to another card meanwhile
    (ecard_id → its card now), whose taps the next attempt charges there."""

    def __init__(self, moved: dict[int, int] | None = None) -> None:
        super().__init__()
        self.moved = moved or {}


class ReplacedMeanwhile(Exception):
    """A `TapItem.resolved_unreplaced` item's card was replaced by the time the batch locked it: the batch
    is rolled back and its caller resolves the rides again (a ride before the replacement goes to the new
    card, docs/transit.md)."""


_REPLACED = CardStatus.REPLACED.api_name


@dataclasses.dataclass(frozen=True, slots=True)
class TapItem:
    terminal_id: str
    terminal_seq: int
    request_hash: bytes
    tap: fares.Tap
    # Exactly one of card_sn / card_id names the card (card_sn for a card cryptogram).
    card_sn: str | None = None
    card_id: int | None = None
    # The credential's single-use key, recorded with the debit (None: nothing to record).
    cred_kind: int | None = None
    cred_token: int | None = None
    # A refusal decided before the batch (forged or expired credential): stored as the answer.
    declined: str | None = None
    overdraft_fen: int = 0
    source: int = SOURCE_ONLINE  # txn_journal.source of the debit (SOURCE_RIDECODE for a ride code)
    # The signed request's nonce, recorded by the batch (None: the caller recorded it).
    nonce: str | None = None
    # rides.py named the card while it was not replaced; if it is by the time of the lock, the batch raises
    # ReplacedMeanwhile instead of refusing the ride on the dead card.
    resolved_unreplaced: bool = False
    # An uploaded ride-code ride: the deny-list (hotlist) version its gate held, at least the highest served
    # to it before the ride (rides.py). A lost card not yet blocked as of that version is charged as usable.
    deny_version: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TapOutcome:
    """The answer to one tap. `replayed_answer` is True when it is the stored answer of a retry."""

    result: str  # approved | declined | conflict | replayed (the request nonce was used: no answer stored)
    reason: str | None
    fare_fen: int
    balance_fen: int | None
    txn_id: int | None
    detail: dict[str, Any]
    replayed_answer: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "result": self.result,
            "reason": self.reason,
            "fare_fen": self.fare_fen,
            "balance_fen": self.balance_fen,
            "txn_id": self.txn_id,
            **self.detail,
        }
        return out


@dataclasses.dataclass
class _Quota:
    """A holder's concession as the batch read it, one per holder (the quota is the holder's, not a card's).
    The write is a compare-and-set on `read_*` (the module docstring says why)."""

    holder_id: int
    concession: fares.Concession
    quota_year: int | None
    read_rides_left: int | None
    read_quota_year: int | None
    touched: bool = False


@dataclasses.dataclass
class _Card:
    card_id: int
    card_sn: str
    holder_id: int
    # The card row version decided on, by address (ctid) and creating transaction (xmin): the write checks
    # it is still the visible one.
    tid: tuple[int, int]
    version: int
    usable: bool
    status: str
    has_purse: bool
    balance_fen: int
    journey: fares.JourneyState
    quota: _Quota
    # A lost card (temporary or formal report) keeps its purse: rides uploaded later that were taken
    # before the card stopped are still charged (`_usable_for`). The time it stopped, else None.
    lost_since: float | None = None
    expires_on: dt.date | None = None
    touched: bool = False
    # A lost card's hotlist entries, (version, is a block) ascending: read only when a ride in the batch
    # names the deny-list version its gate held (`_gate_unaware`).
    hotlist: tuple[HotlistEntry, ...] | None = None
    # Active and its application not locked: `usable` but for its expiry date, which rides taken through
    # the card's last valid day and uploaded after it do not look at (`_stop`).
    active: bool = False


# When a card stopped: the start of its current unusable spell, from its (append-only) card events. A card
# is usable while active with its application unlocked, so the spell may begin with an application lock
# that a loss report, a replacement or an unlock while still lost followed: a ride after the lock is after
# the stop. Read only for the lost cards that have an uploaded ride in the batch (and by rides.py for
# replaced cards): a card has a handful of events.
_EVENTS_SQL = """
SELECT card_id, op, status_before, status_after, at FROM card_event WHERE card_id = ANY($1::bigint[])
ORDER BY card_id, at, event_id
"""
_APP_LOCK_OPS = {"lock-app": True, "unlock-app": False}


async def stop_times(conn: asyncpg.Connection, card_ids: Sequence[int]) -> dict[int, float]:
    """When each of these cards last stopped being usable (its last move from active with its application
    unlocked to anything else: an application lock, a loss report, a replacement), unix seconds; cards never
    usable are left out."""
    stops: dict[int, float] = {}
    card_id: int | None = None
    locked = False
    for e in await conn.fetch(_EVENTS_SQL, list(card_ids)):
        if e["card_id"] != card_id:  # (a seeded card's history starts active, unlocked, with no event)
            card_id, locked = e["card_id"], False
        was_usable = e["status_before"] == CardStatus.ACTIVE and not locked
        locked = _APP_LOCK_OPS.get(e["op"], locked)
        if was_usable and not (e["status_after"] == CardStatus.ACTIVE and not locked):
            stops[e["card_id"]] = e["at"].timestamp()
    return stops


async def _loss_stops(conn: asyncpg.Connection, cards: Sequence[_Card], items: Sequence[TapItem]) -> None:
    """Set `lost_since` of the lost `cards` that have an uploaded ride among `items` (`stop_times`)."""
    uploaded = {key for i in items if i.tap.uploaded for key in (i.card_id, i.card_sn)}
    wanted = [c for c in cards if c.card_id in uploaded or c.card_sn in uploaded]
    if not wanted:
        return
    stops = await stop_times(conn, [c.card_id for c in wanted])
    for c in wanted:
        c.lost_since = stops.get(c.card_id, c.lost_since)


def blocked_as_of(entries: Sequence[HotlistEntry], version: int) -> bool:
    """Whether the card these hotlist entries are of (`hotlist_flow.entries_of`) was blocked as of `version`."""
    return bool(entries) and transit.blocked_at_version(entries, entries[0].card_sn, version)


async def _deny_lists(conn: asyncpg.Connection, cards: Sequence[_Card], items: Sequence[TapItem]) -> None:
    """Read the hotlist entries of the lost `cards` that a ride naming its gate's deny-list version is for."""
    named = {key for i in items if i.deny_version is not None for key in (i.card_id, i.card_sn)}
    wanted = {c.card_id: c for c in cards if c.lost_since is not None and (c.card_id in named or c.card_sn in named)}
    if not wanted:
        return
    for card_id, entries in (await hotlist_flow.entries_of(conn, list(wanted))).items():
        wanted[card_id].hotlist = tuple(entries)


def _gate_unaware(card: _Card, item: TapItem) -> bool:
    """A lost card's ride let through by a gate whose deny-list (the hotlist as of `item.deny_version`)
    did not block the card yet: the gate could not refuse it, so it is charged as if the card were usable
    (protocols/ridecode.md: "an ok there and a deny entry added later is the scheme's risk, not the
    operator's"). A gate that held the block should have refused the code: judged as usual. (A replaced
    card's such ride goes to the new card: rides.py.)"""
    if item.deny_version is None or card.lost_since is None or card.hotlist is None:
        return False
    return not blocked_as_of(card.hotlist, item.deny_version)


def _stop(card: _Card, item: TapItem, table: fares.FareTable) -> float | None:
    """For a tap a gate uploads later on a card not usable now: when the card stopped, unix seconds (the rides
    before it are charged), or None when it is not charged at all (cancelled, application locked). The
    stop is the end of the card's last valid day (`expires_on`, local time: expiry is a date on the card,
    and the ride-code certificate a gate checks ends with it), or the card's loss if earlier, unless the
    gate could not refuse the ride (`_gate_unaware`)."""
    if card.expires_on is None:
        return None
    expired = (card.expires_on.toordinal() - EPOCH_ORDINAL + 1) * 86400 - table.rules.utc_offset_s
    if card.active or _gate_unaware(card, item):
        return expired
    if card.lost_since is None:
        return None
    return min(card.lost_since, expired)


def _usable_for(card: _Card, item: TapItem, table: fares.FareTable) -> bool:
    """Whether the card may be charged for this tap: usable now, or, for a ride a gate uploads later, taken
    before the card stopped (`_stop`: its last valid day ended, or it was reported lost; a loss reported
    after the ride does not undo it; an earlier, lifted loss is not looked at: docs/transit.md). The exit of
    a journey entered before the stop ends that journey, at its distance fare, rather than leaving it to
    the sweep's maximum fare; when that journey's entry has not arrived yet (or the sweep closed it), the
    exit is priced as one that only such an entry can take (`_priced_tap`), if it came within the journey
    timeout after the stop."""
    if card.usable:
        return True
    tap = item.tap
    stop = _stop(card, item, table) if tap.uploaded else None
    if stop is None:
        return False
    started = tap.time
    open_journey = card.journey.journey
    if tap.direction == "out" and open_journey is not None and open_journey.time <= tap.time:
        started = open_journey.time
    elif tap.direction == "out" and tap.time - table.rules.journey_timeout_s < stop:
        started = math.ceil(stop) - 1  # its entry, if it comes, is before the stop
    return started < stop


def _priced_tap(card: _Card, item: TapItem, table: fares.FareTable) -> fares.Tap:
    """The tap as the fare engine prices it: an uploaded exit after the card stopped counts only as the end
    of a journey entered before the stop (`Tap.entered_before`)."""
    tap = item.tap
    if card.usable or not tap.uploaded or tap.direction != "out":
        return tap
    stop = _stop(card, item, table)
    if stop is None:
        return tap
    at = math.ceil(stop)  # an entry at whole second t is before the stop iff t < at
    return tap if tap.time < at else dataclasses.replace(tap, entered_before=at)


# The batch's cards, locked, with the credential uses among the batch's credentials already recorded
# for each (one round trip instead of two).
_LOCK_SQL = """
SELECT c.card_id, c.card_sn, c.holder_id, c.status, c.app_locked, c.expires_on, c.temp_loss_until, c.has_purse,
       c.status_changed_at,
       c.ctid AS card_tid, c.xmin::text::bigint AS card_version, p.balance_fen, p.journey,
       ARRAY(SELECT u.kind::bigint FROM credential_use u
             WHERE u.card_id = c.card_id AND (u.kind, u.token) IN (SELECT * FROM unnest($3::smallint[], $4::bigint[]))
             ORDER BY u.kind, u.token) AS used_kinds,
       ARRAY(SELECT u.token FROM credential_use u
             WHERE u.card_id = c.card_id AND (u.kind, u.token) IN (SELECT * FROM unnest($3::smallint[], $4::bigint[]))
             ORDER BY u.kind, u.token) AS used_tokens
FROM card c
JOIN purse p ON p.card_id = c.card_id
WHERE c.card_sn = ANY($1::text[]) OR c.card_id = ANY($2::bigint[])
ORDER BY c.card_id
FOR UPDATE OF p
"""

# Read once the purses are locked, so current (one round trip):
# - the concessions of the batch's holders, locked: every writer of a concession holds its holder's purse
#   locks first (taps, the card office), so this never waits for long; a holder without one costs a
#   primary-key probe;
# - the batch's e-cards as they are now: one revoked while its tap waited in the queue or for a lock is
#   refused, not charged (the handler's check ran before the wait; a revocation takes the purse lock); one
#   a replacement moved to the new card meanwhile (the handler read its card before) is charged there, the
#   batch run again with its tap on the new card (a replacement takes the old card's purse lock).
_AFTER_LOCK_SQL = """
WITH q AS (
    SELECT holder_id, kind, rides_left, quota_year FROM concession
    WHERE holder_id = ANY($1::bigint[]) AND ended_at IS NULL
    ORDER BY holder_id
    FOR UPDATE
)
SELECT holder_id, kind AS concession, rides_left, quota_year, NULL::bigint AS ecard_id, NULL::bigint AS ecard_card,
       NULL::boolean AS ecard_revoked FROM q
UNION ALL
SELECT NULL, NULL, NULL, NULL, ecard_id, card_id, revoked_at IS NOT NULL FROM ecard WHERE ecard_id = ANY($2::bigint[])
"""

_NO_PURSE_SQL = """
SELECT card_id, card_sn FROM card WHERE card_sn = ANY($1::text[]) OR card_id = ANY($2::bigint[])
"""

# The batch's nonces (the first row: those that were fresh) and the terminal transactions already answered.
_EXISTING_SQL = """
WITH n AS (
    INSERT INTO request_nonce (terminal_id, nonce)
    SELECT * FROM unnest($3::text[], $4::text[])
    ON CONFLICT DO NOTHING RETURNING terminal_id, nonce
)
SELECT 0 AS part, NULL::text AS terminal_id, NULL::bigint AS terminal_seq, NULL::bytea AS request_hash, NULL::text AS result,
       NULL::bigint AS amount_fen, NULL::bigint AS balance_fen, NULL::bigint AS txn_id, NULL::jsonb AS detail,
       (SELECT coalesce(array_agg(terminal_id), '{}') FROM n) AS fresh_terminals,
       (SELECT coalesce(array_agg(nonce), '{}') FROM n) AS fresh_nonces,
       txid_current() AS xid, now() AS tx_now
UNION ALL
SELECT 1, t.terminal_id, t.terminal_seq, t.request_hash, t.result, t.amount_fen, t.balance_fen, t.txn_id,
       t.detail, NULL, NULL, NULL, NULL
FROM unnest($1::text[], $2::bigint[]) AS k(terminal_id, terminal_seq)
JOIN terminal_txn t ON t.terminal_id = k.terminal_id AND t.terminal_seq = k.terminal_seq
ORDER BY part
"""

_REPLAYED = TapOutcome("replayed", "auth_replayed", 0, None, None, {})

# In a stored answer's detail (not in the answer sent): the answer of an uploaded ride, which a gate may upload
# again as long as the ride can be uploaded at all, so the maintenance prune keeps it that long
# (app.ride_code_use_retention_s) instead of `terminal_txn_retention_days`.
UPLOADED_ANSWER = "uploaded"

_WRITE_SQL = """
WITH cu AS (
    INSERT INTO credential_use (card_id, kind, token)
    SELECT * FROM unnest($1::bigint[], $2::smallint[], $3::bigint[])
    ON CONFLICT DO NOTHING RETURNING 1
), pu AS (
    UPDATE purse p SET balance_fen = v.balance_fen, journey = v.journey, updated_at = now()
    FROM unnest($4::bigint[], $5::bigint[], $6::jsonb[]) AS v(card_id, balance_fen, journey)
    WHERE p.card_id = v.card_id AND p.card_id = ANY($4::bigint[])
    RETURNING 1
), cv AS (  -- the batch's cards still as read (a replacement, a loss report... committed since: run again)
    -- by the row version's address: the heap page the lock statement just read, no index to look up
    SELECT count(*) AS n FROM card c
    JOIN unnest($7::tid[], $8::bigint[], $9::bigint[]) AS v(tid, card_id, version)
      ON c.ctid = v.tid AND c.card_id = v.card_id AND c.xmin::text::bigint = v.version
    WHERE c.ctid = ANY($7::tid[])
), ku AS (
    UPDATE concession k SET rides_left = v.rides_left, quota_year = v.quota_year
    FROM unnest($10::bigint[], $11::int[], $12::int[], $13::int[], $14::int[])
         AS v(holder_id, rides_left, quota_year, was_rides_left, was_quota_year)
    WHERE k.holder_id = v.holder_id AND k.ended_at IS NULL AND k.kind = 'elderly'
      AND k.rides_left IS NOT DISTINCT FROM v.was_rides_left AND k.quota_year IS NOT DISTINCT FROM v.was_quota_year
    RETURNING 1
), j AS (
    INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty,
                             line_id, station_id, source, quota_ride, quota_year)
    SELECT card_id, kind, terminal_id, terminal_seq, amount_fen, 1, at, counterparty, line_id, station_id, source,
           CASE WHEN quota_year IS NOT NULL THEN true END, quota_year
    FROM unnest($15::bigint[], $16::smallint[], $17::text[], $18::bigint[], $19::bigint[], $20::timestamptz[],
                $21::text[], $22::text[], $23::text[], $24::smallint[], $25::int[])
         AS v(card_id, kind, terminal_id, terminal_seq, amount_fen, at, counterparty, line_id, station_id, source,
              quota_year)
    RETURNING txn_id, terminal_id, terminal_seq, kind
), tt AS (
    INSERT INTO terminal_txn (terminal_id, terminal_seq, request_hash, card_id, result, amount_fen, balance_fen,
                              txn_id, detail)
    SELECT v.terminal_id, v.terminal_seq, v.request_hash, v.card_id, v.result, v.amount_fen, v.balance_fen,
           j.txn_id, v.detail
    FROM unnest($26::text[], $27::bigint[], $28::bytea[], $29::bigint[], $30::text[], $31::bigint[], $32::bigint[],
                $33::jsonb[])
         AS v(terminal_id, terminal_seq, request_hash, card_id, result, amount_fen, balance_fen, detail)
    LEFT JOIN j ON j.terminal_id = v.terminal_id AND j.terminal_seq = v.terminal_seq AND j.kind = 1
    ON CONFLICT DO NOTHING
    RETURNING terminal_id, terminal_seq, txn_id
)
SELECT (SELECT count(*) FROM cu) AS cu, (SELECT n FROM cv) AS cv, (SELECT count(*) FROM ku) AS ku, (SELECT count(*) FROM tt) AS tt,
       (SELECT coalesce(array_agg(terminal_id), '{}') FROM tt) AS t_ids,
       (SELECT coalesce(array_agg(terminal_seq), '{}') FROM tt) AS t_seqs,
       (SELECT coalesce(array_agg(txn_id), '{}') FROM tt) AS t_txns
"""

# Cards the journey sweep must look at whatever its watermark (cardsvc/transit/sweep.py).
_SWEEP_NOW_SQL = "INSERT INTO journey_sweep_retry (card_id) SELECT unnest($1::bigint[]) ON CONFLICT (card_id) DO NOTHING"


# A key that answers another request: this request's own first answer (nothing of it is stored), so not
# `replayed_answer` (a gate would take a ride answered as a replay for one already charged).
_CONFLICT = TapOutcome("conflict", "idempotency_conflict", 0, None, None, {})


def _stored(row: asyncpg.Record, item: TapItem) -> TapOutcome:
    if bytes(row["request_hash"]) != item.request_hash:
        return _CONFLICT
    # A copy: the record hands out the same decoded dict to every retry of this key in the batch.
    detail = dict(row["detail"] or {})
    detail.pop(UPLOADED_ANSWER, None)
    return TapOutcome(
        row["result"],
        detail.pop("reason", None),
        row["amount_fen"],
        row["balance_fen"],
        row["txn_id"],
        detail,
        replayed_answer=True,
    )


def _concession(
    row: Any, table: fares.FareTable, year: int
) -> tuple[fares.Concession, int | None]:
    kind = row["concession"] if row is not None else None
    if kind is None:
        return fares.NO_CONCESSION, None
    if kind != "elderly":
        return fares.Concession(kind), row["quota_year"]
    rides, quota_year = row["rides_left"], row["quota_year"]
    if quota_year is None or quota_year < year:  # a new calendar year: a fresh quota
        rides, quota_year = fares.elderly_quota_for_year(table, extra_granted=False), year
    # A year ahead of the batch's is the current one: the batch took its clock before a lock wait across
    # the local New Year, and a writer after midnight (a ride, the extra rides) started the new year.
    return fares.Concession("elderly", max(0, rides or 0)), quota_year


class _Batch:
    """The state of one batch attempt: decisions in arrival order and the rows to write."""

    def __init__(self, table: fares.FareTable, now: dt.datetime) -> None:
        self.table = table
        self.now = now
        self.outcomes: list[TapOutcome | None] = []
        self.creds: list[tuple[int, int, int]] = []
        # (card, kind, terminal, seq, fen, at, counterparty, line, station, source, and the year of the elderly
        # quota the ride used, or None: txn_journal.quota_ride and quota_year)
        self.journal: list[
            tuple[int, int, str, int, int, dt.datetime, str, str | None, str | None, int, int | None]
        ] = []
        self.answers: list[tuple[str, int, bytes, int | None, str, int, int | None, dict[str, Any]]] = []
        # The penalties the batch's uploads may give back (`_charges`, and those the batch charges itself), by
        # the tap they charged; and the fare_correction rows of those given back: (card, at, terminal, seq,
        # penalty txn, fen, ridecode, reason, then the penalty row's tap for one this batch charged: at,
        # terminal, seq, fen, station, operator, which of the tap's rows alike).
        self.charges: dict[tuple[int, str, str, int, int], list[_Charge]] = {}
        self.refunds: list[
            tuple[
                int, dt.datetime, str, int, int | None, int, bool, str,
                dt.datetime | None, str | None, int | None, int | None, str | None, str | None, int | None,
            ]
        ] = []  # fmt: skip

    def charge_for(self, card: _Card, refund: fares.Refund) -> tuple[_Charge, int] | None:
        """The penalty row that charged `refund`'s tap and how much of it to give back (what is left of it),
        or None when nothing is.

        Rows alike (one tap charged a journey and a held exit at one station, the same amount) cannot be
        told apart: they are a pool, and each other charged tap of the card's state that names them keeps
        a whole penalty of the pool for its own refund. So a penalty the card office gave back, whichever
        row it named, is never given back again from its twin."""
        key = (card.card_id, refund.station, refund.operator, refund.charged_at, refund.amount_fen)
        rows = self.charges.get(key)
        if not rows:
            return None
        alike = key[1:]
        others = sum(1 for u in card.journey.unpaired if (u.station, u.operator, u.charged_at, u.charged_fen) == alike) - 1
        best = max(rows, key=lambda c: c.left)
        give = min(refund.amount_fen, best.left, sum(c.left for c in rows) - refund.amount_fen * max(0, others))
        return (best, give) if give > 0 else None

    def answer(self, item: TapItem, card_id: int | None, outcome: TapOutcome) -> TapOutcome:
        detail = dict(outcome.detail)
        if outcome.reason is not None:
            detail["reason"] = outcome.reason
        if item.tap.uploaded:
            detail[UPLOADED_ANSWER] = True
        self.answers.append(
            (
                item.terminal_id,
                item.terminal_seq,
                item.request_hash,
                card_id,
                outcome.result,
                outcome.fare_fen,
                outcome.balance_fen,
                detail,
            )
        )
        return outcome


@dataclasses.dataclass(eq=False, slots=True)
class _Charge:
    """A penalty row that an upload completing its journey may give back (docs/fares.md "Late uploads"): its
    journal row, and what is left of it (less the corrections made so far, the batch's own included).

    A penalty this very batch charged has no row id yet (`txn_id` None): `charged_by` names its row by the
    tap that wrote it (time, terminal, seq) and which of that tap's rows alike it is, and the batch's write
    finds the id (`_REFUNDS_SQL`)."""

    txn_id: int | None
    left: int
    ridecode: bool
    line_id: str | None
    station_id: str | None
    charged_by: tuple[dt.datetime, str, int, int] | None = None
    # The card whose journal holds the row when it is not the tap's: a card the tap's card replaced (its
    # journey state moved with the purse), whose purse row this batch holds locked.
    card_id: int | None = None


# The penalty rows that charged the taps the batch's uploads may complete, each named by what the card's
# state kept of it (card, station, operator, the row's time, amount), with what the card office has not given
# back of it yet: through the journal's primary key (card_id, at). One tap may have charged two penalties
# alike (a journey at a station and a held exit at the same station): both rows (`_Batch.charge_for`).
# Each key is looked for on its card and on the cards it replaced (`_PREDECESSORS_SQL`): `n` is the key's.
_CHARGES_SQL = """
SELECT k.n, p.card_id, p.txn_id, p.kind, p.source, p.line_id, p.station_id,
       -p.amount_fen - (SELECT coalesce(sum(f.amount_fen), 0) FROM fare_correction f
                        WHERE f.card_id = p.card_id AND f.corrects_txn_id = p.txn_id)::bigint AS left_fen
FROM unnest($1::int[], $2::bigint[], $3::text[], $4::text[], $5::timestamptz[], $6::bigint[])
     AS k(n, card_id, station_id, counterparty, at, fen)
JOIN txn_journal p ON p.card_id = k.card_id AND p.at = k.at AND p.kind = $7 AND p.result = 1
                  AND p.amount_fen = -k.fen AND p.station_id = k.station_id AND p.counterparty = k.counterparty
ORDER BY k.n, p.card_id = ANY($8::bigint[]) DESC, p.txn_id
"""

# The cards each card replaced (its journey state, penalties remembered included, moved with the purse),
# with their purse rows locked: a card office correction of one of their penalties holds the same lock.
# SKIP LOCKED: this batch holds the newer card's purse, and the office locks the older one first, so
# waiting could deadlock; a penalty on a purse held elsewhere just now is not given back (counted).
_PREDECESSORS_SQL = """
WITH RECURSIVE l (live, card_id, holder_id, depth) AS (
    SELECT c.card_id, c.card_id, c.holder_id, 0 FROM card c WHERE c.card_id = ANY($1::bigint[])
    UNION ALL
    SELECT l.live, o.card_id, o.holder_id, l.depth + 1 FROM l
    JOIN card o ON o.holder_id = l.holder_id AND o.replaced_by = l.card_id
    WHERE l.depth < 100
)
SELECT l.live, p.card_id FROM l JOIN purse p ON p.card_id = l.card_id
WHERE l.depth > 0
ORDER BY p.card_id
FOR UPDATE OF p SKIP LOCKED
"""

# Each refund's fare_correction row: the correction's journal row found by its tap, and the penalty it gives
# back named by id, or (charged by this same batch, `_Charge.charged_by`) found by the tap that charged it.
_REFUNDS_SQL = """
INSERT INTO fare_correction (txn_id, card_id, corrects_txn_id, amount_fen, reason, fare_ridecode, terminal_id,
                             terminal_seq, staff)
SELECT j.txn_id, v.card_id, coalesce(v.corrects, p.txn_id), v.amount_fen, v.reason, v.ridecode, v.terminal_id,
       v.terminal_seq, ''
FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::boolean[],
            $8::text[], $9::timestamptz[], $10::text[], $11::bigint[], $12::bigint[], $13::text[], $14::text[],
            $15::int[])
     AS v(card_id, at, terminal_id, terminal_seq, corrects, amount_fen, ridecode, reason,
          p_at, p_terminal, p_seq, p_fen, p_station, p_operator, p_nth)
JOIN txn_journal j ON j.card_id = v.card_id AND j.at = v.at AND j.kind = $16 AND j.terminal_id = v.terminal_id
                  AND j.terminal_seq = v.terminal_seq
LEFT JOIN LATERAL (
    SELECT q.txn_id FROM txn_journal q
    WHERE v.corrects IS NULL AND q.card_id = v.card_id AND q.at = v.p_at AND q.kind = $17
      AND q.terminal_id = v.p_terminal AND q.terminal_seq = v.p_seq AND q.amount_fen = -v.p_fen
      AND q.station_id = v.p_station AND q.counterparty = v.p_operator
    ORDER BY q.txn_id OFFSET v.p_nth LIMIT 1
) p ON true
RETURNING terminal_id, terminal_seq, corrects_txn_id
"""

# The stored answer of a tap that gave back a penalty its own batch charged: the penalty's id, known once
# written.
_REFUND_ANSWERS_SQL = """
UPDATE terminal_txn t SET detail = jsonb_set(t.detail, '{refund,corrects_txn_id}', to_jsonb(v.corrects))
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS v(terminal_id, terminal_seq, corrects)
WHERE t.terminal_id = v.terminal_id AND t.terminal_seq = v.terminal_seq
"""


async def _charges(
    conn: asyncpg.Connection, batch: _Batch, uploads: dict[int, tuple[_Card, list[fares.Tap]]]
) -> None:
    """Read the penalties the batch's uploaded metro taps (`uploads`: card id -> the card and its taps) may
    give back (docs/fares.md "Late uploads"): those their cards' states keep (`charged_fen`) for a tap that
    such an upload may complete within the journey timeout, an exit charged `missing_tap_in` for an entry
    before it, an entry charged for its missing exit for an exit after it. Nothing to read, and no round
    trip, for a batch without such a tap and card (almost every batch)."""
    timeout = batch.table.rules.journey_timeout_s
    wanted: dict[tuple[int, str, str, int, int], None] = {}  # charges alike (one tap, one station) once
    for card, taps in uploads.values():
        for u in card.journey.unpaired:
            if not u.charged_fen or u.charged_at is None:
                continue
            other = "in" if u.direction == "out" else "out"
            if any(
                t.direction == other and 0 <= (u.time - t.time if other == "in" else t.time - u.time) < timeout
                for t in taps
            ):
                wanted[(card.card_id, u.station, u.operator, u.charged_at, u.charged_fen)] = None
    if not wanted:
        return
    keys = list(wanted)
    lives = sorted({k[0] for k in keys})
    older: dict[int, list[int]] = {}
    for r in await conn.fetch(_PREDECESSORS_SQL, lives):
        older.setdefault(r["live"], []).append(r["card_id"])
    rows = [(n, c, *k[1:]) for n, k in enumerate(keys) for c in (k[0], *older.get(k[0], ()))]
    for r in await conn.fetch(
        _CHARGES_SQL,
        [x[0] for x in rows],
        [x[1] for x in rows],
        [x[2] for x in rows],
        [x[3] for x in rows],
        [dt.datetime.fromtimestamp(x[4], dt.UTC) for x in rows],
        [x[5] for x in rows],
        KIND_PENALTY,
        lives,
    ):
        key = keys[r["n"]]
        ridecode = r["kind"] == KIND_RIDECODE or r["source"] == SOURCE_RIDECODE
        owner = None if r["card_id"] == key[0] else r["card_id"]
        charge = _Charge(r["txn_id"], r["left_fen"], ridecode, r["line_id"], r["station_id"], card_id=owner)
        batch.charges.setdefault(key, []).append(charge)


def _late_reason(item: TapItem) -> CorrectionReason:
    """Why an upload gave a penalty back: it brought the journey's missing entry, or its missing exit."""
    return CorrectionReason.LATE_ENTRY if item.tap.direction == "in" else CorrectionReason.LATE_EXIT


def _decline(reason: str, balance: int | None = None, **detail: Any) -> TapOutcome:
    return TapOutcome("declined", reason, 0, balance, None, detail)


def _needed(table: fares.FareTable, item: TapItem, card: _Card, decision: fares.Decision) -> int:
    """What the purse must hold for this decision: its total, and for a metro entry that opens a journey
    at least the minimum fare for this card too (what leaving at the same station would cost, with the
    card's concession, before any transfer). A late upload's entry opens no journey and needs nothing
    more: docs/fares.md "Late uploads"."""
    opened = decision.state.journey
    if item.tap.direction != "in" or opened is None or opened.time != item.tap.time:
        return decision.total_fen
    leave = fares.Tap(
        item.tap.time, "metro", item.tap.line, item.tap.station, "out", item.tap.max_fare_fen, uploaded=item.tap.uploaded
    )
    # The exit's own fare only: held exits the decision left due (charge_due=False) are not this ride's.
    cheapest = fares.fare(
        table, dataclasses.replace(decision.state, window=None), leave, card.quota.concession, charge_due=False
    )
    return decision.total_fen + cheapest.total_fen


def _decide(
    batch: _Batch, item: TapItem, card: _Card, tap: fares.Tap, *, charge_due: bool
) -> tuple[fares.Decision, _Charge | None, int, int, bool]:
    """The fare decision for `tap`, the penalty row its refund gives back (None: no refund), how much of
    it is given back (the penalty, or what the card office left of it), what the purse must hold, and
    whether a refund was given up because its penalty row was not found."""
    table = batch.table
    decision = fares.fare(table, card.journey, tap, card.quota.concession, charge_due=charge_due)
    found = None if decision.refund is None else batch.charge_for(card, decision.refund)
    if decision.refund is not None and found is None:
        # The penalty to give back is not to be found on this card or the cards it replaced with something
        # left (given back by the card office, or on a replaced card's purse held elsewhere): the tap costs
        # nothing more and gets nothing back, as before refunds (docs/transit.md "Late halves given back").
        decision = fares.fare(table, card.journey, tap, card.quota.concession, charge_due=charge_due, refund=False)
        unmatched = True
    else:
        unmatched = False
    charge, back = (None, 0) if found is None or decision.refund is None else found
    return decision, charge, back, _needed(table, item, card, decision) - back, unmatched


def _charge(batch: _Batch, item: TapItem, card: _Card) -> TapOutcome:
    table = batch.table
    tap = _priced_tap(card, item, table)
    try:
        decision, charge, back, total_needed, unmatched = _decide(batch, item, card, tap, charge_due=True)
        if decision.due and tap.uploaded and card.balance_fen - total_needed < -item.overdraft_fen:
            # The gate let this rider through already: the ride is charged if the purse can pay it, and
            # the held exits now due stay held (still due) for a later tap or the sweep.
            decision, charge, back, total_needed, unmatched = _decide(batch, item, card, tap, charge_due=False)
    except fares.FareInputError as exc:
        return _decline("fare_input_invalid", card.balance_fen, detail=str(exc)[:200])
    if fares.R_EXIT_AFTER_STOP in decision.rules:  # after the stop, and no journey before it can take it
        return _decline("card_unusable", card_status=card.status)
    total = decision.total_fen - back
    if card.balance_fen - total_needed < -item.overdraft_fen:
        return _decline("insufficient_balance", card.balance_fen, fare_due_fen=total_needed)
    if unmatched:
        metrics.LATE_REFUNDS_UNMATCHED.inc()
    at = dt.datetime.fromtimestamp(item.tap.time, dt.UTC)
    station = item.tap.station
    refund = decision.refund
    if charge is not None and refund is not None and back > 0:
        # The refund: a correction of the penalty (as the card office books one, reason late_entry: the
        # journey's other half came late), crediting the purse from the operator the penalty paid.
        charge.left -= back
        owner = card.card_id if charge.card_id is None else charge.card_id
        batch.journal.append(
            (owner, KIND_CORRECTION, item.terminal_id, item.terminal_seq, back, at, refund.operator,
             charge.line_id, charge.station_id, item.source, None)
        )  # fmt: skip
        if owner != card.card_id:
            # Charged to a card this one replaced: booked there, and carried to this purse through the
            # replacement account, each side naming the other card, as the card office's corrections are.
            for src, other, amt in ((owner, card.card_id, -back), (card.card_id, owner, back)):
                batch.journal.append(
                    (src, KIND_TRANSFER, item.terminal_id, other, amt, at, "replacement", None, None, item.source,
                     None)
                )  # fmt: skip
        by = charge.charged_by
        batch.refunds.append(
            (owner, at, item.terminal_id, item.terminal_seq, charge.txn_id, back, charge.ridecode,
             _late_reason(item).value,
             *((None,) * 7 if by is None else (by[0], by[1], by[2], refund.amount_fen, charge.station_id,
                                              refund.operator, by[3])))
        )  # fmt: skip
    for penalty in (decision.penalty, *decision.due):
        if penalty is None:
            continue
        # Cleared under the broken journey's station and line, which may not be this tap's (a bus).
        where = penalty.station or station
        line = None if where is None else fares.station_line(table, where)
        if where is not None:
            # A later upload of this batch may complete the journey and give the penalty back: its row is
            # named by this tap until written (`_Charge.charged_by`).
            alike = batch.charges.setdefault(
                (card.card_id, where, penalty.operator, item.tap.time, penalty.amount_fen), []
            )
            tap_key = (item.terminal_id, item.terminal_seq)
            nth = sum(1 for c in alike if c.charged_by is not None and c.charged_by[1:3] == tap_key)
            alike.append(
                _Charge(None, penalty.amount_fen, item.source == SOURCE_RIDECODE,
                        item.tap.line if line is None else line, where,
                        (at, item.terminal_id, item.terminal_seq, nth))
            )  # fmt: skip
        batch.journal.append(
            (
                card.card_id,
                KIND_PENALTY,
                item.terminal_id,
                item.terminal_seq,
                -penalty.amount_fen,
                at,
                penalty.operator,
                item.tap.line if line is None else line,
                where,
                item.source,
                None,
            )
        )
    batch.journal.append(
        (
            card.card_id,
            KIND_FARE,
            item.terminal_id,
            item.terminal_seq,
            -decision.amount_fen,
            at,
            decision.operator,
            item.tap.line,
            station,
            item.source,
            # The ride used one of the holder's elderly quota rides, of this quota year (which may be ahead of
            # the posting day's: `_concession`): the card office can give it back to that year's quota
            # (docs/transit.md "Quota rides given back").
            card.quota.quota_year if decision.quota_ride_consumed else None,
        )
    )
    card.balance_fen -= total
    card.journey = decision.state
    card.touched = True
    if decision.quota_ride_consumed:
        quota = card.quota
        quota.concession = dataclasses.replace(
            quota.concession, elderly_rides_remaining=quota.concession.elderly_rides_remaining - 1
        )
        quota.touched = True
    detail: dict[str, Any] = {"rules": list(decision.rules), "operator": decision.operator}
    if decision.transfer_discount_fen:
        detail["transfer_discount_fen"] = decision.transfer_discount_fen
    if decision.penalty is not None:
        detail["penalty"] = {"amount_fen": decision.penalty.amount_fen, "reason": decision.penalty.reason}
    if decision.due:  # held exits of gate uploads whose entry never came, charged now
        detail["held_exits_charged"] = [{"amount_fen": p.amount_fen, "reason": p.reason} for p in decision.due]
    if decision.distance_m is not None:
        detail["distance_m"] = decision.distance_m
    if charge is not None and back > 0:
        # (None for a penalty this batch charged: `_write` fills it in once the row is written.)
        detail["refund"] = {"amount_fen": back, "reason": _late_reason(item).value, "corrects_txn_id": charge.txn_id}
    return TapOutcome("approved", None, decision.total_fen, card.balance_fen, None, detail)


async def _attempt(
    conn: asyncpg.Connection, table: fares.FareTable, items: Sequence[TapItem]
) -> tuple[list[TapOutcome], int]:
    """The outcomes of a batch, written in the caller's transaction, and that transaction's id.

    The batch is judged at its transaction's time (`now()`): the time its journal rows are posted at
    (`posted_at`), so that a fare's quota year, a card's expiry and a temporary loss's end agree with the
    posting day that clearing and the card office read back, even for a batch that waited into a new
    day (or year) for its connection."""
    with_nonce = [i for i in items if i.nonce is not None]
    nonce_row, *answered = await conn.fetch(
        _EXISTING_SQL,
        [i.terminal_id for i in items],
        [i.terminal_seq for i in items],
        [i.terminal_id for i in with_nonce],
        [i.nonce for i in with_nonce],
    )
    now: dt.datetime = nonce_row["tx_now"]
    batch = _Batch(table, now)
    fresh = set(zip(nonce_row["fresh_terminals"], nonce_row["fresh_nonces"], strict=True))
    existing = {(r["terminal_id"], r["terminal_seq"]): r for r in answered}
    # Only the taps still to decide lock their purses: one answered before (a retry) or with a used nonce is
    # answered without its card, so a purse another transaction holds does not keep its stored answer waiting.
    deciding = [
        i
        for i in items
        if (i.terminal_id, i.terminal_seq) not in existing and (i.nonce is None or (i.terminal_id, i.nonce) in fresh)
    ]
    sns = list({i.card_sn for i in deciding if i.card_sn is not None})
    ids = list({i.card_id for i in deciding if i.card_id is not None})
    cred_items = [i for i in deciding if i.cred_kind is not None and i.cred_token is not None]
    rows = await conn.fetch(
        _LOCK_SQL, sns, ids, [i.cred_kind for i in cred_items], [i.cred_token for i in cred_items]
    )
    used: set[tuple[int, int, int]] = {
        (r["card_id"], int(kind), token)
        for r in rows
        for kind, token in zip(r["used_kinds"], r["used_tokens"], strict=True)
    }
    today = fares.local_day(table, int(now.timestamp()))
    year = today.year
    holders = sorted({r["holder_id"] for r in rows})
    ecard_ids = sorted(
        {i.cred_token >> 32 for i in deciding if i.cred_kind == KIND_ECARD_CODE and i.cred_token is not None}
    )
    current: dict[int, asyncpg.Record] = {}
    revoked: set[int] = set()
    ecard_cards: dict[int, int] = {}
    if holders or ecard_ids:
        for q in await conn.fetch(_AFTER_LOCK_SQL, holders, ecard_ids):
            if q["ecard_id"] is None:
                current[q["holder_id"]] = q
            elif q["ecard_revoked"]:
                revoked.add(q["ecard_id"])
            else:
                ecard_cards[q["ecard_id"]] = q["ecard_card"]
    moved = {
        eid: ecard_cards[eid]
        for i in deciding
        if i.cred_kind == KIND_ECARD_CODE
        and i.cred_token is not None
        and (eid := i.cred_token >> 32) in ecard_cards
        and ecard_cards[eid] != i.card_id
    }
    if moved:  # rare: a replacement committed between the handler's read and these locks
        raise _Retry(moved)
    cards_by_id: dict[int, _Card] = {}
    by_sn: dict[str, _Card] = {}
    lost: list[_Card] = []
    quotas: dict[int, _Quota] = {}
    for r in rows:
        quota = quotas.get(r["holder_id"])
        if quota is None:
            q = current.get(r["holder_id"])
            concession, quota_year = _concession(q, table, year)
            quota = quotas[r["holder_id"]] = _Quota(
                r["holder_id"],
                concession,
                quota_year,
                q["rides_left"] if q is not None else None,
                q["quota_year"] if q is not None else None,
            )
        status = effective_status(r["status"], r["temp_loss_until"], now)
        active = status == CardStatus.ACTIVE and not r["app_locked"]
        usable = active and r["expires_on"] >= today
        locked = _Card(
            r["card_id"],
            r["card_sn"],
            r["holder_id"],
            r["card_tid"],
            r["card_version"],
            usable,
            status.api_name,
            r["has_purse"],
            r["balance_fen"],
            fares.JourneyState.from_dict(r["journey"]) if r["journey"] else fares.EMPTY_STATE,
            quota,
            r["status_changed_at"].timestamp() if status == CardStatus.TEMP_LOST and not r["app_locked"] else None,
            r["expires_on"],
            active=active,
        )
        cards_by_id[locked.card_id] = locked
        by_sn[locked.card_sn] = locked
        if status in (CardStatus.LOST, CardStatus.TEMP_LOST) and not r["app_locked"]:
            lost.append(locked)
    if lost:  # rare: a lost card in the batch
        await _loss_stops(conn, lost, deciding)
    uploads: dict[int, tuple[_Card, list[fares.Tap]]] = {}  # uploaded metro taps, for the penalties they may give back
    for item in deciding:
        t = item.tap
        if t.uploaded and t.mode == "metro" and item.declined is None:
            c = by_sn.get(item.card_sn) if item.card_sn else cards_by_id.get(item.card_id or 0)
            if c is not None and any(u.charged_fen for u in c.journey.unpaired):
                uploads.setdefault(c.card_id, (c, []))[1].append(t)
    if uploads:
        await _charges(conn, batch, uploads)
    await _deny_lists(conn, list(cards_by_id.values()), deciding)
    # Cards not locked above have no purse row, or do not exist: tell the two apart (rare, unlocked).
    no_purse: dict[str | int, int] = {}
    missing_sns = [sn for sn in sns if sn not in by_sn]
    missing_ids = [i for i in ids if i not in cards_by_id]
    if missing_sns or missing_ids:
        for r in await conn.fetch(_NO_PURSE_SQL, missing_sns, missing_ids):
            no_purse[r["card_sn"]] = no_purse[r["card_id"]] = r["card_id"]

    seen_keys: dict[tuple[str, int], int] = {}  # key -> index of its first item in this batch
    outcomes: list[TapOutcome] = []
    for item in items:
        if item.nonce is not None:
            if (item.terminal_id, item.nonce) not in fresh:  # used before, or earlier in this batch
                outcomes.append(_REPLAYED)
                continue
            fresh.discard((item.terminal_id, item.nonce))
        key = (item.terminal_id, item.terminal_seq)
        if key in existing:
            outcomes.append(_stored(existing[key], item))
            continue
        if key in seen_keys:  # the same key twice in one batch: the second is a retry of the first
            idx = seen_keys[key]
            prior = outcomes[idx]
            same = items[idx].request_hash == item.request_hash
            outcomes.append(
                dataclasses.replace(prior, replayed_answer=True)
                if same
                else _CONFLICT
            )
            continue
        seen_keys[key] = len(outcomes)
        card = by_sn.get(item.card_sn) if item.card_sn else cards_by_id.get(item.card_id or 0)
        card_id = card.card_id if card is not None else None
        if item.declined is not None:
            outcomes.append(batch.answer(item, card_id, _decline(item.declined)))
            continue
        if card is None:
            known = no_purse.get(item.card_sn if item.card_sn else item.card_id or 0)
            reason = "unknown_card" if known is None else "no_transit_purse"
            outcomes.append(batch.answer(item, known, _decline(reason)))
            continue
        if item.cred_kind is not None and item.cred_token is not None:
            cred = (card.card_id, item.cred_kind, item.cred_token)
            if cred in used:
                outcomes.append(batch.answer(item, card_id, _decline("credential_replayed")))
                continue
            used.add(cred)
            batch.creds.append(cred)
        if item.cred_kind == KIND_ECARD_CODE and item.cred_token is not None and item.cred_token >> 32 in revoked:
            outcomes.append(batch.answer(item, card_id, _decline("card_unusable", card_status="revoked")))
            continue
        if item.resolved_unreplaced and card.status == _REPLACED:
            raise ReplacedMeanwhile()
        if not _usable_for(card, item, table):
            outcomes.append(batch.answer(item, card_id, _decline("card_unusable", card_status=card.status)))
            continue
        if not card.has_purse:
            outcomes.append(batch.answer(item, card_id, _decline("no_transit_purse")))
            continue
        outcomes.append(batch.answer(item, card_id, _charge(batch, item, card)))

    await _write(conn, batch, cards_by_id, [q for q in quotas.values() if q.touched], outcomes, items)
    return outcomes, int(nonce_row["xid"])


async def _write(
    conn: asyncpg.Connection,
    batch: _Batch,
    cards: dict[int, _Card],
    quotas: list[_Quota],
    outcomes: list[TapOutcome],
    items: Sequence[TapItem],
) -> None:
    touched = [c for c in cards.values() if c.touched]
    creds = batch.creds
    a = batch.answers
    if not a:
        return
    row = await conn.fetchrow(
        _WRITE_SQL,
        *columns(creds, 3),
        [c.card_id for c in touched],
        [c.balance_fen for c in touched],
        [c.journey.to_dict() for c in touched],
        [c.tid for c in cards.values()],
        list(cards),
        [c.version for c in cards.values()],
        *columns(
            [(q.holder_id, q.concession.elderly_rides_remaining, q.quota_year, q.read_rides_left, q.read_quota_year)
             for q in sorted(quotas, key=lambda q: q.holder_id)],
            5,
        ),
        *columns(batch.journal, 11),
        *columns(a, 8),
    )
    assert row is not None
    if row["cu"] != len(creds) or row["cv"] != len(cards) or row["ku"] != len(quotas) or row["tt"] != len(a):
        raise _Retry()  # a concurrent writer took a key, changed a card or a quota: roll back and look again
    # An upload that leaves a journey or a held exit already due, or nearly, may come after the sweep read
    # the journal of its time: the sweep is told about the card directly (it looks at these first).
    behind = int(batch.now.timestamp()) + limits.SWEEP_BEHIND_MARGIN_S
    late = [c.card_id for c in touched if (due := fares.first_due(batch.table, c.journey)) is not None and due <= behind]
    if late:
        await conn.execute(_SWEEP_NOW_SQL, late)
    corrected: dict[tuple[str, int], int] = {}  # taps that gave back a penalty of this batch -> its id
    if batch.refunds:  # late entries' refunds: each correction's row, linked to the penalty it gives back
        written = await conn.fetch(_REFUNDS_SQL, *columns(batch.refunds, 15), KIND_CORRECTION, KIND_PENALTY)
        if len(written) != len(batch.refunds):
            raise AssertionError(f"refund rows: {len(written)}, {len(batch.refunds)} expected")
        mine = {(r[2], r[3]) for r in batch.refunds if r[4] is None}
        corrected = {
            (w["terminal_id"], w["terminal_seq"]): w["corrects_txn_id"]
            for w in written
            if (w["terminal_id"], w["terminal_seq"]) in mine
        }
        if corrected:
            keys = list(corrected)
            await conn.execute(
                _REFUND_ANSWERS_SQL, [k[0] for k in keys], [k[1] for k in keys], [corrected[k] for k in keys]
            )
    txn_ids = {
        (t, s): x for t, s, x in zip(row["t_ids"], row["t_seqs"], row["t_txns"], strict=True) if x is not None
    }
    for n, (item, outcome) in enumerate(zip(items, outcomes, strict=True)):
        if outcome.result == "approved" and outcome.txn_id is None:
            key = (item.terminal_id, item.terminal_seq)
            detail = outcome.detail
            if key in corrected:
                detail = {**detail, "refund": {**detail["refund"], "corrects_txn_id": corrected[key]}}
            outcomes[n] = dataclasses.replace(outcome, txn_id=txn_ids.get(key), detail=detail)


# The answer to a tap whose card's purse another transaction held past lock_timeout, when the rest of its
# batch went ahead without it (process_taps(isolate_held=True)): nothing of it was written.
HELD = TapOutcome("held", "purse_held", 0, None, None, {})

# The batch's purses that another transaction holds: those the probe cannot lock at once. Its own locks go
# when its transaction is rolled back, right after.
_HELD_SQL = """
WITH c AS (SELECT card_id, card_sn FROM card WHERE card_sn = ANY($1::text[]) OR card_id = ANY($2::bigint[])),
     f AS (SELECT card_id FROM purse WHERE card_id IN (SELECT card_id FROM c) FOR UPDATE SKIP LOCKED)
SELECT c.card_id, c.card_sn FROM c JOIN purse p ON p.card_id = c.card_id
WHERE c.card_id NOT IN (SELECT card_id FROM f)
"""


HELD_PROBE_GAP_S = 0.05  # a purse locked by another tap batch is free again within milliseconds


async def _held(conn: asyncpg.Connection, items: Sequence[TapItem]) -> list[bool]:
    """For each item: whether its card's purse is held by another transaction: locked at two probes
    HELD_PROBE_GAP_S apart (a purse that a concurrent batch locks for a moment is not held)."""
    sns = list({i.card_sn for i in items if i.card_sn is not None})
    ids = list({i.card_id for i in items if i.card_id is not None})
    for probe in range(2):
        if probe:
            if not (sns or ids):
                break  # nothing locked at the first probe
            await asyncio.sleep(HELD_PROBE_GAP_S)
        tx = conn.transaction()
        await tx.start()
        try:
            rows = await conn.fetch(_HELD_SQL, sns, ids)
        finally:
            await tx.rollback()
        sns, ids = [r["card_sn"] for r in rows], [r["card_id"] for r in rows]
    held_sns, held_ids = set(sns), set(ids)
    return [i.card_sn in held_sns or i.card_id in held_ids for i in items]


async def process_taps(
    pool: asyncpg.Pool, table: fares.FareTable, items: Sequence[TapItem], *, isolate_held: bool = False
) -> list[TapOutcome]:
    """Decide and commit a batch of taps; one outcome per item, in order.

    A purse that another transaction holds past lock_timeout fails the batch (asyncpg.LockNotAvailableError,
    all rolled back). With `isolate_held` (the online batcher), the taps of the purses held at that moment
    are answered HELD and the rest of the batch is decided again without them: one held card does not fail
    the others. (If the rest meets a held purse too, the batch fails as before.) A tap answered before (a
    resend) is never HELD: its answer is stored, and it goes with the rest."""
    async with pool.acquire() as conn:
        try:
            return await _process(pool, conn, table, items)
        except asyncpg.LockNotAvailableError:
            if not isolate_held or len(items) < 2:
                raise
            held = await _held(conn, items)
            answered = await _answered(conn, items)
            held = [h and (i.terminal_id, i.terminal_seq) not in answered for i, h in zip(items, held, strict=True)]
            if not any(held) or all(held):
                raise
            rest = [i for i, h in zip(items, held, strict=True) if not h]
            decided = iter(await _process(pool, conn, table, rest))
            return [HELD if h else next(decided) for h in held]


async def _answered(conn: asyncpg.Connection, items: Sequence[TapItem]) -> set[tuple[str, int]]:
    """The keys of `items` that terminal_txn holds an answer for (the batch's own read, recording no nonce)."""
    _, *rows = await conn.fetch(_EXISTING_SQL, [i.terminal_id for i in items], [i.terminal_seq for i in items], [], [])
    return {(r["terminal_id"], r["terminal_seq"]) for r in rows}


# A COMMIT whose answer did not come: the client's command timeout (a commit waiting for a synchronous
# standby, a stalled fsync) or a lost connection. It may have committed all the same. asyncpg reports a
# connection lost under it as ConnectionDoesNotExistError (a PostgresConnectionError, class 08), and a
# session the server ended (pg_terminate_backend, a fast shutdown, a crash: class 57, operator
# intervention) as one of those: a COMMIT waiting for a standby when its session is ended has committed
# locally.
_COMMIT_UNANSWERED: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)
COMMIT_CHECKS = 5
COMMIT_CHECK_GAP_S = 0.2


async def _committed(pool: asyncpg.Pool, xid: int) -> bool:
    """Whether the transaction `xid`, whose COMMIT was not answered, committed (asked on another connection).
    Still unknown after COMMIT_CHECKS tries: 503 `db_unavailable`, which an online tap's answer may not
    take as "not charged" (docs/api.md "Retries": the same terminal_seq is sent again)."""
    for attempt in range(COMMIT_CHECKS):
        if attempt:
            await asyncio.sleep(COMMIT_CHECK_GAP_S)
        try:
            async with pool.acquire(timeout=COMMIT_CHECK_GAP_S * COMMIT_CHECKS) as conn:
                status = await conn.fetchval("SELECT txid_status($1)", xid)
        except (*_COMMIT_UNANSWERED, asyncpg.PostgresError):
            continue
        if status in ("committed", "aborted"):
            return bool(status == "committed")
    raise ApiError(
        "db_unavailable", "the batch's commit was not confirmed: send the tap again with the same terminal_seq",
        headers=RETRY_LATER,
    )


def _moved_to(item: TapItem, moved: dict[int, int]) -> TapItem:
    """The item on the card its e-card is on now, if a replacement moved it (`_Retry.moved`)."""
    if item.cred_kind != KIND_ECARD_CODE or item.cred_token is None or item.cred_token >> 32 not in moved:
        return item
    return dataclasses.replace(item, card_id=moved[item.cred_token >> 32])


async def _process(
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    table: fares.FareTable,
    items: Sequence[TapItem],
) -> list[TapOutcome]:
    for attempt in range(BATCH_ATTEMPTS_MAX):
        decided: tuple[list[TapOutcome], int] | None = None
        try:
            async with conn.transaction():
                decided = await _attempt(conn, table, items)
            return decided[0]
        except _COMMIT_UNANSWERED:
            if decided is None:  # before the COMMIT: rolled back, nothing written
                raise
            outcomes, xid = decided
            if await _committed(pool, xid):  # charged: the answers go out as decided
                return outcomes
            raise
        except _Retry as exc:
            if attempt == BATCH_ATTEMPTS_MAX - 1:
                # Rolled back every time: nothing was written, the taps may be sent again (503).
                raise ApiError("timeout", "the batch kept meeting concurrent changes", headers=RETRY_LATER) from exc
            if exc.moved:
                items = [_moved_to(i, exc.moved) for i in items]
        except asyncpg.DeadlockDetectedError:
            if attempt == BATCH_ATTEMPTS_MAX - 1:
                raise
    raise AssertionError("unreachable")


def request_hash(body: dict[str, Any]) -> bytes:
    import hashlib

    return hashlib.new("sm3", orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()
