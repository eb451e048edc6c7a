"""Offline purse records uploaded by validators: TAC check, verdict and posting (docs/transit.md).

A validator debits the card's purse offline; the card signs each debit with its TAC. The validator
uploads its records in batches (protocols/transit.py `OfflineBatch`). One upload is one transaction:

1. the purses of every card in the batch, locked `FOR UPDATE` in card order (the online tap engine locks
   in the same order, so the two never deadlock);
2. the answers already given for the batch's (terminal, terminal_seq) keys (idempotency: a re-upload is
   answered from them: terminal_txn, the cards' ledgers and the refused records), the records already
   posted for the same (card, unwrapped purse_seq), and the cards' hotlist entries;
3. in Python, record by record in batch order: `protocols.transit.judge_record` on the locked state,
   updated in memory (so two records of one card in one batch see each other);
4. one statement writes everything: purse balances and sequences, journal transfers, the per-record
   ledger (`offline_record`), the records refused outside any card's ledger (`offline_refusal`) and the
   per-key answers (`terminal_txn`).

Money: a posted record debits the purse by its amount even below zero (the chip already paid; the
shadow balance follows it so that balance == sum(journal) always holds). A record whose verdict clears
pays the operator of its line; a hotlisted one is posted against `hotlisted:<operator>` (the card paid,
the operator that should have refused it is not paid). A replaced card's records are judged on its own
chip's ledger and each posted debit is carried to the card that replaced it, where its purse went
(docs/transit.md "A replaced card's records").
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import functools
import hashlib
import math
from typing import Any

import asyncpg
import orjson

from cardsvc import limits
from cardsvc.errors import RETRY_LATER, ApiError
from cardsvc.flows import hotlist as hotlist_flow
from cardsvc.store.batcher import columns
from protocols import card, transit
from protocols.card import CardStatus
from protocols.hotlist import HotlistEntry
from protocols.transit import OfflineBatch, OfflineRecord, RecordResult

from . import fares
from .taps import KIND_OFFLINE, KIND_TRANSFER, SOURCE_OFFLINE

__all__ = [
    "HOTLISTED_PREFIX",
    "RECORD_AGE_S_MAX",
    "RecordAnswer",
    "TacChecker",
    "process_batch",
    "record_operator",
    "tac_checker",
]

# A record older than this (validator clock vs server clock) is refused as malformed: the journal is
# partitioned by month of the transaction time and only recent months are guaranteed to exist. It is
# kept in offline_record (offline_refusal for a card that is not ours) for manual handling.
RECORD_AGE_S_MAX = limits.UPLOAD_AGE_S_MAX
HOTLISTED_PREFIX = "hotlisted:"
BATCH_ATTEMPTS_MAX = 3

# Stable reason codes, one per verdict (plus the malformed details).
REASONS: dict[RecordResult, str | None] = {
    RecordResult.ACCEPTED: None,
    RecordResult.DUPLICATE: "already_posted",
    RecordResult.CONFLICT: "purse_seq_posted_differently",
    RecordResult.BAD_TAC: "tac_mismatch",
    RecordResult.CARD_UNKNOWN: "card_not_known",
    RecordResult.HOTLISTED: "blocked_at_validator_hotlist_version",
    RecordResult.SEQUENCE_GAP: "purse_seq_gap",
    RecordResult.BALANCE_MISMATCH: "balance_before_differs",
}
REASON_LATE_FILL = "fills_earlier_gap"
REASON_TERMINAL_SEQ_REUSED = "terminal_seq_reused"


class _Retry(Exception):
    pass


class TacChecker:
    """Verifies TACs with the card-diversified TAC key (derived on demand, never stored; only the
    city-level SM4 contexts are cached). One instance per event loop (not thread-safe)."""

    def __init__(self, tac_master: bytes) -> None:
        self._deriver = card.CardKeyDeriver(tac_master, card.KEY_PURPOSE_TAC)

    def verify(self, record: OfflineRecord) -> bool:
        return transit.verify_tac(self._deriver.card_key(record.card_sn), record)


@functools.lru_cache(maxsize=4)
def tac_checker(tac_master: bytes) -> TacChecker:
    return TacChecker(tac_master)


@dataclasses.dataclass(frozen=True, slots=True)
class RecordAnswer:
    terminal_seq: int
    result: str  # protocols.transit.RecordResult value
    reason: str | None
    replayed_answer: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "terminal_seq": self.terminal_seq,
            "result": self.result,
            "reason": self.reason,
            "replayed_answer": self.replayed_answer,
        }


def record_operator(table: fares.FareTable, r: OfflineRecord) -> tuple[str | None, str | None]:
    """The operator credited with a record (its station's, else its line's) or a malformed reason. A record
    made at a station closed since (`metro.retired`) is credited to its `priced_as` station's operator. The
    line must be one of the table's, and serve the station (checked as for an online tap: not for a retired
    station); the journal and the operator's clearing file name both."""
    if r.station_id:
        station = table.retired.get(r.station_id, r.station_id)
        op = table.station_operator.get(station)
        if op is None:
            return None, "unknown_station"
        if station == r.station_id and r.line_id not in table.place_lines[table.station_place[station]]:
            return None, "unknown_line"
        return op, None
    bus = table.bus_lines.get(r.line_id)
    if bus is not None:
        return bus.operator, None
    metro = table.metro_lines.get(r.line_id)
    if metro is not None:
        return metro.operator, None
    return None, "unknown_line"


