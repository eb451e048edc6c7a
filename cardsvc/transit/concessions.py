"""Transit concessions of a cardholder, managed by the card office (docs/transit.md "Concessions").

- `elderly`: free rides within an annual quota (fare table `elderly_annual_quota`, 1,200 in the demo
  table), +`elderly_extra_quota` (300) once per calendar year on request; registered only for holders
  aged `elderly_min_age` (65) or more on the local date, read from the birth date in their ID number.
- `disabled_free`, `disabled_half`: registered on the card office's check of the disability certificate.

One quota per holder, whatever credential rides (card, e-card, ride code): the tap engine reads and
writes it while it holds the holder's purse row locks, so every change here takes those same locks first
(in card order, like a tap batch) and the two never lose each other's update.

Ending a concession keeps its row (`ended_at`): the year's elderly ride count survives an end and a new
registration. Every change appends a `concession_event` (who, when, the rides left).

A ride that used a quota ride wrongly (a double tap, a validator fault) costs nothing, so a fare correction
cannot undo it: the card office gives the ride itself back to the quota of the ride's year, once per ride
(`return_quota_ride`, docs/transit.md "Quota rides given back").
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from cardsvc import metrics
from cardsvc.errors import ApiError
from cardsvc.flows.actor import Actor
from cardsvc.security.pii import PiiVault
from protocols import idnumber

from . import fares
from .flow import prior_office_answer, record_office_key
from .taps import request_hash

__all__ = ["end_concession", "get_concession", "grant_extra_quota", "return_quota_ride", "set_concession"]

ELDERLY = "elderly"


def _rides_left(row: asyncpg.Record, table: fares.FareTable, year: int) -> int | None:
    """The elderly rides left this year (a year not started yet has its full base quota)."""
    if row["kind"] != ELDERLY:
        return None
    if row["quota_year"] != year:
        return fares.elderly_quota_for_year(table, extra_granted=False)
    return max(0, row["rides_left"] or 0)


def _view(holder_id: int, row: asyncpg.Record | None, table: fares.FareTable, year: int) -> dict[str, Any]:
    if row is None or row["ended_at"] is not None:
        raise ApiError("not_found", "the cardholder has no concession", field="holder_id")
    return {
        "holder_id": holder_id,
        "kind": row["kind"],
        "year": year,
        "elderly_rides_left": _rides_left(row, table, year),
        "extra_quota_granted": row["kind"] == ELDERLY and row["extra_year"] == year,
        "updated_at": row["updated_at"].isoformat(),
    }


_ROW = "SELECT kind, quota_year, rides_left, extra_year, ended_at, updated_at FROM concession WHERE holder_id = $1"


async def _lock_holder(conn: asyncpg.Connection, holder_id: int) -> asyncpg.Record:
    """The holder (404 if unknown), with the purse rows of all their cards locked in card order."""
    holder = await conn.fetchrow(
        "SELECT holder_id, id_cipher FROM cardholder WHERE holder_id = $1", holder_id
    )
    if holder is None:
        raise ApiError("not_found", "no cardholder with this id", field="holder_id")
    await conn.execute(
        """SELECT 1 FROM purse p JOIN card c ON c.card_id = p.card_id WHERE c.holder_id = $1
           ORDER BY p.card_id FOR UPDATE OF p""",
        holder_id,
    )
    return holder


@contextlib.asynccontextmanager
async def _locked(
    conn: asyncpg.Connection, table: fares.FareTable, holder_id: int, now: dt.datetime
) -> AsyncIterator[tuple[asyncpg.Record, asyncpg.Record | None, int]]:
    """A transaction holding the holder's purse locks: the holder, their concession row as it is now
    (None: never registered) and the fare table's local calendar year."""
    async with conn.transaction():
        holder = await _lock_holder(conn, holder_id)
        # The row itself locked too: a tap on a card the purse locks did not cover (a replacement issued
        # meanwhile) then waits for this change, and its compare-and-set misses and runs again.
        row = await conn.fetchrow(_ROW + " FOR UPDATE", holder_id)
        yield holder, row, _year(table, now, row)


def _year(table: fares.FareTable, now: dt.datetime, row: asyncpg.Record | None) -> int:
    """The quota year an office operation works on: the local year of `now`, or the row's if later. `now` is
    read before the locks are taken; a tap after midnight may have begun the next year's quota meanwhile,
    and a quota's year never goes back (an extra-rides grant clocked at 23:59:59 goes to the new year)."""
    year = _local_today(table, now).year
    return max(year, row["quota_year"]) if row is not None and row["quota_year"] is not None else year


