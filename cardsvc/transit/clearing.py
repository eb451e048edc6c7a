"""Daily clearing: per operator and clearing day, the fares the back office approved for that operator,
as a clearing file (protocols/clearing.md) and a `clearing_report` row that `cardsvc audit` re-checks.

What is cleared. Journal rows of kind fare, penalty, offline or ride code (`CLEARING_KINDS`), approved
(`result = 1`), whose counterparty is the operator and that were **posted** in the clearing day: the local
calendar day under the fare table's fixed UTC offset (UTC+8 for Chongqing). A row's clearing instant is
`greatest(at, posted_at)`: when it was written (`posted_at`, migration 0007), or its ride time if that is
later (a validator clock running ahead). A ride uploaded a week late is therefore cleared with the day it
arrived, its line keeping its own ride time, and a day once cleared never changes: no late upload can
make a report disagree with the journal. Rows written before migration 0007 have `posted_at` = -infinity
and keep their ride day. The operators are the fare table's and those registered in `transit_operator`;
other counterparties (`hotlisted:<operator>`: offline debits a validator should have refused) are listed
as not cleared. The operator is credited `-amount_fen` (the purse was debited). Rows that move no money (a
metro entry, a free or fully discounted ride) are not cleared. A fare correction (`KIND_CORRECTION`,
corrections.py: the card office gave a fare back) is cleared the same way, by the day it was written, as
a correction line that debits the operator (`amount_fen` > 0 on the purse); a day with one is written as
file version 2 (protocols/clearing.md), a day without as version 1, byte for byte what the version 1
writer made. Any other row of these kinds that credits the purse (a fare row with `amount_fen > 0`,
written by hand) is not a correction the file can name: the run refuses that operator's day instead of
hiding it.

When. A day can be cleared once it is over on the database's clock (by `CLEARING_MARGIN_S`) and no
transaction that began before its end is still open (`posted_at` is the writing transaction's start, so
such a transaction could still commit rows of the day). The run waits for those a little (`settle_s`),
then refuses. To see every session's transaction the clearing role needs `pg_read_all_stats` (or is a
superuser); without it the run refuses. A scheduled run (no date: `days_to_clear`) clears, per operator,
every day not cleared yet from its first fare's day on, so a missed night, a refused day or a day left before
one cleared by hand is tried again by the next run.

How. One set-based aggregate (GROUP BY counterparty) gives each operator's count and total; the detail
lines are then streamed from a server-side cursor, ordered by txn_id, straight into the file with an
incremental SM3, so a 20-million-line day never sits in memory. Aggregate and lines are read in one
REPEATABLE READ snapshot, so they agree. The bytes are exactly what `protocols.clearing.write_clearing_file`
produces for the same lines (tested).

Idempotent. The header's `created_at` is the report's first creation time, so re-running a day writes
identical bytes and leaves the report alone ("unchanged"). If the journal of a cleared day changed anyway
(edited by hand: counts, totals or digest differ), the run does not overwrite the report or the file:
it reports "mismatch" and exits non-zero. `cardsvc audit` compares counts and totals only (not the
digest, which would mean formatting every cleared row again): it fails too when those moved. A fare
correction never changes a cleared day: it is a new row, in the day it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from cardsvc import limits, metrics
from protocols import clearing as wire

from . import fares
from .taps import KIND_CORRECTION, KIND_FARE, KIND_OFFLINE, KIND_PENALTY, KIND_RIDECODE, SOURCE_RIDECODE

__all__ = [
    "AGGREGATE_COLUMNS",
    "AGGREGATE_SQL",
    "CLEARING_KINDS",
    "FARE_KINDS",
    "ClearingError",
    "DaysToClear",
    "OperatorResult",
    "business_day_bounds",
    "clear_day",
    "clearing_file_name",
    "clearing_source",
    "days_to_clear",
    "in_day_sql",
    "last_day_over",
    "operators",
    "read_back",
    "refresh_cleared_through",
    "registered_operators",
    "report_view",
]

FARE_KINDS = (KIND_FARE, KIND_PENALTY, KIND_OFFLINE, KIND_RIDECODE)  # a purse debit is a fare line (D)
CLEARING_KINDS = (*FARE_KINDS, KIND_CORRECTION)  # every kind an operator is credited or debited by
CURSOR_PREFETCH = 10_000
SETTLE_POLL_S = 0.2
PROGRESS_EVERY_LINES = 100_000
_LOCK_NAMESPACE = 0x434C52  # "CLR": advisory lock namespace of clearing runs
CLEARED_THROUGH_MAX_AGE_S = 300.0  # a worker reads the reports for the gauge at most this often


def in_day_sql(lo: str, hi: str, alias: str = "") -> str:
    """SQL condition: the journal row (`alias`) is cleared in the day [lo, hi), by its clearing instant
    greatest(at, posted_at) (module docstring), which the BRIN index txn_journal_clearing_day finds.
    `at < hi` follows from it and lets the planner skip the journal partitions after the day."""
    a = f"{alias}." if alias else ""
    return f"greatest({a}at, {a}posted_at) >= {lo} AND greatest({a}at, {a}posted_at) < {hi} AND {a}at < {hi}"


# A journal row (alias j) that is a fare line (D) or a correction line (C) of a clearing file.
_IS_FARE = f"(j.kind <> {KIND_CORRECTION} AND j.amount_fen < 0)"
_IS_CORRECTION = f"(j.kind = {KIND_CORRECTION} AND j.amount_fen > 0)"
# The aggregate of one operator and clearing day over journal rows j of CLEARING_KINDS, shared with
# `cardsvc audit`, which compares every stored report with it: fares credited to the operator, corrections
# debited from it, and the rows a file cannot name (`reversals`: a fare row crediting the purse, a
# correction debiting it).
AGGREGATE_COLUMNS = f"""
       count(*) FILTER (WHERE {_IS_FARE}) AS txn_count,
       coalesce(sum(-j.amount_fen) FILTER (WHERE {_IS_FARE}), 0)::bigint AS total_fen,
       count(*) FILTER (WHERE {_IS_CORRECTION}) AS correction_count,
       coalesce(sum(j.amount_fen) FILTER (WHERE {_IS_CORRECTION}), 0)::bigint AS correction_fen,
       count(*) FILTER (WHERE (j.kind <> {KIND_CORRECTION} AND j.amount_fen > 0)
                           OR (j.kind = {KIND_CORRECTION} AND j.amount_fen < 0)) AS reversals"""

# Every counterparty's aggregate of one clearing day [$2, $3) ($1: CLEARING_KINDS; $4: one operator, or
# NULL for all).
AGGREGATE_SQL = f"""
SELECT j.counterparty AS operator_id, {AGGREGATE_COLUMNS}
FROM txn_journal j
WHERE j.kind = ANY($1::smallint[]) AND j.result = 1 AND {in_day_sql("$2", "$3", "j")}
  AND ($4::text IS NULL OR j.counterparty IN ($4, 'hotlisted:' || $4))