def _digest(record_json: dict[str, Any]) -> bytes:
    return hashlib.new("sm3", orjson.dumps(record_json, option=orjson.OPT_SORT_KEYS)).digest()


@dataclasses.dataclass
class _Purse:
    card_id: int
    balance_fen: int
    last_ext: int  # highest unwrapped purse_seq posted
    base_ext: int  # last_ext when locked: every record of the batch is unwrapped against it
    entries: list[HotlistEntry]
    touched: bool = False
    # A replaced card: its purse moved to `settle_to`'s, and the chip never knew. `moved_fen` is what the
    # chip still holds beyond this (emptied) purse: the move, less the debits carried over since.
    settle_to: _Purse | None = None
    moved_fen: int = 0

    @property
    def chip_balance_fen(self) -> int:
        """The balance the card's own chip shows, as far as the back office knows."""
        return self.balance_fen + self.moved_fen


class _NeedCards(Exception):
    """Cards the batch must lock too (the replacing cards of replaced cards in the batch): run again."""

    def __init__(self, card_ids: set[int]) -> None:
        self.card_ids = card_ids


# The batch's cards and, from the second attempt on, the cards that replaced some of them ($2), purses
# locked in card order. The card row is the statement's snapshot: the write checks that its status and
# replacement are still those (a replacement commits holding the purse lock this statement waited for).
_LOCK_SQL = """
SELECT c.card_id, c.card_sn, c.status, c.replaced_by, p.balance_fen, p.purse_seq
FROM card c JOIN purse p ON p.card_id = c.card_id
WHERE (c.card_sn = ANY($1::text[]) OR c.card_id = ANY($2::bigint[])) AND c.has_purse
ORDER BY c.card_id
FOR UPDATE OF p
"""

# What each replaced card's purse moved to the card that replaced it, net of the debits carried there since.
_MOVED_SQL = """
SELECT j.card_id, coalesce(-sum(j.amount_fen), 0)::bigint AS moved_fen
FROM unnest($1::bigint[], $2::bigint[]) AS v(card_id, replaced_by)
JOIN txn_journal j ON j.card_id = v.card_id AND j.counterparty = 'replacement' AND j.terminal_seq = v.replaced_by
GROUP BY j.card_id
"""

_ANSWERED_SQL = """
SELECT terminal_seq, request_hash, result, detail FROM terminal_txn
WHERE terminal_id = $1 AND terminal_seq = ANY($2::bigint[])
"""

_LEDGER_SQL = """
SELECT card_id, terminal_seq, result, reason, record FROM offline_record
WHERE card_id = ANY($1::bigint[]) AND terminal_id = $2 AND terminal_seq = ANY($3::bigint[])
"""

