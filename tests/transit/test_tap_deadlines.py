"""A tap's request deadline against its batch (real PostgreSQL).

A 503 `timeout` tells the validator that nothing happened and the tap may be sent again. So a tap still
queued when its deadline passes is taken out of the queue (never written), and a tap already in a batch
is answered with the batch's outcome, even after the deadline: the batch may commit whatever the request
does (cardsvc/store/batcher.py). Each test holds a purse lock from its own connection; the lock is
released well after the short deadline and well before the pool's lock_timeout (3 s).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from cardsvc.config import Settings, load_settings
from tests.helpers import ServiceHarness, until_lock_waits
from tests.transit.test_taps import funded_card, tap_body

DEADLINE_S = 0.25
HELD_S = 1.0  # the purse lock, past the deadline and under lock_timeout


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # db_pool_max 2: one tap flush at a time (flushes_max = pool // 2), so a second tap queues.
    return load_settings(
        {}, data_dir=tmp_path, db_pool_min=1, db_pool_max=2, log_format="text", request_timeout_s=DEADLINE_S
    )


async def _balance(db: asyncpg.Connection, card_id: int) -> int:
    return int(await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id))


async def _stored(db: asyncpg.Connection, seq: int) -> str | None:
    return await db.fetchval("SELECT result FROM terminal_txn WHERE terminal_seq = $1", seq)  # type: ignore[no-any-return]


async def test_a_tap_in_a_batch_is_answered_with_its_outcome_past_the_deadline(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 1000)
    body = tap_body(svc, c["card_sn"])
    blocker = await asyncpg.connect(svc.dsn)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", c["card_id"])
            pending = asyncio.ensure_future(svc.post("/v1/transit/taps", body, as_="transit_validator"))
            await until_lock_waits(db)  # its batch waits for the purse
            await asyncio.sleep(HELD_S)  # the deadline passes meanwhile
        r = await pending
    finally:
        await blocker.close()
    # Not "503, nothing changed, send again" for a debit that committed: the answer is the debit.
    assert r.status == 200 and (r.body["result"], r.body["fare_fen"]) == ("approved", 180), r.body
    assert (await _stored(db, body["terminal_seq"]), await _balance(db, c["card_id"])) == ("approved", 820)
    again = await svc.post("/v1/transit/taps", body, as_="transit_validator")
    assert again.status == 200 and again.body["replayed_answer"] is True, again.body
    assert await _balance(db, c["card_id"]) == 820


async def test_a_tap_still_queued_at_its_deadline_is_never_written(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    a = await funded_card(svc, 1000)
    b = await funded_card(svc, 1000)
    body_a, body_b = tap_body(svc, a["card_sn"]), tap_body(svc, b["card_sn"])
    blocker = await asyncpg.connect(svc.dsn)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", a["card_id"])
            first = asyncio.ensure_future(svc.post("/v1/transit/taps", body_a, as_="transit_validator"))
            await until_lock_waits(db)  # A's batch holds the only flush slot
            rb = await svc.post("/v1/transit/taps", body_b, as_="transit_validator")  # queued behind it
        ra = await first
    finally:
        await blocker.close()
    assert rb.status == 503 and rb.body["code"] == "timeout" and rb.headers.get("Retry-After"), rb.body
    assert ra.status == 200 and ra.body["result"] == "approved", ra.body
    # Once A's batch is done, the queue is empty: B's tap was taken out, not written after its 503.
    probe = await svc.post("/v1/transit/taps", tap_body(svc, a["card_sn"]), as_="transit_validator")
    assert probe.status == 200, probe.body
    assert (await _stored(db, body_b["terminal_seq"]), await _balance(db, b["card_id"])) == (None, 1000)
    # Sent again, as the 503 invited: charged once.
    rb = await svc.post("/v1/transit/taps", body_b, as_="transit_validator")
    assert rb.status == 200 and rb.body["result"] == "approved" and rb.body["replayed_answer"] is False, rb.body
    assert await _balance(db, b["card_id"]) == 820