GROUP BY j.counterparty
"""

# The lines of one operator's day in txn_id order, a correction with what its fare_correction row says
# (migration 0019).
_LINES_SQL = f"""
SELECT j.txn_id, j.card_id, j.kind, j.source, abs(j.amount_fen) AS amount_fen,
       floor(extract(epoch FROM j.at))::bigint AS t, j.line_id, coalesce(j.station_id, '') AS station_id,
       f.corrects_txn_id, f.reason, f.fare_ridecode
FROM txn_journal j
LEFT JOIN fare_correction f ON j.kind = {KIND_CORRECTION} AND f.txn_id = j.txn_id
WHERE j.counterparty = $1 AND j.kind = ANY($2::smallint[]) AND j.result = 1 AND ({_IS_FARE} OR {_IS_CORRECTION})
  AND {in_day_sql("$3", "$4", "j")}
ORDER BY j.txn_id
"""


# Client sessions of this database (other than ours) whose transaction began before $1, the oldest first.
# Complete only for a role that may read every session's activity (`_settle` checks that first: for the
# others PostgreSQL hides even backend_type).
_OPEN_BEFORE_SQL = """
SELECT pid, xact_start FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND xact_start < $1
ORDER BY xact_start LIMIT 1
"""


class ClearingError(Exception):
    """A clearing run that cannot proceed (day not over, another run in progress, bad rows)."""


@dataclasses.dataclass(frozen=True, slots=True)
class OperatorResult:
    operator_id: str
    business_date: dt.date
    status: str  # created | unchanged | mismatch | refused | not_cleared
    txn_count: int
    total_fen: int
    digest: str | None
    path: Path | None
    detail: str = ""
    correction_count: int = 0
    correction_fen: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("created", "unchanged", "not_cleared")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["business_date"] = self.business_date.isoformat()
        out["path"] = str(self.path) if self.path else None
        return out


def business_day_bounds(table: fares.FareTable, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The UTC instants [start, end) of a local business day under the table's fixed offset."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC) - dt.timedelta(
        seconds=table.rules.utc_offset_s
    )
    return start, start + dt.timedelta(days=1)


def clearing_file_name(operator_id: str, day: dt.date) -> str:
    return f"{operator_id}_{day:%Y%m%d}.clr"


def report_view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "operator_id": row["operator_id"],
        "business_date": row["business_date"].isoformat(),
        "txn_count": row["txn_count"],
        "total_fen": row["total_fen"],
        "correction_count": row["correction_count"],
        "correction_fen": row["correction_fen"],
        "net_fen": row["total_fen"] - row["correction_fen"],
        "digest": row["digest"],
        "created_at": row["created_at"].isoformat(),
        "file": clearing_file_name(row["operator_id"], row["business_date"]),
    }


def clearing_source(kind: int, source: int) -> wire.ClearingSource:
    """A fare row's `source` label in a clearing file: what a ride code charged, or the purse."""
    ridecode = kind == KIND_RIDECODE or source == SOURCE_RIDECODE
    return wire.ClearingSource.RIDE_CODE if ridecode else wire.ClearingSource.PURSE