_REFUSED_SQL = """
SELECT terminal_seq, request_hash, result, reason FROM offline_refusal
WHERE terminal_id = $1 AND terminal_seq = ANY($2::bigint[])
"""

_POSTED_SQL = """
SELECT o.card_id, o.purse_seq, o.record
FROM unnest($1::bigint[], $2::bigint[]) AS k(card_id, purse_seq)
JOIN offline_record o ON o.card_id = k.card_id AND o.purse_seq = k.purse_seq AND o.posted
"""

_WRITE_SQL = """
WITH pu AS (
    UPDATE purse p SET balance_fen = v.balance_fen, purse_seq = v.purse_seq, updated_at = now()
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS v(card_id, balance_fen, purse_seq)
    WHERE p.card_id = v.card_id AND p.card_id = ANY($1::bigint[])
    RETURNING 1
), j AS (
    INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty,
                             line_id, station_id, source)
    SELECT v.card_id, $4::smallint, $5::text, v.terminal_seq, v.amount_fen, 1, v.at, v.counterparty, v.line_id,
           v.station_id, $6::smallint
    FROM unnest($7::bigint[], $8::bigint[], $9::bigint[], $10::timestamptz[], $11::text[], $12::text[],
                $13::text[]) AS v(card_id, terminal_seq, amount_fen, at, counterparty, line_id, station_id)
    RETURNING txn_id, terminal_seq
), o AS (
    INSERT INTO offline_record (card_id, terminal_id, terminal_seq, purse_seq, result, reason, posted, record,
                                txn_id, batch_id)
    SELECT v.card_id, $5::text, v.terminal_seq, v.purse_seq, v.result, v.reason, v.posted, v.record, j.txn_id,
           $14::bigint
    FROM unnest($15::bigint[], $16::bigint[], $17::bigint[], $18::text[], $19::text[], $20::bool[],
                $21::jsonb[]) AS v(card_id, terminal_seq, purse_seq, result, reason, posted, record)
    LEFT JOIN j ON j.terminal_seq = v.terminal_seq
    ON CONFLICT DO NOTHING
    RETURNING posted
), tt AS (
    INSERT INTO terminal_txn (terminal_id, terminal_seq, request_hash, card_id, result, amount_fen, balance_fen,
                              txn_id, detail)
    SELECT $5::text, v.terminal_seq, v.request_hash, v.card_id, v.result, v.amount_fen, v.balance_fen, j.txn_id,
           v.detail
    FROM unnest($22::bigint[], $23::bytea[], $24::bigint[], $25::text[], $26::bigint[], $27::bigint[],
                $28::jsonb[]) AS v(terminal_seq, request_hash, card_id, result, amount_fen, balance_fen, detail)
    LEFT JOIN j ON j.terminal_seq = v.terminal_seq
    ON CONFLICT DO NOTHING
    RETURNING 1
), tr AS (
    INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty, source)
    SELECT v.card_id, $35::smallint, $5::text, v.other, v.amount_fen, 1, now(), 'replacement', $6::smallint
    FROM unnest($36::bigint[], $37::bigint[], $38::bigint[]) AS v(card_id, other, amount_fen)
    RETURNING 1
), cv AS (  -- the batch's cards still as read (a replacement committed during the lock wait: run again)
    SELECT count(*) AS n FROM card c
    JOIN unnest($39::bigint[], $40::smallint[], $41::bigint[]) AS v(card_id, status, replaced_by)
      ON c.card_id = v.card_id AND c.status = v.status AND c.replaced_by IS NOT DISTINCT FROM v.replaced_by
), rf AS (
    INSERT INTO offline_refusal (terminal_id, terminal_seq, request_hash, card_id, result, reason, record, batch_id)
    SELECT $5::text, v.terminal_seq, v.request_hash, v.card_id, v.result, v.reason, v.record, $14::bigint
    FROM unnest($29::bigint[], $30::bytea[], $31::bigint[], $32::text[], $33::text[], $34::jsonb[])
         AS v(terminal_seq, request_hash, card_id, result, reason, record)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM tt) AS tt, (SELECT count(*) FROM o WHERE posted) AS posted,
       (SELECT count(*) FROM rf) AS refused, (SELECT n FROM cv) AS cv
"""


