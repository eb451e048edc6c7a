"""The elderly quota under concurrency: tap batches of one holder queued on its purse lock, and a tap
whose batch took its clock before local New Year while the card office granted the new year's extra rides."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cardsvc.config import Settings, load_settings
from cardsvc.errors import ApiError
from cardsvc.flows.actor import Actor
from cardsvc.http.keys import SERVICES
from cardsvc.transit import concessions
from tests.helpers import ServiceHarness, until_lock_waits
from tests.transit.test_concessions import (
    BUS_FARE,
    EXTRA,
    QUOTA,
    TABLE,
    _seq,
    bus_tap,
    local_today,
    new_year_since,
    rider,
    url,
    years_ago,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """As tests/conftest.py, with room for 8 tap batches in flight (a batcher flush holds a connection)."""
    return load_settings({}, data_dir=tmp_path, db_pool_min=1, db_pool_max=16, log_format="text", access_log="all")


def card_tap(svc: ServiceHarness, card_sn: str, now: int) -> dict[str, Any]:
    return {"terminal_seq": next(_seq), "time": now, "mode": "bus", "line_id": "bus-105", "direction": "single",
            "credential": "card", **svc.card_auth_body(card_sn)}  # fmt: skip


def local_new_year(year: int, seconds: int = 0) -> dt.datetime:
    """`seconds` after local midnight starting 1 January `year` (the fare table's UTC offset), as UTC."""
    midnight = dt.datetime(year, 1, 1, tzinfo=dt.UTC) - dt.timedelta(seconds=TABLE.rules.utc_offset_s)
    return midnight + dt.timedelta(seconds=seconds)


async def test_batches_of_one_elderly_holder_queued_on_its_purse_lock_are_all_answered(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Five tap batches of one elderly holder wait for the purse lock (several gates uploading one rider's
    rides at once). Each reads the quota as it is once the lock is its turn, so none fails its
    compare-and-set: before, the fourth and fifth ran out of attempts and answered 500, together with
    another rider's tap in the same batch."""
    year = local_today().year
    c = await rider(svc, db, years_ago(70))
    other = await rider(svc, db, years_ago(30))
    assert (await svc.put(url(c), {"kind": "elderly"})).status == 200
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    now = int(time.time())
    tasks = []
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)  # the office, say
        for n in range(1, 6):
            tasks.append(asyncio.create_task(
                svc.post("/v1/transit/taps", card_tap(svc, c["card_sn"], now), as_="transit_validator")))
            if n == 5:
                tasks.append(asyncio.create_task(
                    svc.post("/v1/transit/taps", card_tap(svc, other["card_sn"], now), as_="transit_validator")))
            await until_lock_waits(db, n)  # one batch per tap: each is waiting before the next is sent
    out = await asyncio.gather(*tasks)  # fmt: skip
    answers = [(o.status, o.body.get("result"), o.body.get("fare_fen")) for o in out]
    assert answers[:5] == [(200, "approved", 0)] * 5 and answers[5][:2] == (200, "approved"), answers
    left = await db.fetchval("SELECT rides_left FROM concession WHERE holder_id = $1", c["holder_id"])
    assert left == QUOTA - 5 or new_year_since(year), left
    assert await svc.balance(c["card_no"]) == 2000


async def test_a_tap_batch_from_before_local_new_year_keeps_the_new_years_extra_rides(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A tap batch takes its clock (still year Y) before it waits for the purse lock; meanwhile the card
    office, at 00:00:01 on 1 January Y+1, grants the new year's extra rides and commits. The tap counts in
    the new year's quota: before, it wrote the quota back into year Y, and the holder lost the 300 rides
    for good (asking again: 409 extra_quota_granted)."""
    c = await rider(svc, db, years_ago(80))
    assert (await svc.put(url(c), {"kind": "elderly"})).status == 200
    assert (await bus_tap(svc, c["card_sn"]))["fare_fen"] == 0  # this year: QUOTA - 1 left
    # This year is the one that tap counted in, as recorded (a clock read now may be past New Year).
    year = await db.fetchval("SELECT quota_year FROM concession WHERE holder_id = $1", c["holder_id"])
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    async with db.transaction():  # the office's way: the holder's purse locks, then the change
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        tap = asyncio.create_task(bus_tap(svc, c["card_sn"]))
        await until_lock_waits(db)
        granted = await concessions.grant_extra_quota(
            db, TABLE, c["holder_id"], Actor("office"), local_new_year(year + 1, 1)
        )
        assert (granted["year"], granted["elderly_rides_left"]) == (year + 1, QUOTA + EXTRA)
    assert (await tap)["fare_fen"] == 0
    row = await db.fetchrow("SELECT quota_year, rides_left, extra_year FROM concession WHERE holder_id = $1",
                            c["holder_id"])  # fmt: skip
    assert dict(row) == {"quota_year": year + 1, "rides_left": QUOTA + EXTRA - 1, "extra_year": year + 1}
    view = await concessions.get_concession(db, TABLE, c["holder_id"], local_new_year(year + 1, 60))
    assert (view["elderly_rides_left"], view["extra_quota_granted"]) == (QUOTA + EXTRA - 1, True)
    with pytest.raises(ApiError) as refused:  # granted once this year, and it is still there
        await concessions.grant_extra_quota(db, TABLE, c["holder_id"], Actor("office"), local_new_year(year + 1, 120))
    assert refused.value.code == "extra_quota_granted"


@pytest.mark.parametrize("kind", ["disabled_free", "disabled_half"])
async def test_a_disability_concession_ended_while_a_tap_waits_is_not_applied(
    svc: ServiceHarness, db: asyncpg.Connection, kind: str
) -> None:
    """The card office ends a disability concession (holding the purse lock, as it does) while a tap waits
    for that lock: the tap, decided after the end committed, pays the card fare."""
    c = await rider(svc, db, years_ago(40))
    assert (await svc.put(url(c), {"kind": kind})).status == 200
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        pending = asyncio.create_task(bus_tap(svc, c["card_sn"]))
        await until_lock_waits(db)
        ended = await concessions.end_concession(db, TABLE, c["holder_id"], Actor("office"), dt.datetime.now(dt.UTC))
        assert ended["kind"] == kind
    body = await pending
    assert body["fare_fen"] == BUS_FARE and kind not in body["rules"], body


async def test_a_concession_registered_while_a_tap_waits_applies_to_it(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The card office registers the elderly concession (holding the purse lock) while a tap waits for that
    lock: the tap, decided after the registration committed, rides free on the new quota."""
    c = await rider(svc, db, years_ago(70))
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        pending = asyncio.create_task(bus_tap(svc, c["card_sn"]))
        await until_lock_waits(db)
        registered = await concessions.set_concession(
            db, svc.app[SERVICES].vault, TABLE, c["holder_id"], "elderly", Actor("office"), dt.datetime.now(dt.UTC)
        )
        assert registered["kind"] == "elderly"
    body = await pending
    assert body["fare_fen"] == 0 and "elderly_free" in body["rules"], body
    assert await db.fetchval("SELECT rides_left FROM concession WHERE holder_id = $1", c["holder_id"]) == QUOTA - 1