def _line(r: asyncpg.Record) -> wire.DetailLine:
    if r["line_id"] is None:
        raise ClearingError(f"journal txn {r['txn_id']} has no line_id; it cannot be cleared")
    if r["kind"] == KIND_CORRECTION:
        if r["corrects_txn_id"] is None:
            raise ClearingError(f"correction txn {r['txn_id']} has no fare_correction row; it cannot be cleared")
        try:
            reason = wire.CorrectionReason(r["reason"])
        except ValueError:
            raise ClearingError(f"correction txn {r['txn_id']} has an unknown reason") from None
        return wire.ClearingCorrection(
            txn_id=r["txn_id"],
            card_id=r["card_id"],
            source=wire.ClearingSource.RIDE_CODE if r["fare_ridecode"] else wire.ClearingSource.PURSE,
            amount_fen=r["amount_fen"],
            txn_time=r["t"],
            line_id=r["line_id"],
            station_id=r["station_id"],
            corrects_txn_id=r["corrects_txn_id"],
            reason=reason,
        )
    return wire.ClearingLine(
        txn_id=r["txn_id"],
        card_id=r["card_id"],
        source=clearing_source(r["kind"], r["source"]),
        amount_fen=r["amount_fen"],
        txn_time=r["t"],
        line_id=r["line_id"],
        station_id=r["station_id"],
    )


