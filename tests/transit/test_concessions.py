"""Transit concessions managed by the card office: eligibility from the ID number's birth date, the
elderly quota shared by all of the holder's credentials, the extra rides once a year, ending without a
fresh quota, an append-only event per change, and no lost update between office changes and taps.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from typing import Any

import asyncpg
import pytest

from cardsvc.transit import fares
from tests.helpers import ServiceHarness, until_lock_waits

TABLE = fares.load_demo_table()
QUOTA = TABLE.rules.elderly_annual_quota
EXTRA = TABLE.rules.elderly_extra_quota
BUS_FARE = fares.card_price_fen(TABLE.bus_lines["bus-105"].fare_fen, TABLE.rules.card_discount_percent)
_seq = itertools.count(1)


def local_today() -> dt.date:
    """The fare table's local day now."""
    return fares.local_day(TABLE, int(time.time()))


def new_year_since(year: int) -> bool:
    """Whether local New Year has passed since the local year was `year` (a clock read now). The service
    reads its own clock for each request, so elderly ride counts made across New Year may start the new
    year's quota part way: the tests check their counts exactly unless this is so."""
    return local_today().year != year


def years_ago(years: int, days: int = 0, today: dt.date | None = None) -> dt.date:
    """The birth date of someone who turns `years` on `today` (default: the fare table's local day now;
    `days` > 0: that many days earlier)."""
    today = today or local_today()
    try:
        born = today.replace(year=today.year - years)
    except ValueError:  # 29 February: born the 28th, 65 since yesterday (on 1 March one would be 64 today)
        born = dt.date(today.year - years, 2, 28)
    return born - dt.timedelta(days=days)


async def rider(svc: ServiceHarness, db: asyncpg.Connection, birth: dt.date) -> dict[str, Any]:
    c = await svc.new_card(has_purse=True, birth=birth)
    c["holder_id"] = await db.fetchval("SELECT holder_id FROM card WHERE card_no = $1", c["card_no"])
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": next(_seq), "amount_fen": 2000, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    return c


async def bus_tap(svc: ServiceHarness, card_sn: str) -> dict[str, Any]:
    body = {
        "terminal_seq": next(_seq),
        "time": int(time.time()),
        "mode": "bus",
        "line_id": "bus-105",
        "direction": "single",
        "credential": "card",
        **svc.card_auth_body(card_sn),
    }
    r = await svc.post("/v1/transit/taps", body, as_="transit_validator")
    assert r.status == 200 and r.body["result"] == "approved", r.body
    return dict(r.body)


def url(c: dict[str, Any], tail: str = "") -> str:
    return f"/v1/holders/{c['holder_id']}/concession{tail}"


async def events(db: asyncpg.Connection, holder_id: int) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT op, kind_before, kind_after, rides_left, operator FROM concession_event WHERE holder_id = $1 "
        "ORDER BY event_id",
        holder_id,
    )
    return [tuple(r) for r in rows]


