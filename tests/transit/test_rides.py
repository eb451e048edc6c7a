"""Ride-code rides uploaded by gates (POST /v1/transit/ride-batches): verified as the gate did at the
ride's time, charged post-paid once through the tap engine, idempotent per (gate, gate_seq), a code
charged at most once across gates and uploads.

After every test the ledger must hold: each purse's balance equals the sum of its journal rows.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from cardsvc import limits
from cardsvc.app import maintenance_once
from cardsvc.http.keys import SERVICES
from cardsvc.store.pool import create_pool
from cardsvc.transit import fares, flow, sweep
from cardsvc.transit import rides as rides_mod
from cardsvc.transit import taps as taps_mod
from cardsvc.transit.taps import KIND_FARE, KIND_PENALTY, SOURCE_RIDECODE, SOURCE_SWEEP
from protocols import hotlist, ridecode, sm
from protocols.ridecode import RideBatch, RideRecord
from tests.helpers import ServiceHarness, purse_vs_journal, replacement_body

TABLE = fares.load_demo_table()
BUS_FARE = fares.card_price_fen(TABLE.bus_lines["bus-105"].fare_fen, TABLE.rules.card_discount_percent)
_seq = itertools.count(1)
GATE_2 = "card_office"  # a second terminal with transit.upload (the card office may do everything)


@pytest.fixture(autouse=True)
async def ledger_holds(db_dsn: str) -> AsyncIterator[None]:
    yield
    for r in await purse_vs_journal(db_dsn):
        assert r["balance_fen"] == r["journal"], dict(r)


async def rider(svc: ServiceHarness, amount_fen: int = 1000) -> tuple[dict[str, Any], ridecode.RidePhone, bytes]:
    """A card topped up online, a phone with a ride-code certificate on it, and the gates' issuer key."""
    c = await svc.new_card(has_purse=True)
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": next(_seq), "amount_fen": amount_fen, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    key = sm.sm2_generate()
    r = await svc.post(
        "/v1/ride-certs",
        {"card_no": c["card_no"], "alg": sm.ALG_SM2_SM3, "user_public_key": sm.public_key_bytes(key).hex()},
        as_="ecard_channel",
    )
    assert r.status == 201, r.body
    phone = ridecode.RidePhone(ridecode.decode_cert(bytes.fromhex(r.body["cert"])), key)
    return c, phone, bytes.fromhex(r.body["issuer_public_key"])


async def test_a_ride_code_user_key_of_small_order_is_not_certified(svc: ServiceHarness, db: Any) -> None:
    """A certificate for an Ed25519 key of small order would let anyone who saw one of its codes make
    more without the phone's key, each charged to the purse. Certifying refuses it, and nothing is issued."""
    c = await svc.new_card(has_purse=True)
    for key in (bytes([1]) + bytes(31), bytes(32), bytes([0xEC]) + b"\xff" * 30 + b"\x7f"):
        r = await svc.post(
            "/v1/ride-certs",
            {"card_no": c["card_no"], "alg": sm.ALG_ED25519, "user_public_key": key.hex()},
            as_="ecard_channel",
        )
        assert r.status == 400 and r.body["code"] == "invalid_field", (key.hex(), r.body)
    assert await db.fetchval("SELECT count(*) FROM ride_cert") == 0


def gate_record(svc: ServiceHarness, code: str, at: int, gate: str = "transit_validator", **kw: Any) -> RideRecord:
    values: dict[str, Any] = {"line_id": "bus-105", "station_id": "", "direction": "single", "deny_list_version": 0}
    values.update(kw)
    return RideRecord(code, svc.terminals[gate].terminal_id, next(_seq), time=at, **values)


async def gate_downloads(svc: ServiceHarness, gate: str = "transit_validator") -> int:
    """The gate fetches the hotlist (its deny-list) up to the latest version; the service records the serve."""
    version = 0
    while True:
        r = await svc.get(f"/v1/hotlist?since={version}&limit=10000", as_=gate)
        assert r.status == 200, r.body
        version = r.body["to_version"]
        if not r.body["more"]:
            return version


def gate_lets_through(code: str, issuer: bytes, at: int) -> None:
    decision = ridecode.verify_at_gate(code, issuer, at, (), ())
    assert decision.ok, decision.outcome


async def upload(
    svc: ServiceHarness, records: list[RideRecord], batch_id: int = 1, as_: str = "transit_validator"
) -> list[dict[str, Any]]:
    batch = RideBatch(records[0].gate_id, batch_id, records)
    r = await svc.post("/v1/transit/ride-batches", ridecode.ride_batch_to_dict(batch), as_=as_)
    assert r.status == 200, r.body
    assert [a["gate_seq"] for a in r.body["records"]] == [x.gate_seq for x in records]
    return list(r.body["records"])