async def _stream_file(
    conn: asyncpg.Connection,
    header: wire.ClearingHeader,
    bounds: tuple[dt.datetime, dt.datetime],
    tmp: Path,
    progress: Callable[[str], None] | None,
) -> str:
    """Write the file from a cursor; return the trailer digest. Same bytes as write_clearing_file."""
    # The record layout is protocols.clearing's own (its line formatters and field checks), applied one
    # line at a time: write_clearing_file needs every line in memory at once.
    wire._validate_header(header)
    digest = hashlib.new("sm3")
    count = prev = fares_fen = fixes = fixes_fen = 0
    with tmp.open("wb") as fh:

        def put(text: str) -> None:
            data = (text + "\n").encode("ascii")
            digest.update(data)
            fh.write(data)

        put(wire._header_line(header))
        cursor = conn.cursor(_LINES_SQL, header.operator_id, list(CLEARING_KINDS), *bounds, prefetch=CURSOR_PREFETCH)
        async for r in cursor:
            ln = _line(r)
            wire._validate_line(count, ln, prev)
            prev = ln.txn_id
            count += 1
            if type(ln) is wire.ClearingCorrection:
                fixes += 1
                fixes_fen += ln.amount_fen
            else:
                fares_fen += ln.amount_fen
            put(wire._detail_line(count, ln))
            if progress is not None and count % PROGRESS_EVERY_LINES == 0:
                lines = header.record_count + header.correction_count
                progress(f"clearing {header.operator_id} {header.business_date}: {count}/{lines} lines")
        got = (count - fixes, fares_fen, fixes, fixes_fen)
        want = (header.record_count, header.total_fen, header.correction_count, header.correction_fen)
        if got != want:
            raise ClearingError(
                f"{header.operator_id}: the lines (fares {got[0]}, {got[1]} fen; corrections {got[2]}, "
                f"{got[3]} fen) do not match the aggregate (fares {want[0]}, {want[1]} fen; corrections "
                f"{want[2]}, {want[3]} fen)"
            )
        hexdigest = digest.hexdigest()
        fh.write(f"T|{count}|{hexdigest}\n".encode("ascii"))
        fh.flush()
        os.fsync(fh.fileno())
    return hexdigest


def _sync_dir(path: Path) -> None:
    """Make a rename in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _settle(conn: asyncpg.Connection, day: dt.date, end: dt.datetime, settle_s: float) -> None:
    """Return once no transaction that began before `end` is open: every row it may post in the day is
    then committed (or gone), so the snapshot taken next holds the whole day. Waits up to `settle_s`.
    PostgreSQL clears a session's `xact_start` only after its commit is visible to new snapshots
    (CommitTransaction). cardsvc uses no prepared (two-phase) transactions, which this would not see."""
    if not await conn.fetchval("SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')"):
        raise ClearingError(
            "this database role cannot see other roles' sessions (pg_stat_activity), so it cannot tell "
            "whether they are still writing the day: grant it pg_read_all_stats (or pg_monitor)"
        )
    deadline = time.monotonic() + settle_s
    while True:
        row = await conn.fetchrow(_OPEN_BEFORE_SQL, end)
        if row is None:
            return
        if time.monotonic() >= deadline:
            raise ClearingError(
                f"a transaction that began before {day} ended (at {row['xact_start'].isoformat()}, pid "
                f"{row['pid']}) is still open and may still write rows of the day; run again when it has ended"
            )
        await asyncio.sleep(SETTLE_POLL_S)


async def registered_operators(conn: asyncpg.Connection) -> set[str]:
    """The operators registered outside the fare table (`cardsvc clearing register`: one removed from it)."""
    return {r["operator_id"] for r in await conn.fetch("SELECT operator_id FROM transit_operator")}


async def operators(conn: asyncpg.Connection, table: fares.FareTable) -> list[str]:
    """The operators cleared: the fare table's and the registered ones (transit_operator)."""
    return sorted(set(table.operators) | await registered_operators(conn))


def last_day_over(table: fares.FareTable, now: dt.datetime) -> dt.date:
    """The latest business day that can be cleared at `now`: over, by `CLEARING_MARGIN_S`."""
    local = now + dt.timedelta(seconds=table.rules.utc_offset_s - limits.CLEARING_MARGIN_S)
    return local.date() - dt.timedelta(days=1)


@dataclasses.dataclass(frozen=True, slots=True)
class DaysToClear:
    todo: list[tuple[dt.date, list[str]]]  # each day not cleared yet, oldest first, with its operators
    last_over: dt.date

    @property
    def days(self) -> list[dt.date]:
        return [day for day, _ in self.todo]