class _Plan:
    """What one attempt decided: the answers and the rows to write."""

    def __init__(self) -> None:
        self.answers: list[RecordAnswer] = []
        # (card_id, terminal_seq, amount_fen (signed), at, counterparty, line_id, station_id)
        self.journal: list[tuple[int, int, int, dt.datetime, str, str, str | None]] = []
        # (card_id, terminal_seq, purse_seq, result, reason, posted, record)
        self.ledger: list[tuple[int, int, int, str, str | None, bool, dict[str, Any]]] = []
        # (terminal_seq, request_hash, card_id, result, amount_fen, balance_fen, detail)
        self.keys: list[tuple[int, bytes, int | None, str, int, int | None, dict[str, Any]]] = []
        # (terminal_seq, request_hash, card_id, result, reason, record): refused outside any card's ledger
        self.refused: list[tuple[int, bytes, int | None, str, str | None, dict[str, Any]]] = []
        # (card_id, the other card, amount_fen): a replaced card's debit carried to its replacing card
        self.transfers: list[tuple[int, int, int]] = []


def _judge(
    r: OfflineRecord,
    purse: _Purse | None,
    posted: dict[tuple[int, int], OfflineRecord],
    tac: TacChecker,
    table: fares.FareTable,
    now_s: int,
    skew_s: int,
    served: Served | None = None,
) -> tuple[RecordResult, str | None, int | None, str | None]:
    """(verdict, reason, unwrapped purse_seq or None, operator or None) in RESULT_PRECEDENCE order.
    `served`: the hotlist versions served to the record's terminal, if known."""
    operator, bad_place = record_operator(table, r)
    ext = transit.extend_purse_seq(purse.base_ext, r.purse_seq) if purse is not None else None
    if r.txn_time > now_s + skew_s:
        return RecordResult.MALFORMED, "txn_time_in_future", ext, operator
    if r.txn_time < now_s - RECORD_AGE_S_MAX:
        return RecordResult.MALFORMED, "txn_time_too_old", ext, operator
    if bad_place is not None:
        return RecordResult.MALFORMED, bad_place, ext, operator
    if purse is None or ext is None:
        return RecordResult.CARD_UNKNOWN, REASONS[RecordResult.CARD_UNKNOWN], None, operator
    if ext < 1:  # the first debit of a card uses purse_seq 1
        return RecordResult.MALFORMED, "purse_seq_before_issuance", ext, operator
    verdict = transit.judge_record(
        r,
        card_known=True,
        tac_ok=tac.verify(r),
        posted=posted.get((purse.card_id, ext)),
        blocked_at_validator_version=transit.blocked_at_version(purse.entries, r.card_sn, _held_version(r, served)),
        last_purse_seq=purse.last_ext,
        shadow_balance_fen=purse.chip_balance_fen,
    )
    reason = REASONS.get(verdict)
    if verdict == RecordResult.ACCEPTED and transit.purse_seq_delta(purse.last_ext, r.purse_seq) <= 0:
        reason = REASON_LATE_FILL
    return verdict, reason, ext, operator


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
    """Hotlist versions served to one terminal (migrations 0010, 0012): `times` (unix seconds, ascending)
    and `floors`, the highest version served at or before each of them."""

    times: tuple[int, ...]
    floors: tuple[int, ...]

    @classmethod
    def of(cls, serves: list[tuple[int, int]]) -> Served:
        """From (unix time, version) pairs in any order."""
        times, floors, high = [], [], 0
        for at, version in sorted(serves):
            high = max(high, version)
            times.append(at)
            floors.append(high)
        return cls(tuple(times), tuple(floors))

    def at(self, t: int) -> int:
        """The highest version known served at or before `t` (0: none)."""
        i = bisect.bisect_right(self.times, t)
        return self.floors[i - 1] if i else 0


