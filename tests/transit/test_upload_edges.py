"""Edges of offline purse-record uploads and ride-code ride uploads (real PostgreSQL): a pruned key reused by
another card, a line the fare table does not know, a record that is not an object, a ride reusing a gate_seq.

Records are made as in tests/transit/test_offline.py (the card simulator with the service's TAC master key)
and rides as in tests/transit/test_rides.py; their fixtures and helpers are reused. After every test the
ledger must hold (each purse's balance equals the sum of its journal rows).
"""

from __future__ import annotations

import time

import asyncpg

from protocols.ridecode import RideRecord
from tests.helpers import ServiceHarness
from tests.transit import test_rides as rides
from tests.transit.test_offline import BUS, debit, funded, ledger_holds, money_state, tid, upload  # noqa: F401

# ------------------------------------------------------------------ offline purse records


async def test_a_pruned_key_reused_by_another_card_is_posted_whatever_else_the_batch_holds(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md and docs/transit.md "Storage and idempotency": once the answer of a key's first
    transaction is pruned, a record of ANOTHER card reusing that key (a validator reset) "is judged on its
    own card's ledger like any other, and posted when valid" (the chip paid it).

    That holds whatever else the batch carries: a card's ledger row answers the key for that card's records
    only. (Before, with a new record of the key's first card in the same batch, the other card's genuine
    debit was refused `terminal_seq_reused` for good, while uploaded alone it was posted.)"""
    (cx, chip_x), (cy, chip_y) = await funded(svc, 1000), await funded(svc, 1000)
    t = tid(svc)
    x = debit(chip_x, t, 180)
    assert [a["result"] for a in await upload(svc, [x])] == ["accepted"]
    await db.execute("DELETE FROM terminal_txn WHERE terminal_id = $1", t)  # retention pruning (7 days)
    # The validator was reset: its counter runs again from x's key. Card Y taps under x's key, card X later.
    y = chip_y.debit(200, t, x.terminal_seq, x.txn_time + 10, **BUS)
    x2 = debit(chip_x, t, 100)
    answers = await upload(svc, [y, x2])
    assert [(a["result"], a["reason"]) for a in answers] == [("accepted", None), ("accepted", None)], answers
    assert await svc.balance(cy["card_no"]) == 800  # Y's chip paid 200
    assert await svc.balance(cx["card_no"]) == 720


async def test_a_record_on_a_line_the_fare_table_does_not_know_is_malformed(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/transit.md "Verdicts": `malformed` / `unknown_line` when "the fare table does not know the
    record's line", a record's station included: a known station with a line that does not exist is
    refused and changes nothing (before, it was accepted, and the made-up line_id went to the journal and
    from there to the operator's clearing file, `D|...|<line_id>|<station_id>`)."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    rec = debit(
        chip, t, 300, place={"line_id": "no-such-line", "station_id": "l1-daping", "direction": "out"}
    )
    before = await money_state(db)
    answers = await upload(svc, [rec])
    assert [(a["result"], a["reason"]) for a in answers] == [("malformed", "unknown_line")], answers
    assert await svc.balance(c["card_no"]) == 1000
    assert (await money_state(db))[1] == before[1]  # no journal row
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE line_id = 'no-such-line'") == 0


async def test_a_record_that_is_not_an_object_is_named_by_its_index(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A bad record is `invalid_field` with `field` like `records[17].tac` (docs/transit.md); a record that is
    not an object at all is named by its index, "records[0]" (before: "records[0].", with a trailing dot).
    The same for ride records."""
    t = tid(svc)
    before = await money_state(db)
    r = await svc.post("/v1/transit/offline-batches", {"terminal_id": t, "batch_id": 1, "records": [None]},
                       as_="transit_validator")  # fmt: skip
    assert r.status == 400 and r.body["code"] == "invalid_field", r.body
    assert r.body["field"] == "records[0]", r.body
    r = await svc.post("/v1/transit/ride-batches", {"gate_id": t, "batch_id": 1, "records": [7]},
                       as_="transit_validator")  # fmt: skip
    assert r.status == 400 and r.body["code"] == "invalid_field", r.body
    assert r.body["field"] == "records[0]", r.body
    assert await money_state(db) == before


# ------------------------------------------------------------------ ride-code rides


async def _uploaded_ride_records(svc: ServiceHarness, result: str) -> float:
    return await svc.metric_total("cardsvc_transit_uploaded_records_total", kind="ridecode", result=result)


async def test_a_ride_reusing_a_gate_seq_is_a_first_answer_not_a_replay(svc: ServiceHarness) -> None:
    """A ride whose gate_seq already answers another ride is `conflict` / `idempotency_conflict` (docs/api.md).
    It is that ride's first answer, nothing was stored for it: `replayed_answer: false` (a gate that drops
    records answered as replays would take it for a ride it was charged for), and it is counted in
    `cardsvc_transit_uploaded_records_total`, as offline records in the same case are. (Before, it was
    answered as a replay and never counted.)"""
    c, phone, _ = await rides.rider(svc)
    at = int(time.time()) - 30
    rec = rides.gate_record(svc, phone.next_code(at), at)
    assert (await rides.upload(svc, [rec]))[0]["result"] == "approved"
    conflicts = await _uploaded_ride_records(svc, "conflict")
    other = RideRecord(phone.next_code(at + 5), rec.gate_id, rec.gate_seq, rec.line_id, rec.station_id,
                       rec.direction, at + 5, rec.deny_list_version)  # fmt: skip
    [ans] = await rides.upload(svc, [other], batch_id=2)
    assert (ans["result"], ans["reason"]) == ("conflict", "idempotency_conflict"), ans
    assert ans["replayed_answer"] is False, ans
    assert await _uploaded_ride_records(svc, "conflict") == conflicts + 1
    assert await svc.balance(c["card_no"]) == 1000 - rides.BUS_FARE