async def _first_days_owed(
    conn: asyncpg.Connection, table: fares.FareTable, ops: Sequence[str]
) -> dict[str, dt.date]:
    """Per operator, the first day it is owed a clearing run: the first day without a report from the local
    day of its first journal row on (through the journal's (counterparty, at) index, one probe per
    partition), so days before one cleared by hand are owed too; with no journal row, the day after its
    first unbroken run of reports; with neither, not owed anything yet."""
    reported: dict[str, set[dt.date]] = {}
    for r in await conn.fetch(
        "SELECT operator_id, business_date FROM clearing_report WHERE operator_id = ANY($1::text[])", list(ops)
    ):
        reported.setdefault(r["operator_id"], set()).add(r["business_date"])
    start = {}
    for op in ops:
        days = reported.get(op, set())
        first = await conn.fetchval("SELECT min(at) FROM txn_journal WHERE counterparty = $1", op)
        if first is not None:
            day = fares.local_day(table, int(first.timestamp()))
        elif days:
            day = min(days)
        else:
            continue
        while day in days:
            day += dt.timedelta(days=1)
        start[op] = day
    return start


async def days_to_clear(
    conn: asyncpg.Connection,
    table: fares.FareTable,
    *,
    operator_id: str | None = None,
    now: dt.datetime | None = None,
) -> DaysToClear:
    """What a scheduled run clears (`cardsvc clearing run` without --date): for each operator, every day
    without a report from the day of its first journal row on (a night missed, a day refused, days left
    before one cleared by hand) up to the last day that is over, however far back (nothing before that
    row's day is owed; no row at all: nothing to clear). Each day names
    only the operators it is missing for, so files already made are not written again. The same days hold
    the cleared-through gauge back (`refresh_cleared_through`). An unknown `operator_id` is a
    ClearingError, as for `clear_day`."""
    now = now or await conn.fetchval("SELECT clock_timestamp()")
    last = last_day_over(table, now)
    known = await operators(conn, table)
    if operator_id is not None and operator_id not in known:
        raise ClearingError(f"no operator {operator_id!r}: one of {', '.join(known)}")
    ops = [operator_id] if operator_id else known
    start = await _first_days_owed(conn, table, ops)
    first = min(start.values(), default=last + dt.timedelta(days=1))
    have = {
        (r["operator_id"], r["business_date"])
        for r in await conn.fetch(
            """SELECT operator_id, business_date FROM clearing_report
               WHERE operator_id = ANY($1::text[]) AND business_date BETWEEN $2 AND $3""",
            ops, first, last,
        )
    }  # fmt: skip
    todo = []
    for k in range((last - first).days + 1):
        day = first + dt.timedelta(days=k)
        missing = [op for op in ops if op in start and start[op] <= day and (op, day) not in have]
        if missing:
            todo.append((day, missing))
    return DaysToClear(todo, last)


async def refresh_cleared_through(conn: asyncpg.Connection, table: fares.FareTable) -> None:
    """Set `cardsvc_transit_clearing_cleared_through_timestamp_seconds` for every operator clearing clears
    (an alert fires when one falls behind): the start of the first day it is owed (`_first_days_owed`), so
    a day refused or missed, or one before a day cleared by hand, holds it back until it is cleared; for an
    operator never cleared, the start of the day of its first journal row (no row: nothing owed, no
    series). The scrape calls it at
    most every `CLEARED_THROUGH_MAX_AGE_S` per worker (reports change once a night, and the query reads
    every report); the workers' values aggregate to the most recent one."""
    for op, day in (await _first_days_owed(conn, table, await operators(conn, table))).items():
        metrics.CLEARED_THROUGH.labels(op).set(business_day_bounds(table, day)[0].timestamp())