def _held_version(r: OfflineRecord, served: Served | None) -> int:
    """The hotlist version the record is judged as of: the one it claims, but at least the highest one the
    service is known to have served its terminal before the record's time (by the validator's clock): the
    claim is not covered by the TAC, and a terminal never holds less than it was served (migrations 0010
    and 0012: its last serve, and the first and last of each hour over the upload window)."""
    return max(r.hotlist_version, served.at(r.txn_time)) if served is not None else r.hotlist_version


# The terminal's last serve; the first and last of each hour from the one holding $2 (the oldest record an
# upload accepts); and its newest hour before that, the version a record early in the window was made under.
_SERVED_SQL = """
SELECT version, served_at FROM terminal_hotlist WHERE terminal_id = $1
UNION ALL
SELECT v.version, v.served_at FROM terminal_hotlist_serve s,
       LATERAL (VALUES (s.first_version, s.first_at), (s.last_version, s.last_at)) AS v(version, served_at)
WHERE s.terminal_id = $1 AND s.hour >= date_trunc('hour', $2::timestamptz)
UNION ALL
(SELECT last_version, last_at FROM terminal_hotlist_serve
 WHERE terminal_id = $1 AND hour < date_trunc('hour', $2::timestamptz)
 ORDER BY hour DESC LIMIT 1)
"""


async def served_to(conn: asyncpg.Connection, terminal_id: str, oldest: dt.datetime) -> Served:
    """The hotlist versions known served to a terminal, for its records (or rides) made since `oldest`.
    A serve counts from the first whole second after it: records carry whole seconds, and one stamped in
    the second of a serve may have been made before it (the validator could not refuse the card yet)."""
    rows = await conn.fetch(_SERVED_SQL, terminal_id, oldest)
    return Served.of([(math.ceil(row["served_at"].timestamp()), row["version"]) for row in rows])