async def test_a_ride_is_charged_once_and_a_reupload_gets_the_same_answer(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c, phone, issuer = await rider(svc)
    at = int(time.time()) - 30
    code = phone.next_code(at)
    gate_lets_through(code, issuer, at)
    rec = gate_record(svc, code, at)
    [first] = await upload(svc, [rec])
    assert first["result"] == "approved" and first["fare_fen"] == BUS_FARE and first["operator"] == "cq-bus", first
    assert first["balance_fen"] == 1000 - BUS_FARE and first["replayed_answer"] is False
    [again] = await upload(svc, [rec], batch_id=2)
    assert again == {**first, "replayed_answer": True}
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE
    rows = await db.fetch("SELECT source, amount_fen, counterparty FROM txn_journal WHERE kind = 1")
    assert [tuple(r) for r in rows] == [(SOURCE_RIDECODE, -BUS_FARE, "cq-bus")]


async def test_the_same_code_at_two_gates_is_charged_once(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, phone, _ = await rider(svc)
    at = int(time.time()) - 30
    code = phone.next_code(at)
    answers = await upload(svc, [gate_record(svc, code, at), gate_record(svc, code, at + 5)])
    assert [(a["result"], a["reason"]) for a in answers] == [("approved", None), ("declined", "credential_replayed")]
    # Uploaded later, after the short-lived credential uses of cards and e-cards were pruned: still refused.
    await db.execute("UPDATE credential_use SET used_at = now() - interval '1 day'")
    pool = await create_pool(svc.dsn, svc.settings)
    try:
        await maintenance_once(pool, svc.settings)
    finally:
        await pool.close()
    # Another terminal allowed to upload (terminals added at run time reach the cache asynchronously).
    [late] = await upload(svc, [gate_record(svc, code, at + 10, gate=GATE_2)], as_=GATE_2)
    assert (late["result"], late["reason"]) == ("declined", "credential_replayed")
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE


async def backdated_phone(
    svc: ServiceHarness, card_no: str, valid_from: int, max_fare_fen: int | None = None
) -> ridecode.RidePhone:
    """A phone with a certificate the issuer signed at `valid_from` (the API signs from now on)."""
    key = sm.sm2_generate()
    conn = await asyncpg.connect(svc.dsn)
    try:
        row = await conn.fetchrow(
            """INSERT INTO ride_cert (card_id, alg, user_key, valid_from, valid_to)
               SELECT card_id, 1, $2, to_timestamp($3), to_timestamp($3 + 86400) FROM card WHERE card_no = $1
               RETURNING cert_serial, card_id""",
            card_no, sm.public_key_bytes(key), valid_from,
        )  # fmt: skip
    finally:
        await conn.close()
    cert = ridecode.issue_cert(
        sm.sm2_from_scalar(svc.keys.ride_issuer_key), issuer_key_id=1, cert_serial=row["cert_serial"],
        account_id=row["card_id"], alg=sm.ALG_SM2_SM3, user_public_key=sm.public_key_bytes(key),
        valid_from=valid_from, valid_to=valid_from + 86400,
        max_fare_fen=svc.settings.ride_max_fare_fen if max_fare_fen is None else max_fare_fen,
        credit_limit_fen=svc.settings.ride_credit_limit_fen,
    )  # fmt: skip
    return ridecode.RidePhone(cert, key)


async def test_no_ride_is_charged_more_than_the_certificates_max_fare(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    # The certificate's max_fare_fen is the issuer's promise to the rider: each ride, and the penalty for an
    # earlier broken journey (another ride), is charged at most that; the operator is credited what is charged.
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 1200, max_fare_fen=150)
    a, b = sorted(TABLE.stations)[:2]
    line_a, line_b = TABLE.stations[a].line, TABLE.stations[b].line
    rides = [
        gate_record(svc, phone.next_code(now - 900), now - 900),  # bus 180 -> 150
        gate_record(svc, phone.next_code(now - 600), now - 600, line_id=line_a, station_id=a, direction="in"),
        # a second entry without leaving: the open journey is charged the maximum fare (700) -> 150
        gate_record(svc, phone.next_code(now - 300), now - 300, line_id=line_b, station_id=b, direction="in"),
    ]
    for code_record in rides:
        gate_lets_through(code_record.code_text, issuer, code_record.time)
    bus, entry, second = await upload(svc, rides)
    assert bus["result"] == "approved" and bus["fare_fen"] == 150, bus
    assert "ride_code_max_fare" in bus["rules"]
    assert entry["result"] == "approved" and entry["fare_fen"] == 0, entry
    assert second["result"] == "approved" and second["penalty"]["amount_fen"] == 150, second
    assert second["fare_fen"] == 150 and "ride_code_max_fare" in second["rules"]
    assert await svc.balance(c["card_no"]) == 1000 - 300
    rows = await db.fetch(
        "SELECT kind, amount_fen FROM txn_journal WHERE card_id = $1 AND source = $2 ORDER BY txn_id",
        c.get("card_id") or await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"]),
        SOURCE_RIDECODE,
    )
    assert sorted(r["amount_fen"] for r in rows if r["amount_fen"] != 0) == [-150, -150]
    assert all(r["amount_fen"] >= -150 for r in rows)
    # Without a limit below the fares (the default certificate), the same bus ride costs the full fare.
    _, phone2, _ = await rider(svc)
    [full] = await upload(svc, [gate_record(svc, phone2.next_code(now - 60), now - 60)], batch_id=2)
    assert full["fare_fen"] == BUS_FARE and "ride_code_max_fare" not in full["rules"], full


async def _sweep_at(svc: ServiceHarness, now: dt.datetime | None = None) -> sweep.SweepResult:
    pool = await create_pool(svc.dsn, svc.settings)
    try:
        return await sweep.sweep_timed_out_journeys(pool, TABLE, svc.settings.purse_overdraft_fen, now=now)
    finally:
        await pool.close()


async def _sweep_after_timeout(svc: ServiceHarness) -> sweep.SweepResult:
    return await _sweep_at(svc, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=TABLE.rules.journey_timeout_s + 60))


async def test_an_exit_uploaded_before_its_entry_is_held_and_priced_with_it(svc: ServiceHarness) -> None:
    """The exit gate uploads before the entry gate: the exit is held, nothing charged. The entry, uploaded
    later, prices the ride at its distance fare and leaves no open journey: the sweep charges nothing."""
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 3600)
    a, b = "l1-chaotianmen", "l1-daping"
    entry = gate_record(
        svc, phone.next_code(now - 1800), now - 1800, line_id="L1", station_id=a, direction="in"
    )
    exit_ = gate_record(
        svc, phone.next_code(now - 600), now - 600, gate=GATE_2, line_id="L1", station_id=b, direction="out"
    )
    for rec in (entry, exit_):
        gate_lets_through(rec.code_text, issuer, rec.time)
    [out] = await upload(svc, [exit_], as_=GATE_2)
    assert (out["result"], out["fare_fen"], out["rules"]) == ("approved", 0, ["exit_held"]), out
    assert "penalty" not in out and await svc.balance(c["card_no"]) == 1000
    [in_] = await upload(svc, [entry], batch_id=2)
    ride = fares.metro_fare_fen(TABLE, a, b) * (100 - TABLE.rules.card_discount_percent) // 100
    assert (in_["result"], in_["fare_fen"]) == ("approved", ride), in_
    assert in_["rules"][-2:] == ["late_upload", "entry_of_held_exit"] and "penalty" not in in_
    result = await _sweep_after_timeout(svc)
    assert (result.closed, result.held_exits) == (0, 0)
    assert await svc.balance(c["card_no"]) == 1000 - ride