async def clear_day(
    conn: asyncpg.Connection,
    table: fares.FareTable,
    day: dt.date,
    out_dir: Path,
    *,
    operator_id: str | None = None,
    now: dt.datetime | None = None,
    progress: Callable[[str], None] | None = None,
    settle_s: float = limits.CLEARING_SETTLE_S,
) -> list[OperatorResult]:
    """Clear one day for every operator (or one): write the files and record the reports.

    `now` replaces the database's clock for the "day is over" check: for tests only, since with a `now`
    in the future a day still open is cleared, and its rows written after the run make it a mismatch.
    `settle_s`: how long to wait for transactions that began before the day's end."""
    now = now or await conn.fetchval("SELECT clock_timestamp()")
    bounds = business_day_bounds(table, day)
    clearable = bounds[1] + dt.timedelta(seconds=limits.CLEARING_MARGIN_S)
    if clearable > now:
        raise ClearingError(
            f"business day {day} is not over yet (it ends {bounds[1].isoformat()}; "
            f"it can be cleared from {clearable.isoformat()})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a batch command on its own event loop
    lock_key = day.toordinal()
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", _LOCK_NAMESPACE, lock_key):
        raise ClearingError(f"another clearing run for {day} is in progress")
    try:
        await _settle(conn, day, bounds[1], settle_s)
        return await _clear_locked(conn, table, day, out_dir, bounds, operator_id, progress)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_NAMESPACE, lock_key)


