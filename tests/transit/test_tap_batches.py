"""Taps that share a batch (real PostgreSQL): one flush at a time (database pool of 2), held by a tap
whose purse another connection has locked, so that the taps sent meanwhile queue and go in one batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from cardsvc.config import Settings, load_settings
from tests.helpers import ServiceHarness, until_lock_waits
from tests.transit.test_taps import BUS_FARE, funded_card, tap_body


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


async def test_a_purse_held_past_the_lock_timeout_fails_only_its_own_tap(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A and B tap together while another transaction holds A's purse past lock_timeout (3 s): B is
    charged, A is answered 503 `timeout` with nothing written, and A sent again later is charged once."""
    a, b, c = [await funded_card(svc, 1000) for _ in range(3)]
    body_a, body_b = tap_body(svc, a["card_sn"]), tap_body(svc, b["card_sn"])
    holder, gate = await asyncpg.connect(svc.dsn), await asyncpg.connect(svc.dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", a["card_id"])
            async with gate.transaction():  # holds the only flush, so that A and B queue into one batch
                await gate.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", c["card_id"])
                first = asyncio.ensure_future(
                    svc.post("/v1/transit/taps", tap_body(svc, c["card_sn"]), as_="transit_validator")
                )
                await until_lock_waits(db)
                both = asyncio.gather(
                    svc.post("/v1/transit/taps", body_a, as_="transit_validator"),
                    svc.post("/v1/transit/taps", body_b, as_="transit_validator"),
                )
                await asyncio.sleep(0.2)  # let them reach the queue
            assert (await first).status == 200
            ra, rb = await both
        assert rb.status == 200 and rb.body["result"] == "approved", rb.body
        assert ra.status == 503 and ra.body["code"] == "timeout" and ra.headers.get("Retry-After"), ra.body
        assert await db.fetchval("SELECT count(*) FROM terminal_txn WHERE terminal_seq = $1", body_a["terminal_seq"]) == 0
        again = await svc.post("/v1/transit/taps", body_a, as_="transit_validator")
        assert again.status == 200 and again.body["result"] == "approved" and not again.body["replayed_answer"]
        balances = [await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", x["card_id"]) for x in (a, b)]
        assert balances == [820, 820]
    finally:
        await holder.close()
        await gate.close()


async def test_a_retry_of_an_answered_tap_gets_its_answer_while_another_transaction_holds_the_purse(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A validator that lost the answer sends the tap again while a card-office change holds the purse:
    the answer is already stored, so the retry is answered from it (no wait for the purse lock, no 503),
    and nothing is charged twice."""
    card = await funded_card(svc, 1000)
    body = tap_body(svc, card["card_sn"])
    first = await svc.post("/v1/transit/taps", body, as_="transit_validator")
    assert first.status == 200 and first.body["result"] == "approved", first.body
    holder = await asyncpg.connect(svc.dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card["card_id"])
            again = await svc.post("/v1/transit/taps", body, as_="transit_validator")
    finally:
        await holder.close()
    assert again.status == 200, again.body
    assert again.body["replayed_answer"] is True
    assert {k: v for k, v in again.body.items() if k != "replayed_answer"} == {
        k: v for k, v in first.body.items() if k != "replayed_answer"
    }
    assert await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card["card_id"]) == 1000 - BUS_FARE
