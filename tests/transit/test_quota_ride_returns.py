"""Elderly quota rides given back (POST /v1/purses/{card_no}/quota-ride-returns): a ride that used one of
the holder's free rides wrongly costs nothing, so the card office gives the ride itself back to the quota of
the ride's year, once per ride, even when clerks send it at once or while the holder rides; a retry replays
the answer; a refused request changes nothing; `cardsvc audit` checks the returns.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import types
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cardsvc.audit import run_audit
from cardsvc.config import Settings
from cardsvc.transit import taps as taps_mod
from tests.helpers import ServiceHarness
from tests.transit.test_concessions import (
    BUS_FARE,
    QUOTA,
    bus_tap,
    events,
    local_today,
    new_year_since,
    rider,
    url,
    years_ago,
)
from tests.transit.test_corrections import TABLE

_seq = itertools.count(7_000_000)


def give_back(txn_id: int, *, seq: int | None = None, reason: str = "terminal_fault") -> dict[str, Any]:
    return {"terminal_seq": next(_seq) if seq is None else seq, "txn_id": txn_id, "reason": reason,
            "operator": "clerk-9"}  # fmt: skip


def path(c: dict[str, Any]) -> str:
    return f"/v1/purses/{c['card_no']}/quota-ride-returns"


async def elderly(svc: ServiceHarness, db: asyncpg.Connection) -> dict[str, Any]:
    c = await rider(svc, db, years_ago(75))
    assert (await svc.put(url(c), {"kind": "elderly", "operator": "staff-1"})).status == 200
    c["card_id"] = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    return c


async def rides_left(db: asyncpg.Connection, c: dict[str, Any]) -> int:
    value: int = await db.fetchval("SELECT rides_left FROM concession WHERE holder_id = $1", c["holder_id"])
    return value


async def state(db: asyncpg.Connection, c: dict[str, Any]) -> tuple[Any, ...]:
    """Everything a return may change: the concession row, its events, the returns, the card's journal and
    purse, the office's keys."""
    return (
        tuple(
            await db.fetchrow(
                "SELECT rides_left, quota_year, ended_at FROM concession WHERE holder_id = $1", c["holder_id"]
            )
            or ()
        ),
        len(await events(db, c["holder_id"])),
        await db.fetchval("SELECT count(*) FROM quota_ride_return"),
        await db.fetchval(
            "SELECT count(*) FROM txn_journal j JOIN card k USING (card_id) WHERE k.holder_id = $1",
            c["holder_id"],
        ),
        await db.fetchval(
            "SELECT balance_fen FROM purse p JOIN card k USING (card_id) WHERE k.card_no = $1", c["card_no"]
        ),
        await db.fetchval("SELECT count(*) FROM topup_key"),
    )


async def counted(svc: ServiceHarness) -> dict[str, float]:
    r = await svc.request("GET", "/metrics", sign=False)
    assert r.status == 200
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(r.body)
        for s in family.samples
        if s.name == "cardsvc_transit_quota_rides_returned_total"
    }


async def test_a_quota_ride_given_back_goes_back_to_the_holders_quota_once(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    year = local_today().year
    c = await elderly(svc, db)
    first, second = await bus_tap(svc, c["card_sn"]), await bus_tap(svc, c["card_sn"])  # a double tap
    assert first["fare_fen"] == second["fare_fen"] == 0 and "elderly_free" in second["rules"], second
    history = (await svc.get(f"/v1/purses/{c['card_no']}", as_="ops")).body["history"]
    used = {h["txn_id"] for h in history if h.get("quota_ride")}
    assert used == {first["txn_id"], second["txn_id"]}, history
    purse_before = await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", c["card_id"])
    journal_before = await db.fetchval("SELECT count(*) FROM txn_journal WHERE card_id = $1", c["card_id"])
    seen = await counted(svc)

    body = give_back(second["txn_id"])
    r = await svc.post(path(c), body)
    assert r.status == 200, r.body
    if not new_year_since(year):
        assert r.body == {"result": "approved", "corrects_txn_id": second["txn_id"], "holder_id": c["holder_id"],
                          "quota_year": year, "elderly_rides_left": QUOTA - 1, "reason": "terminal_fault",
                          "replayed_answer": False}  # fmt: skip
        assert await rides_left(db, c) == QUOTA - 1
        shown = (await svc.get(url(c), as_="ops")).body
        assert shown["elderly_rides_left"] == QUOTA - 1, shown
    # No money moved: no journal row, the same balance.
    assert (
        await db.fetchval("SELECT count(*) FROM txn_journal WHERE card_id = $1", c["card_id"])
        == journal_before
    )
    assert await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", c["card_id"]) == purse_before
    assert (await events(db, c["holder_id"]))[-1] == (
        "ride_back", "elderly", "elderly", r.body["elderly_rides_left"], "clerk-9",
    )  # fmt: skip
    assert (await counted(svc)).get("terminal_fault", 0) == seen.get("terminal_fault", 0) + 1

    # The same request again: the stored answer, nothing more given back.
    again = await svc.post(path(c), body)
    assert again.status == 200 and again.body == {**r.body, "replayed_answer": True}, again.body
    assert await rides_left(db, c) == r.body["elderly_rides_left"]
    # The same ride under another key: once per ride.
    twice = await svc.post(path(c), give_back(second["txn_id"]))
    assert twice.status == 409 and twice.body["code"] == "quota_ride_returned", twice.body
    # The key reused for the other ride, or for a top-up: a different request under one key.
    other = await svc.post(path(c), give_back(first["txn_id"], seq=body["terminal_seq"]))
    assert other.status == 409 and other.body["code"] == "idempotency_conflict", other.body
    topup = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": body["terminal_seq"], "amount_fen": 100, "channel": "cash", "operator": "clerk-9"},
    )
    assert topup.status == 409 and topup.body["code"] == "idempotency_conflict", topup.body
    assert await rides_left(db, c) == r.body["elderly_rides_left"]
    assert (await counted(svc)).get("terminal_fault", 0) == seen.get("terminal_fault", 0) + 1

    _, checks = await run_audit(db, settings, TABLE)
    by_name = {ch.name: ch for ch in checks}
    assert all(ch.ok for ch in checks), [ch.line() for ch in checks if not ch.ok]
    assert by_name["quota_ride_returns"].counts["returns"] >= 1