async def _clear_locked(
    conn: asyncpg.Connection,
    table: fares.FareTable,
    day: dt.date,
    out_dir: Path,
    bounds: tuple[dt.datetime, dt.datetime],
    operator_id: str | None,
    progress: Callable[[str], None] | None,
) -> list[OperatorResult]:
    stored = {
        r["operator_id"]: r
        for r in await conn.fetch(
            """SELECT operator_id, txn_count, total_fen, correction_count, correction_fen, digest, created_at
               FROM clearing_report WHERE business_date = $1""",
            day,
        )
    }
    # Files made by a run that could not commit their report (migration 0018): their time and digest.
    pending = {
        r["operator_id"]: (int(r["created_at"].timestamp()), r["digest"])
        for r in await conn.fetch(
            "SELECT operator_id, created_at, digest FROM clearing_pending WHERE business_date = $1", day
        )
    }
    results: list[OperatorResult] = []
    tmps: list[Path] = []  # every file begun: those not put in place are removed, however the run ends
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            aggregate = {r["operator_id"]: r for r in await conn.fetch(AGGREGATE_SQL, list(CLEARING_KINDS), *bounds, operator_id)}
            known = await operators(conn, table)
            if operator_id is not None and operator_id not in known:
                raise ClearingError(f"no operator {operator_id!r}: one of {', '.join(known)}")
            cleared = [operator_id] if operator_id else known
            for other in sorted(set(aggregate) - set(cleared)):
                # Not an operator, e.g. `hotlisted:<operator>` (offline debits of a card the validator should
                # have refused): the purse paid, nobody is paid; shown, never cleared (with one operator: its own).
                a = aggregate[other]
                results.append(OperatorResult(other, day, "not_cleared", a["txn_count"], a["total_fen"], None,
                                              None, "not an operator: kept out of clearing", a["correction_count"],
                                              a["correction_fen"]))
            made: list[tuple[OperatorResult, Path, int]] = []
            for op in cleared:
                agg = aggregate.get(op)
                count, total = (agg["txn_count"], agg["total_fen"]) if agg else (0, 0)
                fixes = (agg["correction_count"], agg["correction_fen"]) if agg else (0, 0)
                if agg and agg["reversals"]:
                    results.append(OperatorResult(op, day, "refused", count, total, None, None,
                                                  f"{agg['reversals']} row(s) credit a purse but are not fare "
                                                  "corrections: a clearing file cannot name them", *fixes))
                    continue
                prior = stored.get(op)
                path = out_dir / clearing_file_name(op, day)
                # A file made by a run that could not commit its report keeps its created_at if the journal
                # still says the same: the operator, who may have taken it, gets the same bytes again. If it
                # says otherwise (a correction since), a new version dated after it.
                made_before = None if prior is not None else pending.get(op)
                if prior is not None:
                    created_at = int(prior["created_at"].timestamp())
                else:
                    created_at = made_before[0] if made_before else int(time.time())
                tmp = path.with_name(path.name + ".tmp")
                tmps.append(tmp)
                try:
                    header = wire.ClearingHeader(op, day, count, total, created_at, *fixes)
                    digest = await _stream_file(conn, header, bounds, tmp, progress)
                    if made_before is not None and digest != made_before[1]:
                        created_at = max(int(time.time()), made_before[0] + 1)
                        header = dataclasses.replace(header, created_at=created_at)
                        digest = await _stream_file(conn, header, bounds, tmp, progress)
                except (ClearingError, wire.ClearingFileInvalid) as exc:
                    tmp.unlink(missing_ok=True)  # a refused day leaves no half-written file behind
                    results.append(OperatorResult(op, day, "refused", count, total, None, None, str(exc), *fixes))
                    continue
                if prior is not None and (
                    prior["txn_count"], prior["total_fen"], prior["correction_count"], prior["correction_fen"],
                    prior["digest"],
                ) != (count, total, *fixes, digest):
                    tmp.unlink()
                    results.append(OperatorResult(
                        op, day, "mismatch", count, total, digest, None,
                        f"the journal changed after the report was made: report {prior['txn_count']} txns "
                        f"{prior['total_fen']} fen and {prior['correction_count']} corrections "
                        f"{prior['correction_fen']} fen, journal {count} txns {total} fen and {fixes[0]} "
                        f"corrections {fixes[1]} fen; report and file kept", *fixes,
                    ))
                    continue
                status = "unchanged" if prior is not None else "created"
                made.append((OperatorResult(op, day, status, count, total, digest, path, "", *fixes), tmp, created_at))
        # A report says its day is cleared, so it commits only once its file is in place (renamed and the
        # directory synced): a file that cannot be put in place, or a crash between the two, leaves no report,
        # and the next run clears the day again. The file's time and digest are committed before the rename
        # (clearing_pending): after a crash between the rename and the commit, the next run writes the same
        # bytes again, even if the operator took the file meanwhile.
        for res, tmp, created_at in made:
            assert res.path is not None
            if res.status != "created":
                tmp.replace(res.path)
                _sync_dir(res.path.parent)
                results.append(res)
                continue
            await conn.execute(
                """INSERT INTO clearing_pending (operator_id, business_date, created_at, digest)
                   VALUES ($1, $2, to_timestamp($3), $4)
                   ON CONFLICT (operator_id, business_date) DO UPDATE
                   SET created_at = EXCLUDED.created_at, digest = EXCLUDED.digest""",
                res.operator_id, day, created_at, res.digest,
            )  # fmt: skip
            async with conn.transaction():
                inserted = await conn.fetchval(
                    """INSERT INTO clearing_report (operator_id, business_date, txn_count, total_fen, digest, created_at,
                                                   correction_count, correction_fen)
                       VALUES ($1, $2, $3, $4, $5, to_timestamp($6), $7, $8)
                       ON CONFLICT (operator_id, business_date) DO NOTHING RETURNING 1""",
                    res.operator_id, day, res.txn_count, res.total_fen, res.digest, created_at,
                    res.correction_count, res.correction_fen,
                )
                await conn.execute(
                    "DELETE FROM clearing_pending WHERE operator_id = $1 AND business_date = $2", res.operator_id, day
                )
                if inserted is not None:
                    tmp.replace(res.path)
                    _sync_dir(res.path.parent)
            if inserted is None:  # a report appeared meanwhile (the lock makes this unexpected)
                results.append(dataclasses.replace(res, status="mismatch", path=None,
                                                   detail="a report for this day appeared during the run"))
                continue
            results.append(res)
    finally:
        for tmp in tmps:
            with contextlib.suppress(OSError):  # e.g. a directory in the way: the run's error says so
                tmp.unlink(missing_ok=True)
    results.sort(key=lambda r: r.operator_id)
    return results


def read_back(path: Path) -> tuple[wire.ClearingHeader, Sequence[wire.DetailLine]]:
    """Parse a written clearing file (small files; for checks and tests)."""
    return wire.read_clearing_file(path.read_bytes())
