"""Taps that share a batch (real PostgreSQL): one flush at a time (database pool of 2), held by a tap
whose purse another connection has locked, so that the taps sent meanwhile queue and go in one batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from cardsvc.config import Settings, load_settings
from tests.helpers import ServiceHarness, until_lock_waits
from tests.transit.test_taps import funded_card, tap_body


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({}, data_dir=tmp_path, db_pool_min=1, db_pool_max=2, log_format="text")


async def test_retries_of_one_declined_tap_in_one_batch_each_get_its_reason(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    broke = await funded_card(svc, 0)
    body = tap_body(svc, broke["card_sn"])
    first = await svc.post("/v1/transit/taps", body, as_="transit_validator")
    assert (first.body["result"], first.body["reason"]) == ("declined", "insufficient_balance"), first.body
    other = await funded_card(svc, 1000)
    blocker = await asyncpg.connect(svc.dsn)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", other["card_id"])
            holding = asyncio.ensure_future(
                svc.post("/v1/transit/taps", tap_body(svc, other["card_sn"]), as_="transit_validator")
            )
            await until_lock_waits(db)  # the only flush waits: the retries below queue together
            retries = [
                asyncio.ensure_future(svc.post("/v1/transit/taps", body, as_="transit_validator")) for _ in range(3)
            ]
            await asyncio.sleep(0.2)  # let them reach the queue
        answers = await asyncio.gather(*retries)
        assert (await holding).status == 200
    finally:
        await blocker.close()
    assert [(r.status, r.body["result"], r.body["reason"], r.body["replayed_answer"]) for r in answers] == [
        (200, "declined", "insufficient_balance", True)
    ] * 3