async def test_only_a_ride_that_used_a_quota_ride_is_given_back(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A paid fare, a free ride that used no quota (disabled_free), a ride paid once the quota ran out, a
    top-up, another card's ride and an unknown transaction: each refused with its code, nothing changed."""
    payer = await rider(svc, db, years_ago(40))
    paid = await bus_tap(svc, payer["card_sn"])
    assert paid["fare_fen"] == BUS_FARE, paid
    disabled = await rider(svc, db, years_ago(40))
    assert (await svc.put(url(disabled), {"kind": "disabled_free"})).status == 200
    free = await bus_tap(svc, disabled["card_sn"])
    assert free["fare_fen"] == 0, free
    old = await elderly(svc, db)
    used = await bus_tap(svc, old["card_sn"])
    await db.execute("UPDATE concession SET rides_left = 0 WHERE holder_id = $1", old["holder_id"])
    over = await bus_tap(svc, old["card_sn"])
    assert over["fare_fen"] == BUS_FARE, over
    topup_txn = await db.fetchval(
        "SELECT max(txn_id) FROM txn_journal j JOIN card k USING (card_id) WHERE k.card_no = $1 AND j.kind = 3",
        old["card_no"],
    )

    cases = [
        (payer, paid["txn_id"], 409, "no_quota_ride"),
        (disabled, free["txn_id"], 409, "no_quota_ride"),
        (old, over["txn_id"], 409, "no_quota_ride"),
        (old, topup_txn, 409, "no_quota_ride"),
        (payer, used["txn_id"], 404, "not_found"),  # the elderly holder's ride, named on another card
        (old, 9_000_000_000, 404, "not_found"),
    ]
    for c, txn, status, code in cases:
        before = await state(db, c)
        r = await svc.post(path(c), give_back(txn))
        assert (r.status, r.body["code"]) == (status, code), (txn, r.body)
        assert await state(db, c) == before, (txn, code)
    for bad, code in (({"txn_id": used["txn_id"], "reason": "goodwill", "operator": "x"}, "missing_field"),
                      ({**give_back(used["txn_id"]), "rides": 2}, "unknown_field"),
                      ({**give_back(used["txn_id"]), "reason": "because"}, "invalid_field")):  # fmt: skip
        r = await svc.post(path(old), bad)
        assert r.status == 400 and r.body["code"] == code, r.body
    r = await svc.post("/v1/purses/T99999999/quota-ride-returns", give_back(used["txn_id"]))
    assert r.status == 404 and r.body["code"] == "not_found", r.body
    # Only the card office gives rides back.
    r = await svc.post(path(old), give_back(used["txn_id"]), as_="ops")
    assert r.status == 403 and r.body["code"] == "forbidden_operation", r.body
    assert await db.fetchval("SELECT count(*) FROM quota_ride_return WHERE card_id = $1", old["card_id"]) == 0


async def test_a_ride_of_a_year_whose_quota_is_over_is_not_given_back(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Rides do not carry over: once the holder's quota has moved to a new year (a ride after local New Year
    started it), a ride of the old year is not given back to it."""
    c = await elderly(svc, db)
    ride = await bus_tap(svc, c["card_sn"])
    await db.execute(
        "UPDATE concession SET quota_year = quota_year + 1, rides_left = $2 WHERE holder_id = $1",
        c["holder_id"], QUOTA - 5,
    )  # fmt: skip
    before = await state(db, c)
    r = await svc.post(path(c), give_back(ride["txn_id"]))
    assert r.status == 409 and r.body["code"] == "quota_year_ended", r.body
    assert await state(db, c) == before


async def test_a_ride_posted_in_the_old_year_on_the_new_years_quota_is_given_back_to_that_quota(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A tap batch whose transaction began on 31 December waits for a purse lock; meanwhile a change after
    midnight (another ride, the extra rides) starts the holder's new-year quota. The batch then takes the
    ride from the new year's quota, but posts it in the old year. The card office read the ride's year from
    its posting and refused to give it back (`quota_year_ended`); the fare row now names the quota year it
    used (migration 0024). Here the concession is moved a year ahead before the ride, as that change
    leaves it."""
    c = await elderly(svc, db)
    year = await db.fetchval("SELECT extract(year FROM now() AT TIME ZONE 'Asia/Shanghai')::int")
    await db.execute(
        "UPDATE concession SET quota_year = $2, rides_left = $3 WHERE holder_id = $1",
        c["holder_id"], year + 1, QUOTA - 5,
    )  # fmt: skip
    ride = await bus_tap(svc, c["card_sn"])
    assert ride["fare_fen"] == 0 and "elderly_free" in ride["rules"], ride
    assert await rides_left(db, c) == QUOTA - 6
    row = await db.fetchrow("SELECT quota_ride, quota_year FROM txn_journal WHERE txn_id = $1", ride["txn_id"])
    assert tuple(row) == (True, year + 1)
    r = await svc.post(path(c), give_back(ride["txn_id"]))
    assert r.status == 200 and r.body["quota_year"] == year + 1, r.body
    assert await rides_left(db, c) == QUOTA - 5
    # A ride on the card fare (the concession ended) names no quota year.
    assert (await svc.post(url(c, "/end"), {})).status == 200
    paid = await bus_tap(svc, c["card_sn"])
    assert paid["fare_fen"] == BUS_FARE, paid
    row = await db.fetchrow("SELECT quota_ride, quota_year FROM txn_journal WHERE txn_id = $1", paid["txn_id"])
    assert tuple(row) == (None, None)


async def test_a_ride_whose_batch_waited_into_the_new_year_uses_and_gets_back_that_years_quota(
    svc: ServiceHarness, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap batch that read the clock at 23:59:59 on 31 December and began its transaction after midnight
    posts its fare in the new year (`posted_at`, the transaction's time). Its quota year was the worker's
    clock's, the old year: the card office, which reads the ride's year from `posted_at`, then refused to
    give the ride back (`quota_year_ended`) to the quota it had used. The batch now judges at its
    transaction's time. Here the worker's clock reads last year's last second, as if the batch had waited
    a year for its connection."""
    c = await elderly(svc, db)
    year = await db.fetchval("SELECT extract(year FROM now() AT TIME ZONE 'Asia/Shanghai')::int")

    class LastYear(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            return dt.datetime(year - 1, 12, 31, 15, 59, 59, tzinfo=dt.UTC)  # 23:59:59 in UTC+8

    clock = types.SimpleNamespace(**{k: getattr(dt, k) for k in dir(dt) if not k.startswith("__")})
    clock.datetime = LastYear
    monkeypatch.setattr(taps_mod, "dt", clock)
    ride = await bus_tap(svc, c["card_sn"])
    assert ride["fare_fen"] == 0 and "elderly_free" in ride["rules"], ride
    assert await db.fetchval("SELECT quota_year FROM concession WHERE holder_id = $1", c["holder_id"]) == year
    r = await svc.post(path(c), give_back(ride["txn_id"]))
    assert r.status == 200 and r.body["quota_year"] == year, r.body
    assert await rides_left(db, c) == QUOTA


async def test_an_ended_concession_keeps_the_ride_given_back(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The year's count survives an end (docs/transit.md "Concessions"), so a ride given back after it is
    there when the holder registers again."""
    year = local_today().year
    c = await elderly(svc, db)
    ride = await bus_tap(svc, c["card_sn"])
    assert (await svc.post(url(c, "/end"), {})).status == 200
    r = await svc.post(path(c), give_back(ride["txn_id"]))
    assert r.status == 200 and (r.body["elderly_rides_left"] == QUOTA or new_year_since(year)), r.body
    back = await svc.put(url(c), {"kind": "elderly"})
    assert back.status == 200 and (back.body["elderly_rides_left"] == QUOTA or new_year_since(year)), (
        back.body
    )


async def test_clerks_at_once_and_the_holder_riding_meanwhile_give_the_ride_back_once(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Six clerks give back one ride at once while the holder rides ten times: exactly one is approved, the
    others find it given back, and no ride's count is lost (each return and each tap sees the other's)."""
    year = local_today().year
    c = await elderly(svc, db)
    ride = await bus_tap(svc, c["card_sn"])
    start = await rides_left(db, c)
    returns = [svc.post(path(c), give_back(ride["txn_id"])) for _ in range(6)]
    taps = [bus_tap(svc, c["card_sn"]) for _ in range(10)]
    results = await asyncio.gather(*taps[:5], *returns, *taps[5:])
    answers = results[5:11]
    assert sorted(a.status for a in answers) == [200] + [409] * 5, [a.body for a in answers]
    assert all(a.body["code"] == "quota_ride_returned" for a in answers if a.status == 409)
    assert all(t["fare_fen"] == 0 for t in results[:5] + results[11:])
    assert await rides_left(db, c) == start + 1 - 10 or new_year_since(year)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM concession_event WHERE holder_id = $1 AND op = 'ride_back'", c["holder_id"]
        )
        == 1
    )