async def test_a_held_exit_whose_entry_never_comes_is_charged_once_by_the_sweep(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 3600)
    exit_ = gate_record(
        svc,
        phone.next_code(now - 600),
        now - 600,
        gate=GATE_2,
        line_id="L1",
        station_id="l1-daping",
        direction="out",
    )
    gate_lets_through(exit_.code_text, issuer, exit_.time)
    [out] = await upload(svc, [exit_], as_=GATE_2)
    assert out["rules"] == ["exit_held"], out
    result = await _sweep_after_timeout(svc)
    assert (result.closed, result.held_exits, result.charged_fen, result.unpaid) == (0, 1, TABLE.cap_fen, 0)
    assert await svc.balance(c["card_no"]) == 1000 - TABLE.cap_fen
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    row = await db.fetchrow(
        "SELECT amount_fen, at, counterparty, line_id, station_id, source FROM txn_journal WHERE card_id = $1 AND kind = $2",
        card_id,
        KIND_PENALTY,
    )
    assert row is not None and (row["amount_fen"], row["counterparty"], row["line_id"], row["station_id"]) == (
        -TABLE.cap_fen, "cq-metro", "L1", "l1-daping",
    )  # fmt: skip
    assert (row["source"], int(row["at"].timestamp())) == (
        SOURCE_SWEEP,
        now - 600 + TABLE.rules.journey_timeout_s,
    )
    assert (await _sweep_after_timeout(svc)).held_exits == 0  # once
    # Its entry, uploaded even later, gives the maximum fare back and charges the ride
    # (test_late_entry_refunds.py).
    entry = gate_record(
        svc,
        phone.next_code(now - 1800),
        now - 1800,
        line_id="L1",
        station_id="l1-chaotianmen",
        direction="in",
    )
    gate_lets_through(entry.code_text, issuer, entry.time)
    [in_] = await upload(svc, [entry], batch_id=2)
    ride = fares.card_price_fen(fares.metro_fare_fen(TABLE, "l1-chaotianmen", "l1-daping"), 10)
    assert (in_["fare_fen"], in_["rules"][-1], in_["refund"]["amount_fen"]) == (ride, "entry_of_charged_exit", 700)
    assert await svc.balance(c["card_no"]) == 1000 - ride


async def test_the_sweep_charges_every_due_held_exit_of_a_card_with_an_open_journey(svc: ServiceHarness) -> None:
    """Four held exits and an open journey, all due: the sweep charges five maximum fares. (Closing the
    journey first kept its entry among the card's four unpaired taps and pushed a held exit out.)"""
    c, _, issuer = await rider(svc, 5000)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 7200)
    entry = gate_record(svc, phone.next_code(now - 100), now - 100, line_id="L1", station_id="l1-chaotianmen", direction="in")
    gate_lets_through(entry.code_text, issuer, entry.time)
    [in_] = await upload(svc, [entry], batch_id=next(_seq))
    assert in_["result"] == "approved", in_
    for k in range(4):  # exits of earlier rides, uploaded late, their entries never come
        at = now - 3000 + k * 600
        exit_ = gate_record(svc, phone.next_code(at), at, gate=GATE_2, line_id="L1", station_id="l1-daping", direction="out")
        gate_lets_through(exit_.code_text, issuer, exit_.time)
        [out] = await upload(svc, [exit_], batch_id=next(_seq), as_=GATE_2)
        assert out["rules"] == ["exit_held", "late_upload"], out
    result = await _sweep_after_timeout(svc)
    assert (result.closed, result.held_exits, result.charged_fen) == (1, 4, 5 * TABLE.cap_fen)
    assert await svc.balance(c["card_no"]) == 5000 - 5 * TABLE.cap_fen