async def _attempt(
    conn: asyncpg.Connection,
    table: fares.FareTable,
    tac: TacChecker,
    batch: OfflineBatch,
    now: dt.datetime,
    skew_s: int,
    extra_cards: set[int],
) -> list[RecordAnswer]:
    records = batch.records
    tid = batch.terminal_id
    wanted_sns = {r.card_sn for r in records}
    rows = await conn.fetch(_LOCK_SQL, list(wanted_sns), sorted(extra_cards))
    purses: dict[str, _Purse] = {
        row["card_sn"]: _Purse(row["card_id"], row["balance_fen"], row["purse_seq"], row["purse_seq"], [])
        for row in rows
    }
    by_id = {p.card_id: p for p in purses.values()}
    cards = [(row["card_id"], row["status"], row["replaced_by"]) for row in rows]
    # A replaced card's debits made before the validator knew of the replacement are real (its chip paid),
    # but its purse moved to the new card: each is posted on the old card's purse, as the chip's ledger
    # wants, and carried to the new card's by a transfer through the replacement account (docs/transit.md).
    replaced = {
        row["card_id"]: row["replaced_by"]
        for row in rows
        if row["status"] == CardStatus.REPLACED and row["replaced_by"] is not None and row["card_sn"] in wanted_sns
    }
    missing = set(replaced.values()) - by_id.keys()
    if missing - extra_cards:
        raise _NeedCards(missing)
    replaced = {old: new for old, new in replaced.items() if new in by_id}  # else no purse: stays on the old
    if replaced:
        for row in await conn.fetch(_MOVED_SQL, list(replaced), list(replaced.values())):
            by_id[row["card_id"]].moved_fen = row["moved_fen"]
        for old, new in replaced.items():
            by_id[old].settle_to = by_id[new]
    # Read after the locks: a concurrent upload of the same records has committed by now.
    seqs = [r.terminal_seq for r in records]
    # (request hash, result, reason) of what each key already answered: terminal_txn (kept for a retention
    # period), and, never pruned, the ledger of the batch's cards; one key can have answered several
    # records. A card's ledger holds a key once (its unique key): it answers the key for that card's records,
    # and the re-upload of any of its records. The records refused outside any card's ledger (for reusing a
    # key, or of no known card) answer their own re-uploads only. So once terminal_txn has forgotten the key,
    # another card's record under it is judged on its own card, whatever else the batch holds, as after any
    # key's answer is pruned (docs/transit.md "Storage and idempotency").
    answered: dict[int, list[tuple[bytes, str, str | None]]] = {}
    in_ledger: dict[tuple[int, int], list[tuple[bytes, str, str | None]]] = {}
    for row in await conn.fetch(_ANSWERED_SQL, tid, seqs):
        answered.setdefault(row["terminal_seq"], []).append(
            (bytes(row["request_hash"]), row["result"], (row["detail"] or {}).get("reason"))
        )
    records_before: dict[int, list[tuple[bytes, str, str | None]]] = {}
    for row in await conn.fetch(_REFUSED_SQL, tid, seqs):
        records_before.setdefault(row["terminal_seq"], []).append(
            (bytes(row["request_hash"]), row["result"], row["reason"])
        )
    if by_id:
        for row in await conn.fetch(_LEDGER_SQL, list(by_id), tid, seqs):
            entry = (_digest(row["record"]), row["result"], row["reason"])
            in_ledger.setdefault((row["card_id"], row["terminal_seq"]), []).append(entry)
            records_before.setdefault(row["terminal_seq"], []).append(entry)  # its re-upload, whatever the card
    wanted = [
        (p.card_id, transit.extend_purse_seq(p.base_ext, r.purse_seq))
        for r in records
        if (p := purses.get(r.card_sn)) is not None
    ]
    posted: dict[tuple[int, int], OfflineRecord] = {}
    if wanted:
        for row in await conn.fetch(_POSTED_SQL, [w[0] for w in wanted], [w[1] for w in wanted]):
            posted[(row["card_id"], row["purse_seq"])] = transit.record_from_dict(row["record"])
    if by_id:
        for card_id, entries in (await hotlist_flow.entries_of(conn, list(by_id))).items():
            by_id[card_id].entries.extend(entries)

    served = await served_to(conn, tid, now - dt.timedelta(seconds=RECORD_AGE_S_MAX + skew_s))
    plan = _Plan()
    now_s = int(now.timestamp())
    for r in records:
        as_json = transit.record_to_dict(r)
        digest = _digest(as_json)
        purse = purses.get(r.card_sn)
        prior = [
            *answered.get(r.terminal_seq, ()),
            *(in_ledger.get((purse.card_id, r.terminal_seq), ()) if purse is not None else ()),
        ]
        same = next((p for p in (*prior, *records_before.get(r.terminal_seq, ())) if p[0] == digest), None)
        if same is not None:
            plan.answers.append(RecordAnswer(r.terminal_seq, same[1], same[2], True))
            continue
        if prior:
            # The key answers another transaction (an online tap, another record): refused, never posted (the
            # key cannot answer two transactions), and kept as uploaded for investigation, whoever's card it
            # is. Not in the card's ledger: its key there may be the first record's, and a re-upload must
            # find it whatever the card.
            plan.answers.append(
                RecordAnswer(r.terminal_seq, RecordResult.CONFLICT.value, REASON_TERMINAL_SEQ_REUSED)
            )
            plan.refused.append(
                (
                    r.terminal_seq,
                    digest,
                    purse.card_id if purse is not None else None,
                    RecordResult.CONFLICT.value,
                    REASON_TERMINAL_SEQ_REUSED,
                    as_json,
                )
            )
            continue
        verdict, reason, ext, operator = _judge(r, purse, posted, tac, table, now_s, skew_s, served)
        detail: dict[str, Any] = {"kind": "offline", "batch_id": batch.batch_id}
        if reason is not None:
            detail["reason"] = reason
        amount = 0
        balance: int | None = None
        if purse is not None and ext is not None and verdict.posted:
            assert operator is not None
            amount = r.amount_fen
            purse.balance_fen -= amount
            purse.last_ext = max(purse.last_ext, ext)
            purse.touched = True
            posted[(purse.card_id, ext)] = r
            if purse.settle_to is not None and amount:
                new = purse.settle_to
                purse.balance_fen += amount
                purse.moved_fen -= amount
                new.balance_fen -= amount
                new.touched = True
                plan.transfers += [(purse.card_id, new.card_id, amount), (new.card_id, purse.card_id, -amount)]
            balance = purse.chip_balance_fen
            if amount:
                counterparty = operator if verdict.cleared else HOTLISTED_PREFIX + operator
                plan.journal.append(
                    (
                        purse.card_id,
                        r.terminal_seq,
                        -amount,
                        dt.datetime.fromtimestamp(r.txn_time, dt.UTC),
                        counterparty,
                        r.line_id,
                        r.station_id or None,
                    )
                )
        if verdict == RecordResult.BALANCE_MISMATCH and purse is not None:
            detail["shadow_balance_before_fen"] = (balance or 0) + amount
        if purse is not None and ext is not None:
            detail["purse_seq"] = ext
            plan.ledger.append(
                (purse.card_id, r.terminal_seq, ext, verdict.value, reason, verdict.posted, as_json)
            )
        else:  # not one of our cards: no ledger, kept with the refused records
            plan.refused.append((r.terminal_seq, digest, None, verdict.value, reason, as_json))
        plan.keys.append(
            (r.terminal_seq, digest, purse.card_id if purse else None, verdict.value, amount, balance, detail)
        )
        plan.answers.append(RecordAnswer(r.terminal_seq, verdict.value, reason))

    await _write(conn, plan, tid, batch.batch_id, [p for p in purses.values() if p.touched], cards)
    return plan.answers


