"""A terminal's hotlist poll (GET /v1/hotlist) while loss reports commit beside it: one statement reads
the head and the changes in one snapshot and records what the terminal holds (cardsvc/flows/hotlist.py)."""

from __future__ import annotations

import asyncio

import asyncpg

from protocols import hotlist
from tests.helpers import ServiceHarness


async def _held(db: asyncpg.Connection, terminal_id: str) -> int | None:
    version: int | None = await db.fetchval(
        "SELECT version FROM terminal_hotlist WHERE terminal_id = $1", terminal_id
    )
    return version


async def test_polls_during_loss_reports_see_every_change_once_in_order(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    cards = [await svc.new_card() for _ in range(12)]
    gate = svc.terminals["transit_validator"].terminal_id
    reported = False
    entries: list[hotlist.HotlistEntry] = []

    async def report_losses() -> None:
        nonlocal reported
        answers = await asyncio.gather(
            *(svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {}) for c in cards)
        )
        assert [a.status for a in answers] == [200] * len(cards)
        reported = True

    async def poll() -> None:
        since = 0
        while True:
            r = await svc.get(f"/v1/hotlist?since={since}&limit=2", as_="transit_validator")
            assert r.status == 200, r.body
            block = hotlist.decode_block(r.body)
            # No gap, nothing twice, and the head agrees with the entries (one snapshot).
            assert [e.version for e in block.entries] == list(range(since + 1, block.to_version + 1))
            assert block.to_version <= block.latest_version
            assert block.more == (block.to_version < block.latest_version)
            entries.extend(block.entries)
            since = block.to_version
            if reported and not block.more and since == await db.fetchval("SELECT version FROM hotlist_head"):
                return
            await asyncio.sleep(0)

    await asyncio.gather(report_losses(), poll())
    latest = await db.fetchval("SELECT version FROM hotlist_head")
    assert [e.version for e in entries] == list(range(1, latest + 1))
    assert {e.card_sn for e in entries} == {c["card_sn"] for c in cards}
    assert await _held(db, gate) == latest  # what the gate holds, for judging its offline records


async def test_a_poll_from_a_version_not_reached_yet_records_nothing(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    card = await svc.new_card()
    gate = svc.terminals["transit_validator"].terminal_id
    assert (await svc.post(f"/v1/cards/{card['card_no']}/temporary-loss", {})).status == 200
    r = await svc.get("/v1/hotlist?since=1", as_="transit_validator")
    assert r.status == 200 and hotlist.decode_block(r.body).to_version == 1
    assert await _held(db, gate) == 1
    r = await svc.get("/v1/hotlist?since=5", as_="transit_validator")
    assert r.status == 400 and r.body["code"] == "invalid_parameter", r.body
    assert await _held(db, gate) == 1
    # An older poll (a replica reloading from 0) does not move the gate back.
    r = await svc.get("/v1/hotlist?since=0", as_="transit_validator")
    assert r.status == 200 and hotlist.decode_block(r.body).to_version == 1
    assert await _held(db, gate) == 1
    assert await db.fetchval("SELECT count(*) FROM terminal_hotlist_serve WHERE terminal_id = $1", gate) == 1