async def test_a_held_exit_is_charged_at_the_cards_next_tap_once_due(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """No sweep ran: the card's next ride in order, journey_timeout_s after the held exit, charges it with
    its own fare, each under its own operator and line."""
    c, _, issuer = await rider(svc)
    now = int(time.time())
    held_at = now - TABLE.rules.journey_timeout_s - 600
    phone = await backdated_phone(svc, c["card_no"], held_at - 60)
    exit_ = gate_record(
        svc,
        phone.next_code(held_at),
        held_at,
        gate=GATE_2,
        line_id="L1",
        station_id="l1-daping",
        direction="out",
    )
    bus = gate_record(svc, phone.next_code(now - 60), now - 60)
    for rec in (exit_, bus):
        gate_lets_through(rec.code_text, issuer, rec.time)
    [out] = await upload(svc, [exit_], as_=GATE_2)
    assert out["rules"] == ["exit_held"], out
    [ride] = await upload(svc, [bus], batch_id=2)
    assert ride["fare_fen"] == BUS_FARE + TABLE.cap_fen, ride
    assert ride["held_exits_charged"] == [{"amount_fen": TABLE.cap_fen, "reason": "missing_tap_in"}]
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    rows = await db.fetch(
        "SELECT kind, amount_fen, counterparty, line_id, station_id FROM txn_journal WHERE card_id = $1 AND amount_fen < 0",
        card_id,
    )
    assert sorted((r["kind"], r["amount_fen"], r["line_id"], r["station_id"]) for r in rows) == sorted(
        [(KIND_PENALTY, -TABLE.cap_fen, "L1", "l1-daping"), (KIND_FARE, -BUS_FARE, bus.line_id, None)]
    )
    assert (await _sweep_after_timeout(svc)).held_exits == 0
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE - TABLE.cap_fen


async def _penalties(db: asyncpg.Connection, card_no: str) -> list[tuple[int, str, int]]:
    rows = await db.fetch(
        """SELECT j.amount_fen, j.station_id, j.at FROM txn_journal j JOIN card c USING (card_id)
           WHERE c.card_no = $1 AND j.kind = $2 AND j.source = $3 ORDER BY j.at""",
        card_no, KIND_PENALTY, SOURCE_SWEEP,
    )  # fmt: skip
    return [(r["amount_fen"], r["station_id"], int(r["at"].timestamp())) for r in rows]


async def test_rides_uploaded_after_the_sweep_passed_their_time_are_still_swept(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A gate uploads hours late: an entry that opens a journey already timed out, and an exit whose entry
    never comes, both older than the sweep's watermark, so that no window of the journal will bring them.
    The next sweep charges each the maximum fare, at the moment it timed out, and only once."""
    timeout = TABLE.rules.journey_timeout_s
    now = int(time.time())
    ride_at = now - timeout - 600
    await _sweep_at(svc)  # the journal up to now - timeout has been read: the rides' times are behind it
    riders = []
    for gate, station, direction in ((GATE_2, "l1-daping", "out"), ("transit_validator", "l1-chaotianmen", "in")):
        c, _, issuer = await rider(svc, 5000)
        phone = await backdated_phone(svc, c["card_no"], ride_at - 60)
        rec = gate_record(svc, phone.next_code(ride_at), ride_at, gate=gate, line_id="L1", station_id=station,
                          direction=direction)  # fmt: skip
        gate_lets_through(rec.code_text, issuer, rec.time)
        [answer] = await upload(svc, [rec], batch_id=next(_seq), as_=gate)
        assert (answer["result"], answer["fare_fen"]) == ("approved", 0) and "penalty" not in answer, answer
        riders.append((c["card_no"], station))
    online, _, _ = await rider(svc, 5000)  # an entry in time is the windows' business, not the list's
    in_time = await svc.post("/v1/transit/taps", {
        "terminal_seq": next(_seq), "time": now, "mode": "metro", "line_id": "L1", "station_id": "l1-daping",
        "direction": "in", "credential": "card", **svc.card_auth_body(online["card_sn"]),
    }, as_="transit_validator")  # fmt: skip
    assert in_time.status == 200 and in_time.body["result"] == "approved", in_time.body
    assert await db.fetchval("SELECT count(*) FROM journey_sweep_retry") == 2

    done = await _sweep_at(svc)
    assert (done.closed, done.held_exits, done.charged_fen) == (1, 1, 2 * TABLE.cap_fen), done
    for card_no, station in riders:
        assert await _penalties(db, card_no) == [(-TABLE.cap_fen, station, ride_at + timeout)]
        assert await svc.balance(card_no) == 5000 - TABLE.cap_fen
    assert await db.fetchval("SELECT count(*) FROM journey_sweep_retry") == 0  # done with them
    again = await _sweep_at(svc)
    assert (again.closed, again.held_exits) == (0, 0)


async def test_a_late_ride_not_due_yet_stays_with_the_sweep_until_it_is(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """An entry uploaded two minutes before it times out, behind the watermark of a sweep whose clock runs
    ten minutes ahead (another host): the sweep on this clock finds nothing due yet and keeps the card;
    once due, it is charged."""
    timeout = TABLE.rules.journey_timeout_s
    now = int(time.time())
    ride_at = now - timeout + 120
    ahead = dt.datetime.fromtimestamp(now + 600, dt.UTC)
    await _sweep_at(svc, ahead)
    c, _, issuer = await rider(svc, 5000)
    phone = await backdated_phone(svc, c["card_no"], ride_at - 60)
    rec = gate_record(svc, phone.next_code(ride_at), ride_at, line_id="L1", station_id="l1-chaotianmen", direction="in")
    gate_lets_through(rec.code_text, issuer, rec.time)
    [answer] = await upload(svc, [rec])
    assert answer["result"] == "approved", answer

    early = await _sweep_at(svc, dt.datetime.fromtimestamp(now, dt.UTC))
    assert (early.closed, early.candidates) == (0, 1) and await _penalties(db, c["card_no"]) == []
    done = await _sweep_at(svc, ahead)
    assert (done.closed, done.charged_fen) == (1, TABLE.cap_fen), done
    assert await _penalties(db, c["card_no"]) == [(-TABLE.cap_fen, "l1-chaotianmen", ride_at + timeout)]
    assert await svc.balance(c["card_no"]) == 5000 - TABLE.cap_fen


async def test_a_ride_the_credit_covers_is_charged_even_when_a_held_exit_due_is_not(svc: ServiceHarness) -> None:
    """The gate let the rider through: a ride within the certificate's credit is charged even if the held
    exit now due does not fit too. That exit stays held, and a tap after a top-up charges it."""
    credit = svc.settings.ride_credit_limit_fen
    c, _, issuer = await rider(svc)
    now = int(time.time())
    held_at = now - TABLE.rules.journey_timeout_s - 600
    phone = await backdated_phone(svc, c["card_no"], held_at - 60_000)
    # Bus rides over the day before (4,000 s apart: no transfer discount) spend the purse into the credit
    # until the next bus ride fits and the bus ride plus a maximum fare does not.
    spend = (1000 + credit - BUS_FARE - TABLE.cap_fen) // BUS_FARE + 1
    buses = [gate_record(svc, phone.next_code(held_at - 50_000 + k * 4000), held_at - 50_000 + k * 4000) for k in range(spend)]
    exit_ = gate_record(svc, phone.next_code(held_at), held_at, gate=GATE_2, line_id="L1", station_id="l1-daping", direction="out")
    ride = gate_record(svc, phone.next_code(now - 30), now - 30)
    for rec in (*buses, exit_, ride):
        gate_lets_through(rec.code_text, issuer, rec.time)
    assert all(a["result"] == "approved" for a in await upload(svc, buses, batch_id=next(_seq)))
    balance = await svc.balance(c["card_no"])
    assert balance - BUS_FARE >= -credit > balance - BUS_FARE - TABLE.cap_fen
    [out] = await upload(svc, [exit_], batch_id=next(_seq), as_=GATE_2)
    assert out["rules"] == ["exit_held"], out
    [bus] = await upload(svc, [ride], batch_id=next(_seq))
    assert (bus["result"], bus["fare_fen"]) == ("approved", BUS_FARE), bus
    assert "held_exits_charged" not in bus
    assert await svc.balance(c["card_no"]) == balance - BUS_FARE
    # The next tap after a top-up charges it.
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": next(_seq), "amount_fen": 3000, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    after = gate_record(svc, phone.next_code(now - 10), now - 10, line_id="bus-261")
    gate_lets_through(after.code_text, issuer, after.time)
    [next_] = await upload(svc, [after], batch_id=next(_seq))
    assert next_["held_exits_charged"] == [{"amount_fen": TABLE.cap_fen, "reason": "missing_tap_in"}], next_
    assert await svc.balance(c["card_no"]) == balance - BUS_FARE + 3000 - next_["fare_fen"]


def test_an_uploaded_entry_that_keeps_held_exits_held_needs_only_its_own_minimum_fare() -> None:
    """What an uploaded metro entry must find in the purse: its cheapest exit, not the held exits the
    decision left due (charge_due=False), which would refuse the entry the credit covers."""
    t0 = 1_790_000_000
    held = fares.fare(TABLE, fares.EMPTY_STATE, fares.Tap(t0, "metro", "L1", "l1-xiaoshizi", "out", uploaded=True))
    entry = fares.Tap(t0 + TABLE.rules.journey_timeout_s + 60, "metro", "L1", "l1-daping", "in", uploaded=True)
    card = SimpleNamespace(quota=SimpleNamespace(concession=fares.NO_CONCESSION))
    item = SimpleNamespace(tap=entry)
    cheapest = fares.card_price_fen(fares.metro_fare_fen(TABLE, "l1-daping", "l1-daping"), 10)
    charged = fares.fare(TABLE, held.state, entry)
    kept = fares.fare(TABLE, held.state, entry, charge_due=False)
    assert taps_mod._needed(TABLE, item, card, charged) == TABLE.cap_fen + cheapest  # type: ignore[arg-type]
    assert taps_mod._needed(TABLE, item, card, kept) == cheapest  # type: ignore[arg-type]


async def test_an_exit_after_a_loss_uploaded_before_its_entry_ends_the_journey_at_its_fare(svc: ServiceHarness) -> None:
    """The card is reported lost during a ride and the exit gate uploads first: the exit is held for an
    entry before the report, which then prices the ride (not the sweep's maximum fare). An exit after
    the report whose entry never comes is not charged."""
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 3600)
    entry = gate_record(svc, phone.next_code(now - 1200), now - 1200, line_id="L1", station_id="l1-chaotianmen", direction="in")
    assert (await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    await gate_downloads(svc, GATE_2)  # the exit gate knows of the loss: only a journey before it may end there
    at = int(time.time()) + 2
    exit_ = gate_record(svc, phone.next_code(at), at, gate=GATE_2, line_id="L1", station_id="l1-daping", direction="out")
    for rec in (entry, exit_):
        gate_lets_through(rec.code_text, issuer, rec.time)
    [out] = await upload(svc, [exit_], batch_id=next(_seq), as_=GATE_2)
    assert (out["result"], out["fare_fen"], out["rules"]) == ("approved", 0, ["exit_held"]), out
    [in_] = await upload(svc, [entry], batch_id=next(_seq))
    ride = fares.metro_fare_fen(TABLE, "l1-chaotianmen", "l1-daping") * (100 - TABLE.rules.card_discount_percent) // 100
    assert (in_["result"], in_["fare_fen"], in_["rules"][-1]) == ("approved", ride, "entry_of_held_exit"), in_
    # Another exit after the report, whose entry never comes.
    lone = gate_record(svc, phone.next_code(at + 1), at + 1, gate=GATE_2, line_id="L1", station_id="l1-xiaoshizi", direction="out")
    gate_lets_through(lone.code_text, issuer, lone.time)
    [held] = await upload(svc, [lone], batch_id=next(_seq), as_=GATE_2)
    assert held["rules"] == ["exit_held"], held
    result = await _sweep_after_timeout(svc)
    assert (result.closed, result.held_exits, result.charged_fen) == (0, 0, 0)
    assert await svc.balance(c["card_no"]) == 1000 - ride


@pytest.mark.parametrize("exit_first", [False, True])
async def test_a_journey_entered_before_a_replacement_ends_at_its_exit_on_the_new_card(
    svc: ServiceHarness, exit_first: bool
) -> None:
    """Entered with the old card's ride code, the card replaced during the ride, left after: the journey
    (moved to the new card with the purse) ends at its distance fare whichever gate uploads first."""
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 3600)
    entry = gate_record(svc, phone.next_code(now - 1200), now - 1200, line_id="L1", station_id="l1-chaotianmen", direction="in")
    body = replacement_body()
    assert (await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})).status == 200
    await gate_downloads(svc, GATE_2)  # the exit gate knows of the replacement
    at = int(time.time()) + 2
    exit_ = gate_record(svc, phone.next_code(at), at, gate=GATE_2, line_id="L1", station_id="l1-daping", direction="out")
    for rec in (entry, exit_):
        gate_lets_through(rec.code_text, issuer, rec.time)
    order = [(exit_, GATE_2), (entry, "transit_validator")] if exit_first else [(entry, "transit_validator"), (exit_, GATE_2)]
    answers = [(await upload(svc, [rec], batch_id=next(_seq), as_=gate))[0] for rec, gate in order]
    assert all(a["result"] == "approved" for a in answers), answers
    ride = fares.metro_fare_fen(TABLE, "l1-chaotianmen", "l1-daping") * (100 - TABLE.rules.card_discount_percent) // 100
    assert sum(a["fare_fen"] for a in answers) == ride, answers
    result = await _sweep_after_timeout(svc)
    assert (result.closed, result.held_exits) == (0, 0)
    assert await svc.balance(body["new_card_no"]) == 1000 - ride
    # An exit after the replacement whose entry never comes is not charged.
    lone = gate_record(svc, phone.next_code(at + 1), at + 1, gate=GATE_2, line_id="L1", station_id="l1-xiaoshizi", direction="out")
    gate_lets_through(lone.code_text, issuer, lone.time)
    [held] = await upload(svc, [lone], batch_id=next(_seq), as_=GATE_2)
    assert held["rules"] == ["exit_held"], held
    # Held only for an entry before the replacement: dropped, not charged, when due (test_fares.py).
    async def unpaired() -> list[fares.UnpairedTap]:
        conn = await asyncpg.connect(svc.dsn)
        try:
            state = await conn.fetchval(
                "SELECT p.journey FROM purse p JOIN card c ON c.card_id = p.card_id WHERE c.card_no = $1", body["new_card_no"]
            )
        finally:
            await conn.close()
        return [u for u in fares.JourneyState.from_json(state).unpaired if u.time == at + 1]

    [kept] = await unpaired()
    assert (kept.direction, kept.charged) == ("out", False) and kept.until is not None and kept.until <= at
    # The sweep above ran on a clock hours ahead, so its watermark passed this exit: start the windows again.
    conn = await asyncpg.connect(svc.dsn)
    try:
        await conn.execute("DELETE FROM journey_sweep")
    finally:
        await conn.close()
    result = await _sweep_after_timeout(svc)
    assert (result.closed, result.held_exits, result.charged_fen) == (0, 0, 0)
    assert await unpaired() == []  # dropped by the sweep, so no later sweep or upload looks at it again
    assert await svc.balance(body["new_card_no"]) == 1000 - ride


async def test_the_sweep_keeps_the_certificates_max_fare(svc: ServiceHarness) -> None:
    """A journey entered with a ride code and never left: the sweep charges it at most the certificate's
    max_fare_fen, as a tap would."""
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 3600, max_fare_fen=150)
    entry = gate_record(svc, phone.next_code(now - 60), now - 60, line_id="L1", station_id="l1-daping", direction="in")
    gate_lets_through(entry.code_text, issuer, entry.time)
    [in_] = await upload(svc, [entry])
    assert in_["result"] == "approved", in_
    result = await _sweep_after_timeout(svc)
    assert (result.closed, result.charged_fen) == (1, 150)
    assert await svc.balance(c["card_no"]) == 1000 - 150


async def test_a_ride_older_than_the_code_lifetime_is_verified_at_its_own_time(svc: ServiceHarness) -> None:
    c, _, issuer = await rider(svc)
    at = int(time.time()) - 3600  # an hour ago: far past the code lifetime and the clock skew
    phone = await backdated_phone(svc, c["card_no"], at - 600)
    code = phone.next_code(at)
    gate_lets_through(code, issuer, at)
    assert not ridecode.verify_at_gate(code, issuer, int(time.time()), (), ()).ok  # it would not pass now
    [ans] = await upload(svc, [gate_record(svc, code, at)])
    assert ans["result"] == "approved" and ans["fare_fen"] == BUS_FARE, ans
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE


async def test_revoked_and_unknown_certificates(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, phone, _ = await rider(svc)
    at = int(time.time()) - 30
    # Revoked before the ride: declined. Revoked after the ride: the gate was right, the ride is charged.
    await db.execute("UPDATE ride_cert SET revoked_at = to_timestamp($1) WHERE cert_serial = $2", at - 5,
                     phone.cert.cert_serial)  # fmt: skip
    before = await upload(svc, [gate_record(svc, phone.next_code(at), at)])
    await db.execute("UPDATE ride_cert SET revoked_at = to_timestamp($1) WHERE cert_serial = $2", at + 5,
                     phone.cert.cert_serial)  # fmt: skip
    after = await upload(svc, [gate_record(svc, phone.next_code(at), at)])
    # A certificate the issuer never signed, and one signed by us for a serial we never issued.
    stranger = ridecode.RidePhone(
        ridecode.issue_cert(
            sm.sm2_generate(), issuer_key_id=1, cert_serial=phone.cert.cert_serial,
            account_id=phone.cert.account_id, alg=sm.ALG_SM2_SM3, user_public_key=phone.cert.user_public_key,
            valid_from=phone.cert.valid_from, valid_to=phone.cert.valid_to, max_fare_fen=1000,
            credit_limit_fen=2000,
        ),
        phone.private_key,
    )  # fmt: skip
    unknown = ridecode.RidePhone(
        ridecode.issue_cert(
            sm.sm2_from_scalar(svc.keys.ride_issuer_key), issuer_key_id=1, cert_serial=999_999,
            account_id=phone.cert.account_id, alg=sm.ALG_SM2_SM3, user_public_key=phone.cert.user_public_key,
            valid_from=phone.cert.valid_from, valid_to=phone.cert.valid_to, max_fare_fen=1000,
            credit_limit_fen=2000,
        ),
        phone.private_key,
    )  # fmt: skip
    forged = await upload(
        svc, [gate_record(svc, stranger.next_code(at), at), gate_record(svc, unknown.next_code(at), at)]
    )
    assert [(a["result"], a["reason"]) for a in before + after + forged] == [
        ("declined", "card_unusable"),
        ("approved", None),
        ("declined", "credential_forged"),
        ("declined", "credential_forged"),
    ]
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE


async def _bus_rides_around(
    svc: ServiceHarness, c: dict[str, Any], phone: ridecode.RidePhone, report: str
) -> tuple[int, int, dict[str, Any], dict[str, Any]]:
    """A bus ride 30 s before a loss `report` and one 2 s after it, by a gate that had downloaded the
    report's hotlist entry, uploaded together after it: (time before, time after, their answers)."""
    before = int(time.time()) - 30
    r = await svc.post(f"/v1/cards/{c['card_no']}/{report}", {"operator": "staff-1"})
    assert r.status == 200, r.body
    await gate_downloads(svc)
    after = int(time.time()) + 2
    rides = [gate_record(svc, phone.next_code(before), before), gate_record(svc, phone.next_code(after), after)]
    taken, refused = await upload(svc, rides)
    return before, after, taken, refused


async def test_a_loss_report_declines_the_rides_after_it_not_those_before(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The gate let the rider through before the card was reported lost: that ride is charged when it
    is uploaded later. A ride after the report, at a gate that held the block, is declined (the gate
    should have denied the code)."""
    c, phone, _ = await rider(svc)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    before, after, taken, refused = await _bus_rides_around(svc, c, phone, "temporary-loss")
    assert (taken["result"], taken["fare_fen"]) == ("approved", BUS_FARE), taken
    assert (refused["result"], refused["reason"]) == ("declined", "card_unusable"), refused
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE
    # A formal loss after the temporary one: the card stopped at the first report, not the second.
    r = await svc.post(f"/v1/cards/{c['card_no']}/formal-loss", {"operator": "staff-1"})
    assert r.status == 200, r.body
    rides = [gate_record(svc, phone.next_code(t), t) for t in (before + 5, after + 1)]
    taken, refused = await upload(svc, rides, batch_id=2)
    assert taken["result"] == "approved" and "transfer_discount" in taken["rules"], taken  # bus, bus: 0
    assert (refused["result"], refused["reason"], refused["card_status"]) == ("declined", "card_unusable", "formal_loss")
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE card_id = $1 AND kind = 1", card_id) == 2
    # Replaced since: a ride before the stop is charged to the new card, where the purse went; a code
    # already charged stays used; a ride after the stop stays declined (docs/transit.md).
    body = replacement_body()
    r = await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})
    assert r.status == 200, r.body
    moved = await svc.balance(body["new_card_no"])
    used_code = rides[0].code_text
    rides = [
        gate_record(svc, phone.next_code(before + 7), before + 7),
        gate_record(svc, used_code, before + 5),  # the same code, in another upload
        gate_record(svc, phone.next_code(after + 3), after + 3),
    ]
    charged, replayed, gone = await upload(svc, rides, batch_id=3)
    assert (charged["result"], charged["fare_fen"]) == ("approved", BUS_FARE), charged
    assert (replayed["result"], replayed["reason"]) == ("declined", "credential_replayed"), replayed
    assert (gone["result"], gone["reason"]) == ("declined", "card_unusable"), gone
    assert await svc.balance(body["new_card_no"]) == moved - BUS_FARE


async def test_a_replacement_committed_during_an_upload_sends_the_ride_to_the_new_card(
    svc: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload looks the certificates' cards up, then charges chunk by chunk. A replacement that commits
    in between (here: just before the first chunk's batch) is not a reason to refuse a ride taken before
    it: the batch notices the card is replaced, writes nothing, and the chunk is looked up again, so the
    ride goes to the new card like one uploaded after the replacement."""
    c, phone, _ = await rider(svc)
    at = int(time.time()) - 60
    body = replacement_body()
    real = rides_mod.process_taps
    calls = []

    async def replaced_first(pool: Any, table: Any, items: Any) -> Any:
        if not calls:
            r = await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})
            assert r.status == 200, r.body
        calls.append([i.card_id for i in items])
        return await real(pool, table, items)

    monkeypatch.setattr(rides_mod, "process_taps", replaced_first)
    [charged] = await upload(svc, [gate_record(svc, phone.next_code(at), at)])
    assert (charged["result"], charged["fare_fen"]) == ("approved", BUS_FARE), charged
    new_id = await svc.app[SERVICES].pool.fetchval("SELECT card_id FROM card WHERE card_no = $1", body["new_card_no"])
    assert [ids[0] for ids in calls][-1] == new_id and len(calls) == 2, calls  # looked up again, once
    assert await svc.balance(body["new_card_no"]) == 1000 - BUS_FARE
    for row in await purse_vs_journal(svc.dsn):
        assert row["balance_fen"] == row["journal"], dict(row)


async def test_a_journey_entered_before_a_loss_report_ends_at_its_exit(svc: ServiceHarness) -> None:
    """Entered before the report, left after it: the exit ends the journey at its distance fare. Were it
    declined, the journey would stay open and the sweep would charge the maximum fare."""
    c, _, _ = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 3600)
    entry = gate_record(
        svc, phone.next_code(now - 1200), now - 1200, line_id="L1", station_id="l1-chaotianmen", direction="in"
    )
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})
    assert r.status == 200, r.body
    await gate_downloads(svc)
    left = int(time.time()) + 2
    exit_ = gate_record(svc, phone.next_code(left), left, line_id="L1", station_id="l1-daping", direction="out")
    a_in, a_out = await upload(svc, [entry, exit_])
    assert (a_in["result"], a_out["result"]) == ("approved", "approved"), (a_in, a_out)
    assert a_out["fare_fen"] == 270 and "penalty" not in a_out, a_out  # 6.9 km with the card
    assert (await _sweep_after_timeout(svc)).closed == 0
    assert await svc.balance(c["card_no"]) == 1000 - 270
    # A journey entered after the report is another matter: its rides are declined.
    late_in = gate_record(svc, phone.next_code(left + 1), left + 1, line_id="L1", station_id="l1-daping", direction="in")
    [refused] = await upload(svc, [late_in], batch_id=2)
    assert (refused["result"], refused["reason"]) == ("declined", "card_unusable")