async def _write(
    conn: asyncpg.Connection,
    plan: _Plan,
    tid: str,
    batch_id: int,
    touched: list[_Purse],
    cards: list[tuple[int, int, int | None]],
) -> None:
    if not plan.keys and not plan.ledger and not plan.refused:
        return
    j, led, keys, refused = plan.journal, plan.ledger, plan.keys, plan.refused
    row = await conn.fetchrow(
        _WRITE_SQL,
        [p.card_id for p in touched],
        [p.balance_fen for p in touched],
        [p.last_ext for p in touched],
        KIND_OFFLINE,
        tid,
        SOURCE_OFFLINE,
        *columns(j, 7),
        batch_id,
        *columns(led, 7),
        *columns(keys, 7),
        *columns(refused, 6),
        KIND_TRANSFER,
        *columns(plan.transfers, 3),
        *columns(cards, 3),
    )
    assert row is not None
    if (
        row["tt"] != len(keys)
        or row["posted"] != sum(1 for x in led if x[5])
        or row["refused"] != len(refused)
        or row["cv"] != len(cards)
    ):
        # A concurrent upload took a key (or stored a refusal) first: answer from what it wrote. Or a card
        # changed while the batch waited for its purse lock (a replacement moved the purse): look again.
        raise _Retry()


async def process_batch(
    pool: asyncpg.Pool,
    table: fares.FareTable,
    tac: TacChecker,
    batch: OfflineBatch,
    *,
    skew_s: int,
    now: dt.datetime | None = None,
) -> list[RecordAnswer]:
    """Judge, post and record one upload; one answer per record, in batch order."""
    at = now or dt.datetime.now(dt.UTC)
    extra: set[int] = set()
    async with pool.acquire() as conn:
        attempt = 0
        while True:
            try:
                async with conn.transaction():
                    return await _attempt(conn, table, tac, batch, at, skew_s, extra)
            except _NeedCards as need:  # raised only for cards not in `extra` yet: this ends
                extra |= need.card_ids  # rolled back before waiting for more locks: not an attempt
            except (_Retry, asyncpg.DeadlockDetectedError) as exc:
                attempt += 1
                if attempt == BATCH_ATTEMPTS_MAX:
                    # Rolled back every time: nothing was written, the batch may be uploaded again (503).
                    raise ApiError(
                        "timeout", "the upload kept meeting concurrent changes", headers=RETRY_LATER
                    ) from exc