async def _event(
    conn: asyncpg.Connection,
    holder_id: int,
    op: str,
    before: str | None,
    after: str | None,
    rides_left: int | None,
    actor: Actor,
) -> None:
    await conn.execute(
        """INSERT INTO concession_event (holder_id, op, kind_before, kind_after, rides_left, terminal_id,
                                         operator, request_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        holder_id,
        op,
        before,
        after,
        rides_left,
        actor.terminal_id,
        actor.operator,
        actor.request_id,
    )


def _local_today(table: fares.FareTable, now: dt.datetime) -> dt.date:
    return fares.local_day(table, int(now.timestamp()))


async def get_concession(
    conn: asyncpg.Connection, table: fares.FareTable, holder_id: int, now: dt.datetime
) -> dict[str, Any]:
    if await conn.fetchval("SELECT 1 FROM cardholder WHERE holder_id = $1", holder_id) is None:
        raise ApiError("not_found", "no cardholder with this id", field="holder_id")
    row = await conn.fetchrow(_ROW, holder_id)
    return _view(holder_id, row, table, _year(table, now, row))


async def set_concession(
    conn: asyncpg.Connection,
    vault: PiiVault,
    table: fares.FareTable,
    holder_id: int,
    kind: str,
    actor: Actor,
    now: dt.datetime,
) -> dict[str, Any]:
    """Register (or change) the holder's concession. The year's elderly ride count is kept."""
    async with _locked(conn, table, holder_id, now) as (holder, before, year):
        if kind == ELDERLY:
            born = idnumber.birth_date_of(vault.open_id_number(bytes(holder["id_cipher"])))
            if idnumber.age_on(born, _local_today(table, now)) < table.rules.elderly_min_age:
                raise ApiError(
                    "concession_not_eligible",
                    f"the elderly concession starts at {table.rules.elderly_min_age}",
                    field="kind",
                )
        await conn.execute(
            """INSERT INTO concession (holder_id, kind) VALUES ($1, $2)
               ON CONFLICT (holder_id) DO UPDATE SET kind = EXCLUDED.kind, ended_at = NULL, updated_at = now()""",
            holder_id,
            kind,
        )
        row = await conn.fetchrow(_ROW, holder_id)
        assert row is not None
        old_kind = before["kind"] if before is not None and before["ended_at"] is None else None
        await _event(conn, holder_id, "set", old_kind, kind, _rides_left(row, table, year), actor)
    return _view(holder_id, row, table, year)


async def grant_extra_quota(
    conn: asyncpg.Connection, table: fares.FareTable, holder_id: int, actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    """The elderly extra rides, once per calendar year, on top of what is left of this year's quota."""
    async with _locked(conn, table, holder_id, now) as (_, row, year):
        if row is None or row["ended_at"] is not None or row["kind"] != ELDERLY:
            raise ApiError("no_elderly_concession", field="holder_id")
        if row["extra_year"] == year:
            raise ApiError("extra_quota_granted", f"already granted for {year}")
        rides = (_rides_left(row, table, year) or 0) + table.rules.elderly_extra_quota
        await conn.execute(
            """UPDATE concession SET rides_left = $2, quota_year = $3, extra_year = $3, updated_at = now()
               WHERE holder_id = $1""",
            holder_id,
            rides,
            year,
        )
        await _event(conn, holder_id, "extra_quota", ELDERLY, ELDERLY, rides, actor)
        row = await conn.fetchrow(_ROW, holder_id)
    return _view(holder_id, row, table, year)


async def end_concession(
    conn: asyncpg.Connection, table: fares.FareTable, holder_id: int, actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    """End the holder's concession: their next tap pays the card fare. Answers the concession as it was."""
    async with _locked(conn, table, holder_id, now) as (_, row, year):
        ended = _view(holder_id, row, table, year)  # 404 when there is none
        await conn.execute(
            "UPDATE concession SET ended_at = now(), updated_at = now() WHERE holder_id = $1", holder_id
        )
        await _event(conn, holder_id, "end", ended["kind"], None, ended["elderly_rides_left"], actor)
    return ended


_RETURNED_SQL = """
SELECT holder_id, quota_year, rides_left, reason, at FROM quota_ride_return WHERE card_id = $1 AND fare_txn_id = $2
"""


def _returned_view(fare_txn: int, row: asyncpg.Record, replayed: bool) -> dict[str, Any]:
    return {
        "result": "approved",
        "corrects_txn_id": fare_txn,
        "holder_id": row["holder_id"],
        "quota_year": row["quota_year"],
        "elderly_rides_left": row["rides_left"],
        "reason": row["reason"],
        "replayed_answer": replayed,
    }


async def return_quota_ride(
    conn: asyncpg.Connection,
    table: fares.FareTable,
    card_no: str,
    body: dict[str, Any],
    actor: Actor,
    now: dt.datetime,
) -> dict[str, Any]:
    """Give the elderly quota ride that fare `body["txn_id"]` of card `card_no` used back to its holder's
    quota (of the local year the ride was charged in, which must still be the quota's year), once per fare.

    Holds the holder's purse locks and concession row like every other change here, so it serialises with
    the holder's taps (whose compare-and-set on the quota then runs again) and with a second return of the
    same ride, which finds the first. Idempotent per (terminal, `terminal_seq`) in the card office's key
    space of top-ups and fare corrections (kept for good in topup_key)."""
    digest = request_hash({**body, "card_no": card_no, "op": "quota_ride_return"})
    fare_txn: int = body["txn_id"]
    card_row = await conn.fetchrow("SELECT card_id, holder_id FROM card WHERE card_no = $1", card_no)
    if card_row is None or card_row["holder_id"] is None:
        raise ApiError("not_found", "no such card")
    card_id: int = card_row["card_id"]
    holder_id: int = card_row["holder_id"]
    async with _locked(conn, table, holder_id, now) as (_, row, year):
        if await prior_office_answer(conn, actor.terminal_id, body["terminal_seq"], digest) is not None:
            done = await conn.fetchrow(_RETURNED_SQL, card_id, fare_txn)
            assert done is not None, "a quota ride return's key without its row"
            return _returned_view(fare_txn, done, True)
        fare = await conn.fetchrow(
            "SELECT quota_ride, quota_year, posted_at FROM txn_journal WHERE card_id = $1 AND txn_id = $2",
            card_id,
            fare_txn,
        )
        if fare is None:
            raise ApiError("not_found", f"card {card_no} has no transaction {fare_txn}", field="txn_id")
        if not fare["quota_ride"]:
            raise ApiError("no_quota_ride", "this transaction did not use an elderly quota ride", field="txn_id")
        done = await conn.fetchrow(_RETURNED_SQL, card_id, fare_txn)
        if done is not None:
            raise ApiError(
                "quota_ride_returned", f"given back at {done['at'].isoformat()}", field="txn_id"
            )
        # The quota the ride used, as its row says (migration 0024): mostly the year it was charged in (a
        # ride of 31 December uploaded on 2 January used the new year's, docs/fares.md "Elderly quota"), but
        # a batch posted on 31 December that waited for its locks past a change after midnight used the new
        # year's. A quota ride written before the column has the year of its posting. Once the holder's
        # quota has moved on to a later year (or the office's clock has: the next ride starts it afresh),
        # that quota is closed.
        ride_year: int = fare["quota_year"] or fares.local_day(table, int(fare["posted_at"].timestamp())).year
        if row is None or row["quota_year"] != ride_year or year != ride_year:
            raise ApiError(
                "quota_year_ended",
                f"the ride was in {ride_year}; rides are given back to that year's quota only",
                field="txn_id",
            )
        rides = max(0, row["rides_left"] or 0) + 1
        await conn.execute(
            "UPDATE concession SET rides_left = $2, updated_at = now() WHERE holder_id = $1", holder_id, rides
        )
        await _event(conn, holder_id, "ride_back", row["kind"], row["kind"], rides, actor)
        done = await conn.fetchrow(
            """INSERT INTO quota_ride_return (card_id, fare_txn_id, holder_id, quota_year, rides_left, reason,
                                              terminal_id, terminal_seq, staff)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               RETURNING holder_id, quota_year, rides_left, reason, at""",
            card_id, fare_txn, holder_id, ride_year, rides, body["reason"], actor.terminal_id,
            body["terminal_seq"], actor.operator or "",
        )  # fmt: skip
        balance = await conn.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id)
        # The key in the card office's key space: no money moved (amount 0), the answer names the ride.
        await record_office_key(
            conn, actor, body["terminal_seq"], digest, card_id, 0, balance or 0, fare_txn
        )
    metrics.QUOTA_RIDES_RETURNED.labels(body["reason"]).inc()
    return _returned_view(fare_txn, done, False)