async def test_elderly_is_registered_from_the_minimum_age_and_rides_free_within_the_quota(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    today = local_today()
    young = await rider(svc, db, years_ago(TABLE.rules.elderly_min_age, days=-1, today=today))  # 65 tomorrow
    r = await svc.put(url(young), {"kind": "elderly", "operator": "staff-1"})
    if r.status == 200 and local_today() != today:
        # The office reads its own clock: local midnight passed after the birth date was chosen, and the
        # rider turned 65 as it looked. Someone 65 tomorrow is asked about in the new day.
        young = await rider(svc, db, years_ago(TABLE.rules.elderly_min_age, days=-1))
        r = await svc.put(url(young), {"kind": "elderly", "operator": "staff-1"})
    assert r.status == 422 and r.body["code"] == "concession_not_eligible", r.body
    assert await db.fetchval("SELECT count(*) FROM concession WHERE holder_id = $1", young["holder_id"]) == 0
    assert await events(db, young["holder_id"]) == []
    assert (await bus_tap(svc, young["card_sn"]))["fare_fen"] == BUS_FARE

    year = local_today().year
    old = await rider(svc, db, years_ago(TABLE.rules.elderly_min_age))  # 65 today
    r = await svc.put(url(old), {"kind": "elderly", "operator": "staff-1"})
    assert r.status == 200, r.body
    assert (r.body["kind"], r.body["elderly_rides_left"], r.body["extra_quota_granted"]) == ("elderly", QUOTA, False)
    ans = await bus_tap(svc, old["card_sn"])
    assert ans["fare_fen"] == 0 and "elderly_free" in ans["rules"], ans
    # The quota belongs to the holder: an e-card tap of the same holder counts against it too.
    device = await svc.new_ecard(old["card_no"])
    from protocols import ecard

    code = ecard.encode_code(device.make_code(int(time.time()), 7))
    r2 = await svc.post(
        "/v1/transit/taps",
        {"terminal_seq": next(_seq), "time": int(time.time()), "mode": "bus", "line_id": "bus-105",
         "direction": "single", "credential": "ecard_code", "code": code},
        as_="transit_validator",
    )  # fmt: skip
    assert r2.status == 200 and r2.body["fare_fen"] == 0, r2.body
    got = await svc.get(url(old), as_="ops")
    assert got.status == 200 and (got.body["elderly_rides_left"] == QUOTA - 2 or new_year_since(year)), got.body
    assert await svc.balance(old["card_no"]) == 2000
    assert await events(db, old["holder_id"]) == [("set", None, "elderly", QUOTA, "staff-1")]


async def test_extra_rides_once_a_year_and_only_for_the_elderly(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    year = local_today().year
    c = await rider(svc, db, years_ago(80))
    assert (await svc.put(url(c), {"kind": "elderly"})).status == 200
    await bus_tap(svc, c["card_sn"])
    r = await svc.post(url(c, "/extra-quota"), {"operator": "staff-2"})
    assert r.status == 200 and (r.body["elderly_rides_left"] == QUOTA - 1 + EXTRA or new_year_since(year)), r.body
    assert r.body["extra_quota_granted"] is True
    # Once a year: granted again only for a new year, if local New Year passed since the first grant.
    again = await svc.post(url(c, "/extra-quota"), {})
    assert (again.status == 409 and again.body["code"] == "extra_quota_granted") or (
        again.status == 200 and again.body["year"] == r.body["year"] + 1 and new_year_since(year)
    ), again.body
    left = (await svc.get(url(c), as_="ops")).body["elderly_rides_left"]
    assert left == QUOTA - 1 + EXTRA or new_year_since(year), left

    d = await rider(svc, db, years_ago(30))
    assert (await svc.put(url(d), {"kind": "disabled_half"})).status == 200
    r = await svc.post(url(d, "/extra-quota"), {})
    assert r.status == 422 and r.body["code"] == "no_elderly_concession", r.body
    ans = await bus_tap(svc, d["card_sn"])
    assert ans["fare_fen"] == fares.half_price_fen(TABLE.bus_lines["bus-105"].fare_fen), ans


async def test_ending_and_registering_again_continues_the_years_count(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    year = local_today().year
    c = await rider(svc, db, years_ago(70))
    assert (await svc.put(url(c), {"kind": "elderly"})).status == 200
    for _ in range(3):
        await bus_tap(svc, c["card_sn"])
    ended = await svc.post(url(c, "/end"), {"operator": "staff-3"})
    assert ended.status == 200 and (ended.body["elderly_rides_left"] == QUOTA - 3 or new_year_since(year)), ended.body
    assert (await svc.get(url(c), as_="ops")).status == 404
    assert (await bus_tap(svc, c["card_sn"]))["fare_fen"] == BUS_FARE  # ended: the card fare again
    assert (await svc.post(url(c, "/end"), {})).status == 404
    back = await svc.put(url(c), {"kind": "elderly"})
    assert back.status == 200, back.body
    assert back.body["elderly_rides_left"] == QUOTA - 3 or new_year_since(year), back.body  # not a fresh 1,200
    assert [e[:3] for e in await events(db, c["holder_id"])] == [
        ("set", None, "elderly"),
        ("end", "elderly", None),
        ("set", None, "elderly"),
    ]
    # The events are append-only.
    try:
        await db.execute("DELETE FROM concession_event WHERE holder_id = $1", c["holder_id"])
        raise AssertionError("concession_event accepted a DELETE")
    except asyncpg.InsufficientPrivilegeError:
        pass


async def test_taps_and_an_extra_quota_grant_at_once_lose_no_update(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    year = local_today().year
    c = await rider(svc, db, years_ago(75))
    assert (await svc.put(url(c), {"kind": "elderly"})).status == 200
    taps = [bus_tap(svc, c["card_sn"]) for _ in range(12)]
    results = await asyncio.gather(*taps[:6], svc.post(url(c, "/extra-quota"), {}), *taps[6:])
    grant = results[6]
    assert grant.status == 200, grant.body
    left = await db.fetchval("SELECT rides_left FROM concession WHERE holder_id = $1", c["holder_id"])
    assert left == QUOTA + EXTRA - 12 or new_year_since(year), left
    shown = (await svc.get(url(c), as_="ops")).body["elderly_rides_left"]
    assert shown == QUOTA + EXTRA - 12 or new_year_since(year), shown


@pytest.mark.parametrize(
    ("change", "fare", "left"),
    [
        ("UPDATE concession SET rides_left = rides_left + $2, extra_year = quota_year WHERE holder_id = $1",
         0, QUOTA + EXTRA - 2),
        ("UPDATE concession SET ended_at = now() WHERE holder_id = $1 AND $2::int IS NOT NULL",
         BUS_FARE, QUOTA - 1),
    ],
    ids=["extra-quota", "end"],
)
async def test_an_office_change_committed_while_a_tap_waits_for_the_purse_lock_is_not_overwritten(
    svc: ServiceHarness, db: asyncpg.Connection, change: str, fare: int, left: int
) -> None:
    """The card office's way: hold the holder's purse locks, change the concession, commit. A tap whose
    statement began before that commit and then waited for the purse lock must decide on the new row."""
    year = local_today().year
    c = await rider(svc, db, years_ago(75))
    assert (await svc.put(url(c), {"kind": "elderly"})).status == 200
    assert (await bus_tap(svc, c["card_sn"]))["fare_fen"] == 0  # the quota row now holds a count
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        tap = asyncio.create_task(bus_tap(svc, c["card_sn"]))
        await until_lock_waits(db)
        await db.execute(change, c["holder_id"], EXTRA)
    body = await tap
    assert body["fare_fen"] == fare, body
    row = await db.fetchrow("SELECT rides_left, ended_at FROM concession WHERE holder_id = $1", c["holder_id"])
    assert row["rides_left"] == left or new_year_since(year), dict(row)


async def test_bad_requests_change_nothing(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await rider(svc, db, years_ago(70))
    r = await svc.put(url(c), {"kind": "veteran"})
    assert r.status == 400 and r.body["code"] == "invalid_field" and r.body["field"] == "kind", r.body
    r = await svc.put(url(c), {"kind": "elderly", "discount": 100})
    assert r.status == 400 and r.body["code"] == "unknown_field", r.body
    r = await svc.put("/v1/holders/abc/concession", {"kind": "elderly"})
    assert r.status == 400 and r.body["code"] == "invalid_parameter", r.body
    r = await svc.put("/v1/holders/999999999/concession", {"kind": "elderly"})
    assert r.status == 404 and r.body["code"] == "not_found", r.body
    # Only the card office manages concessions; ops and agencies may read them.
    r = await svc.put(url(c), {"kind": "elderly"}, as_="ops")
    assert r.status == 403 and r.body["code"] == "forbidden_operation", r.body
    assert await db.fetchval("SELECT count(*) FROM concession WHERE holder_id = $1", c["holder_id"]) == 0
    assert await events(db, c["holder_id"]) == []