async def test_a_lost_cards_ride_is_judged_as_of_the_deny_list_its_gate_held(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """protocols/ridecode.md: the server judges a ride "with the deny-lists as of `deny_list_version`". A
    gate learns a loss from the hotlist, whose entries name the account its ride codes charge: a gate that
    held the block denies the code itself; one that did not could not refuse it, so its ride is charged (it
    was declined, and the operator unpaid, whatever the gate held). The version is the gate's claim, but at
    least the highest the service served it before the ride."""
    c, phone, issuer = await rider(svc)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    before = await db.fetchval("SELECT version FROM hotlist_head")
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})
    assert r.status == 200, r.body
    blocked = await db.fetchval("SELECT version FROM hotlist_head")
    at = int(time.time()) + 1

    # The hotlist tells a gate which ride codes to deny: their account.
    replica = hotlist.HotlistReplica()
    reply = await svc.get("/v1/hotlist?since=0&limit=10000", as_=GATE_2)
    replica.apply(hotlist.decode_block(reply.body))
    assert card_id in replica.blocked_accounts
    code = phone.next_code(at)
    assert ridecode.verify_at_gate(code, issuer, at, (), replica.blocked_accounts).outcome == ridecode.GateOutcome.DENIED

    # transit_validator has downloaded nothing: it held `before` and let the rider through.
    unaware = gate_record(svc, phone.next_code(at), at, deny_list_version=before)
    knew = gate_record(svc, phone.next_code(at + 1), at + 1, deny_list_version=blocked)
    charged, refused = await upload(svc, [unaware, knew])
    assert (charged["result"], charged["fare_fen"]) == ("approved", BUS_FARE), charged
    assert (refused["result"], refused["reason"]) == ("declined", "card_unusable"), refused
    # GATE_2 was served the block above: its claim of an older version does not make it unaware.
    claimed_old = gate_record(svc, phone.next_code(at + 2), at + 2, gate=GATE_2, deny_list_version=before)
    [late] = await upload(svc, [claimed_old], batch_id=2, as_=GATE_2)
    assert (late["result"], late["reason"]) == ("declined", "card_unusable"), late
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE

    # Replaced since: the ride an unaware gate let through goes to the new card, where the purse went,
    # whether it is uploaded before or after the replacement; one the gate should have refused does not.
    body = replacement_body()
    assert (await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})).status == 200
    later = at + 10  # within the first ride's transfer window: free, but a ride on the new card's state
    unaware = gate_record(svc, phone.next_code(later), later, deny_list_version=before)
    knew = gate_record(svc, phone.next_code(later + 1), later + 1, deny_list_version=blocked)
    charged, refused = await upload(svc, [unaware, knew], batch_id=3)
    assert (charged["result"], charged["fare_fen"]) == ("approved", 0), charged
    assert "transfer_discount" in charged["rules"], charged
    assert (refused["result"], refused["reason"]) == ("declined", "card_unusable"), refused
    new_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", body["new_card_no"])
    assert await db.fetchval("SELECT card_id FROM txn_journal WHERE txn_id = $1", charged["txn_id"]) == new_id
    assert await svc.balance(body["new_card_no"]) == 1000 - BUS_FARE


async def test_a_ride_before_a_direct_formal_loss_is_charged(svc: ServiceHarness) -> None:
    c, phone, _ = await rider(svc)
    _, _, taken, refused = await _bus_rides_around(svc, c, phone, "formal-loss")
    assert (taken["result"], refused["result"]) == ("approved", "declined"), (taken, refused)
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE


async def test_a_reused_gate_seq_with_another_ride_is_a_conflict(svc: ServiceHarness) -> None:
    c, phone, _ = await rider(svc)
    at = int(time.time()) - 30
    rec = gate_record(svc, phone.next_code(at), at)
    assert (await upload(svc, [rec]))[0]["result"] == "approved"
    other = RideRecord(phone.next_code(at), rec.gate_id, rec.gate_seq, rec.line_id, rec.station_id, rec.direction,
                       rec.time, rec.deny_list_version)  # fmt: skip
    [ans] = await upload(svc, [other])
    assert (ans["result"], ans["reason"]) == ("conflict", "idempotency_conflict")
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE


async def test_rides_of_another_gate_or_a_bad_batch_are_refused(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, phone, _ = await rider(svc)
    at = int(time.time()) - 30
    body = ridecode.ride_batch_to_dict(RideBatch(svc.terminals[GATE_2].terminal_id, 1, [
        gate_record(svc, phone.next_code(at), at, gate=GATE_2)
    ]))  # fmt: skip
    r = await svc.post("/v1/transit/ride-batches", body, as_="transit_validator")
    assert r.status == 403 and r.body["code"] == "forbidden_operation" and r.body["field"] == "gate_id", r.body
    body["records"][0]["direction"] = "sideways"
    r = await svc.post("/v1/transit/ride-batches", body, as_=GATE_2)
    assert r.status == 400 and r.body["field"] == "records[0].direction", r.body
    body["records"] = body["records"] * (ridecode.RIDE_BATCH_RECORDS_MAX + 1)
    r = await svc.post("/v1/transit/ride-batches", body, as_=GATE_2)
    assert r.status == 400 and r.body["field"] == "records", r.body
    assert await svc.balance(c["card_no"]) == 1000
    assert await db.fetchval("SELECT count(*) FROM terminal_txn WHERE result <> 'approved'") == 0


async def test_a_full_batch_of_rides_from_many_phones(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    riders = [await rider(svc, 2000) for _ in range(4)]
    at = int(time.time()) - 60
    recs = [gate_record(svc, phone.next_code(at + i), at + i) for i in range(3) for _, phone, _ in riders]
    answers = await upload(svc, recs)
    assert {a["result"] for a in answers} == {"approved"}
    for c, _, _ in riders:
        assert await svc.balance(c["card_no"]) < 2000
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE source = $1", SOURCE_RIDECODE) == len(recs)


BUS = {"line_id": "bus-105", "station_id": "", "direction": "single", "deny_list_version": 0}


def at(s: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(s, dt.UTC)


async def test_a_ride_code_use_is_kept_as_long_as_a_copy_can_still_be_uploaded(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A gate accepts a code up to its lifetime and the clock skew after the phone stamped it, on the gate's
    clock, which may be the skew ahead of the phone's... and the server's; the record may come up to
    UPLOAD_AGE_S_MAX late. The code's use must be remembered that long: here every clock is as far apart as
    allowed, and a second gate's copy uploaded at the end of that window is still a replay."""
    services = svc.app[SERVICES]
    ctx = services.transit
    s = svc.settings
    skew, life = s.clock_skew_s, s.ecard_code_lifetime_s
    c = await svc.new_card(has_purse=True)
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": 1, "amount_fen": 1000, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    now = int(time.time())
    t0 = now - limits.UPLOAD_AGE_S_MAX - (2 * skew + life) - 40  # the first upload: 40 s past its retention
    key = sm.sm2_generate()
    async with services.pool.acquire() as conn:
        cert = await flow.issue_ride_cert(
            conn, services, ctx,
            {"card_no": c["card_no"], "alg": sm.ALG_SM2_SM3, "user_public_key": sm.public_key_bytes(key).hex()},
            at(t0 - 3600),
        )  # fmt: skip
    phone = ridecode.RidePhone(ridecode.decode_cert(bytes.fromhex(cert["cert"])), key)
    await maintenance_once(services.pool, s)  # the journal partitions back to the upload window
    gate = svc.terminals["transit_validator"].terminal_id
    # The phone's clock is `skew` ahead of the gate's, the gate's `skew` ahead of the server's: all allowed.
    code = phone.next_code(t0 + 2 * skew)
    first = RideRecord(code, gate, 101, time=t0 + skew, **BUS)
    [o1] = await rides_mod.charge_rides(services, ctx, RideBatch(gate, 1, [first]), now=at(t0))
    assert o1.result == "approved", o1
    # A second ride with the next code takes the transfer window's one discount.
    mid = RideRecord(phone.next_code(t0 + 400), gate, 104, time=t0 + 400, **BUS)
    [om] = await rides_mod.charge_rides(services, ctx, RideBatch(gate, 4, [mid]), now=at(t0 + 400))
    assert om.result == "approved", om
    # The use as the upload at t0 wrote it (used_at = the database's now() then).
    token = (cert["cert_serial"] << 32) | 1  # the first code's (cert_serial, counter)
    done = await db.execute("UPDATE credential_use SET used_at = $1 WHERE kind = 3 AND token = $2", at(t0), token)
    assert done == "UPDATE 1"
    # The same code in a second gate record, at the end of the code's validity at that gate (its clock).
    copy_at = t0 + 2 * skew + life + skew
    assert ridecode.verify_at_gate(code, ctx.issuer_public, copy_at, (), (), life, skew).ok
    control = RideRecord(code, gate, 102, time=copy_at, **BUS)
    [oc] = await rides_mod.charge_rides(services, ctx, RideBatch(gate, 2, [control]), now=at(now))
    assert (oc.result, oc.reason) == ("declined", "credential_replayed"), oc  # before maintenance: refused

    before = await svc.balance(c["card_no"])
    await maintenance_once(services.pool, s)
    copy = RideRecord(code, gate, 103, time=copy_at, **BUS)
    [o2] = await rides_mod.charge_rides(services, ctx, RideBatch(gate, 3, [copy]), now=at(int(time.time())))
    balance = await svc.balance(c["card_no"])
    # Refused as a replay, nothing charged (the use was pruned one clock skew too early before).
    assert (o2.result, o2.reason, before - balance) == ("declined", "credential_replayed", 0), (o2, before, balance)
