"""Online transit taps through the API: fares charged from the purse with the card discount, transfers
and penalties, idempotency per (terminal, terminal_seq), declines that move no money, every credential
kind, and races on one card. Expected fares come from the pure fare engine on the demo table.

After every test the ledger must hold: each purse's balance equals the sum of its journal rows, and no
purse is below its overdraft limit (the purse overdraft, or a ride-code certificate's credit).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cardsvc import metrics
from cardsvc.config import Settings
from cardsvc.transit import fares
from cardsvc.transit import taps as taps_mod
from protocols import ridecode, sm
from tests.helpers import (
    ServiceHarness,
    new_card_numbers,
    purse_vs_journal,
    replacement_body,
    until_lock_waits,
)
from tests.service.test_credentials import delta, verifications

TABLE = fares.load_demo_table()
BUS_FARE = fares.card_price_fen(TABLE.bus_lines["bus-105"].fare_fen, TABLE.rules.card_discount_percent)
_seq = itertools.count(1)


@pytest.fixture(autouse=True)
async def ledger_holds(db_dsn: str, settings: Settings) -> AsyncIterator[None]:
    yield
    rows = await purse_vs_journal(db_dsn)
    conn = await asyncpg.connect(db_dsn)
    try:
        orphans = await conn.fetchval(
            "SELECT count(*) FROM txn_journal j WHERE NOT EXISTS (SELECT 1 FROM purse p WHERE p.card_id = j.card_id)"
        )
    finally:
        await conn.close()
    assert orphans == 0
    for r in rows:
        assert r["balance_fen"] == r["journal"], dict(r)
        limit = settings.purse_overdraft_fen
        if r["has_cert"]:
            limit = max(limit, settings.ride_credit_limit_fen)
        assert r["balance_fen"] >= -limit, dict(r)


# ------------------------------------------------------------------ helpers


async def funded_card(svc: ServiceHarness, amount_fen: int = 1000) -> dict[str, Any]:
    c = await svc.new_card(has_purse=True)
    conn = await asyncpg.connect(svc.dsn)
    try:
        c["card_id"] = await conn.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    finally:
        await conn.close()
    if amount_fen:
        r = await svc.post(
            f"/v1/purses/{c['card_no']}/top-ups",
            {"terminal_seq": next(_seq), "amount_fen": amount_fen, "channel": "cash", "operator": "staff-1"},
        )
        assert r.status == 200 and r.body["balance_fen"] == amount_fen, r.body
    return c


def tap_body(
    svc: ServiceHarness,
    card_sn: str | None,
    *,
    seq: int | None = None,
    mode: str = "bus",
    line: str = "bus-105",
    station: str | None = None,
    direction: str = "single",
    at: int | None = None,
    credential: dict[str, Any] | None = None,
) -> dict[str, Any]:
    at = at if at is not None else int(time.time())
    body: dict[str, Any] = {
        "terminal_seq": next(_seq) if seq is None else seq,
        "time": at,
        "mode": mode,
        "line_id": line,
        "direction": direction,
    }
    if station is not None:
        body["station_id"] = station
    if credential is not None:
        body |= credential
    else:
        assert card_sn is not None
        body |= {"credential": "card", **svc.card_auth_body(card_sn)}
    return body


async def tap(svc: ServiceHarness, body: dict[str, Any], as_: str = "transit_validator") -> dict[str, Any]:
    r = await svc.post("/v1/transit/taps", body, as_=as_)
    assert r.status == 200, r.body
    return dict(r.body)


async def money_state(db: asyncpg.Connection) -> tuple[Any, ...]:
    """Everything a tap may change: balances, journeys, journal, answers, used credentials."""
    return (
        await db.fetch("SELECT card_id, balance_fen, journey FROM purse ORDER BY card_id"),
        await db.fetchval("SELECT count(*) FROM txn_journal"),
        await db.fetchval("SELECT count(*) FROM terminal_txn"),
        await db.fetchval("SELECT count(*) FROM credential_use"),
    )


def metro(station: str, direction: str) -> dict[str, Any]:
    return {"mode": "metro", "line": TABLE.stations[station].line, "station": station, "direction": direction}


# ------------------------------------------------------------------ approved fares


async def test_bus_tap_charges_the_card_discount_and_answers_the_balance(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 1000)
    assert BUS_FARE == 180  # ¥2 with the 10 % card discount (docs/fares.md)
    ans = await tap(svc, tap_body(svc, c["card_sn"]))
    assert ans["result"] == "approved" and ans["reason"] is None, ans
    assert ans["fare_fen"] == 180 and ans["balance_fen"] == 820
    assert ans["operator"] == "cq-bus" and "card_discount" in ans["rules"]
    assert ans["replayed_answer"] is False
    assert await svc.balance(c["card_no"]) == 820
    row = await db.fetchrow(
        "SELECT amount_fen, counterparty, line_id, kind FROM txn_journal WHERE txn_id = $1", ans["txn_id"]
    )
    assert row is not None and row["amount_fen"] == -180 and row["counterparty"] == "cq-bus"
    assert row["line_id"] == "bus-105"


async def test_metro_in_then_out_charges_the_distance_fare(svc: ServiceHarness) -> None:
    c = await funded_card(svc, 1000)
    now = int(time.time())
    a, b = "l1-chaotianmen", "l1-shapingba"
    expected = fares.card_price_fen(fares.metro_fare_fen(TABLE, a, b), TABLE.rules.card_discount_percent)
    assert expected == 360  # 15.4 km: base 400, with the card 360 (docs/fares.md)
    entry = await tap(svc, tap_body(svc, c["card_sn"], at=now - 120, **metro(a, "in")))
    assert entry["result"] == "approved" and entry["fare_fen"] == 0 and entry["balance_fen"] == 1000, entry
    out = await tap(svc, tap_body(svc, c["card_sn"], at=now, **metro(b, "out")))
    assert out["result"] == "approved" and out["fare_fen"] == expected, out
    assert out["distance_m"] == fares.metro_distance_m(TABLE, a, b)
    assert out["balance_fen"] == 1000 - expected == await svc.balance(c["card_no"])


async def test_transfer_bus_to_metro_within_the_window_is_discounted(svc: ServiceHarness) -> None:
    c = await funded_card(svc, 1000)
    now = int(time.time())
    a, b = "l1-chaotianmen", "l1-shapingba"
    bus = await tap(svc, tap_body(svc, c["card_sn"], at=now - 200))
    await tap(svc, tap_body(svc, c["card_sn"], at=now - 100, **metro(a, "in")))
    out = await tap(svc, tap_body(svc, c["card_sn"], at=now, **metro(b, "out")))
    # The engine on the same taps gives the expected charge: 360 - min(360, 180, 200) = 180.
    s = fares.fare(TABLE, fares.EMPTY_STATE, fares.Tap(now - 200, "bus", "bus-105")).state
    s = fares.fare(TABLE, s, fares.Tap(now - 100, "metro", "L1", a, "in")).state
    want = fares.fare(TABLE, s, fares.Tap(now, "metro", "L1", b, "out"))
    assert bus["fare_fen"] == 180
    assert out["fare_fen"] == want.amount_fen == 180 and out["transfer_discount_fen"] == 180, out
    assert "transfer_discount" in out["rules"]
    assert await svc.balance(c["card_no"]) == 1000 - 180 - 180


async def test_missing_tap_out_is_charged_at_the_next_tap_in(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 2000)
    now = int(time.time())
    await tap(svc, tap_body(svc, c["card_sn"], at=now - 100, **metro("l1-chaotianmen", "in")))
    again = await tap(svc, tap_body(svc, c["card_sn"], at=now, **metro("l2-daping", "in")))
    assert again["result"] == "approved", again
    assert again["fare_fen"] == TABLE.cap_fen == 700
    assert again["penalty"] == {"amount_fen": 700, "reason": "missing_tap_out"}
    assert again["balance_fen"] == 1300
    # The penalty is cleared under the broken journey's entry station and line, not the tap's.
    penalty_rows = "SELECT amount_fen, counterparty, line_id, station_id FROM txn_journal WHERE card_id = $1 AND kind = 2"
    rows = await db.fetch(penalty_rows, c["card_id"])
    assert [tuple(r) for r in rows] == [(-700, "cq-metro", "L1", "l1-chaotianmen")]
    # The new journey is open: leaving at 大坪 (L2) is the same station, the minimum fare.
    out = await tap(svc, tap_body(svc, c["card_sn"], at=now, **metro("l2-daping", "out")))
    assert out["fare_fen"] == 180 and "same_station_exit" in out["rules"], out
    assert await svc.balance(c["card_no"]) == 2000 - 700 - 180
    # A bus boarded with a journey open: the metro's penalty is not listed under the bus line.
    await tap(svc, tap_body(svc, c["card_sn"], at=now + 60, **metro("l2-yuanjiagang", "in")))
    bus = await tap(svc, tap_body(svc, c["card_sn"], at=now + 120))
    assert bus["penalty"] == {"amount_fen": 700, "reason": "missing_tap_out"}, bus
    rows = await db.fetch(penalty_rows + " ORDER BY txn_id", c["card_id"])
    assert tuple(rows[-1]) == (-700, "cq-metro", "L2", "l2-yuanjiagang")
    assert await svc.balance(c["card_no"]) == 2000 - 700 - 180 - bus["fare_fen"]  # the penalty and the bus fare


async def test_the_answer_comes_after_commit(svc: ServiceHarness, db_dsn: str) -> None:
    c = await funded_card(svc, 500)
    ans = await tap(svc, tap_body(svc, c["card_sn"]))
    other = await asyncpg.connect(db_dsn)  # a separate session sees the committed debit at once
    try:
        row = await other.fetchrow(
            "SELECT j.amount_fen, p.balance_fen FROM txn_journal j JOIN purse p ON p.card_id = j.card_id "
            "WHERE j.txn_id = $1",
            ans["txn_id"],
        )
        stored = await other.fetchrow(
            "SELECT result, amount_fen, balance_fen, txn_id FROM terminal_txn WHERE txn_id = $1", ans["txn_id"]
        )
    finally:
        await other.close()
    assert row is not None and row["amount_fen"] == -180 and row["balance_fen"] == ans["balance_fen"] == 320
    assert stored is not None and stored["result"] == "approved" and stored["balance_fen"] == 320


# ------------------------------------------------------------------ idempotency


async def test_a_retry_gets_the_stored_answer_and_no_second_debit(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 1000)
    body = tap_body(svc, c["card_sn"])
    taps_counted = metrics.TAPS.labels("bus", "approved", "")
    counted = taps_counted._value.get()
    first = await tap(svc, body)
    before = await money_state(db)
    again = await tap(svc, body)
    assert again["replayed_answer"] is True and first["replayed_answer"] is False
    assert {**again, "replayed_answer": False} == first
    assert await money_state(db) == before
    assert await svc.balance(c["card_no"]) == 820
    assert taps_counted._value.get() == counted + 1  # one tap, answered twice


async def test_same_key_with_another_payload_is_a_conflict_and_changes_nothing(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 1000)
    body = tap_body(svc, c["card_sn"])
    await tap(svc, body)
    d = await funded_card(svc, 1000)
    before = await money_state(db)
    changed = {**body, "line_id": "bus-261"}
    r = await svc.post("/v1/transit/taps", changed, as_="transit_validator")
    assert r.status == 409 and r.body["code"] == "idempotency_conflict" and r.body["field"] == "terminal_seq"
    # The same key with another card's fresh credential is refused the same way.
    other = {**tap_body(svc, d["card_sn"]), "terminal_seq": body["terminal_seq"]}
    r = await svc.post("/v1/transit/taps", other, as_="transit_validator")
    assert r.status == 409 and r.body["code"] == "idempotency_conflict"
    assert await money_state(db) == before
    assert await svc.balance(d["card_no"]) == 1000


async def test_the_same_seq_from_another_terminal_is_another_tap(svc: ServiceHarness) -> None:
    c = await funded_card(svc, 1000)
    body = tap_body(svc, c["card_sn"])
    await tap(svc, body, as_="transit_validator")
    second = await tap(svc, {**tap_body(svc, c["card_sn"]), "terminal_seq": body["terminal_seq"]}, as_="card_office")
    assert second["result"] == "approved" and second["replayed_answer"] is False
    assert await svc.balance(c["card_no"]) == 1000 - 180 - 0  # the second bus ride is a transfer


# ------------------------------------------------------------------ declines (no money moved)


async def declined(svc: ServiceHarness, db: asyncpg.Connection, body: dict[str, Any], reason: str) -> dict[str, Any]:
    before = await money_state(db)
    ans = await tap(svc, body)
    assert ans["result"] == "declined" and ans["reason"] == reason, ans
    assert ans["fare_fen"] == 0 and ans["txn_id"] is None
    after = await money_state(db)
    assert after[0] == before[0] and after[1] == before[1], "a decline moved money"
    # The decline is stored: a retry gets the same answer.
    again = await tap(svc, body)
    assert again["replayed_answer"] is True and {**again, "replayed_answer": False} == ans
    return ans


async def test_insufficient_balance(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 100)
    ans = await declined(svc, db, tap_body(svc, c["card_sn"]), "insufficient_balance")
    assert ans["balance_fen"] == 100 and ans["fare_due_fen"] == 180
    assert await svc.balance(c["card_no"]) == 100


async def test_metro_entry_needs_the_minimum_fare(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 100)
    await declined(svc, db, tap_body(svc, c["card_sn"], **metro("l1-chaotianmen", "in")), "insufficient_balance")


async def test_metro_entry_minimum_follows_the_card_price_and_concession(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 180)  # exactly the minimum fare with the card discount
    entry = await tap(svc, tap_body(svc, c["card_sn"], **metro("l1-chaotianmen", "in")))
    assert entry["result"] == "approved", entry
    free = await funded_card(svc, 0)
    await db.execute(
        "INSERT INTO concession (holder_id, kind) SELECT holder_id, 'disabled_free' FROM card WHERE card_id = $1",
        free["card_id"],
    )
    now = int(time.time())
    ans = await tap(svc, tap_body(svc, free["card_sn"], at=now - 60, **metro("l1-chaotianmen", "in")))
    assert ans["result"] == "approved", ans
    ans = await tap(svc, tap_body(svc, free["card_sn"], at=now, **metro("l1-shapingba", "out")))
    assert ans["result"] == "approved" and ans["fare_fen"] == 0 and "disabled_free" in ans["rules"], ans


async def test_temporary_loss_is_refused_from_the_very_next_tap(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 1000)
    await tap(svc, tap_body(svc, c["card_sn"]))
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})
    assert r.status == 200, r.body
    ans = await declined(svc, db, tap_body(svc, c["card_sn"]), "card_unusable")
    assert ans["card_status"] == "temporary_loss"
    r = await svc.post(f"/v1/cards/{c['card_no']}/lift-loss", {"operator": "staff-1"})
    assert r.status == 200, r.body
    assert (await tap(svc, tap_body(svc, c["card_sn"])))["result"] == "approved"


async def test_a_purse_locked_past_the_lock_timeout_answers_503_and_changes_nothing(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A purse row held longer than the pool's lock_timeout (3 s) by another transaction: the tap and the
    top-up waiting for it are rolled back and answered 503 `timeout` with Retry-After, not 500; sent again
    once the lock is gone, they go through under the same sequence numbers."""
    c = await funded_card(svc, 1000)
    body = tap_body(svc, c["card_sn"])
    top = {"terminal_seq": next(_seq), "amount_fen": 100, "channel": "cash", "operator": "staff-1"}
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", c["card_id"])
        before = await money_state(db)
        waited = await asyncio.gather(
            svc.post("/v1/transit/taps", body, as_="transit_validator"),
            svc.post(f"/v1/purses/{c['card_no']}/top-ups", top),
        )
        assert [(r.status, r.body["code"]) for r in waited] == [(503, "timeout")] * 2, [r.body for r in waited]
        assert all(r.headers.get("Retry-After") for r in waited)
        assert await money_state(db) == before
    assert (await tap(svc, body))["result"] == "approved"  # the same tap again: its card answer unused
    r = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", top)
    assert r.status == 200 and r.body["balance_fen"] == 1000 - 180 + 100, r.body


async def test_a_tap_that_waited_for_a_replacement_is_refused_not_charged_to_the_dead_card(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A replacement locks the old card's purse, moves its balance to the new card and kills the old one.
    A tap whose statement began before that committed, then waited for the purse lock, must be refused:
    its snapshot still shows the card active, and the purse it gets is the emptied one."""
    c = await funded_card(svc, 500)
    body = replacement_body()
    async with db.transaction():
        # The replacement stops at its hotlist entry, after the purse has moved, holding the purse lock.
        await db.execute("SELECT 1 FROM hotlist_head FOR UPDATE")
        replace = asyncio.create_task(
            svc.post(
                f"/v1/cards/{c['card_no']}/replace",
                {**body, "operator": "staff-1"},
            )
        )
        await until_lock_waits(db, 1)
        pending = asyncio.create_task(tap(svc, tap_body(svc, c["card_sn"])))
        await until_lock_waits(db, 2)
    assert (await replace).status == 200
    ans = await pending
    assert (ans["result"], ans["reason"], ans.get("card_status")) == ("declined", "card_unusable", "replaced"), ans
    fares_on_old = await db.fetchval(
        "SELECT count(*) FROM txn_journal WHERE card_id = $1 AND kind IN (1, 2)", c["card_id"]
    )
    balances = await db.fetch(
        "SELECT c.card_no, p.balance_fen FROM purse p JOIN card c USING (card_id) WHERE c.card_no = ANY($1)",
        [c["card_no"], body["new_card_no"]],
    )
    assert fares_on_old == 0
    assert {r["card_no"]: r["balance_fen"] for r in balances} == {c["card_no"]: 0, body["new_card_no"]: 500}


async def test_the_replacement_card_carries_the_fare_state_on(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """The purse moves to the replacement with its fare state: a metro journey the old card left open is
    charged at the new card's next tap, and the day's transfer window goes on."""
    c = await funded_card(svc, 2000)
    now = int(time.time())
    entered = await tap(svc, tap_body(svc, c["card_sn"], at=now - 120, **metro("l1-chaotianmen", "in")))
    assert entered["result"] == "approved", entered
    body = replacement_body()
    r = await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})
    assert r.status == 200, r.body
    again = await tap(svc, tap_body(svc, body["new_card_sn"], at=now, **metro("l2-daping", "in")))
    assert again["result"] == "approved" and again.get("penalty") == {"amount_fen": 700, "reason": "missing_tap_out"}, again
    out = await tap(svc, tap_body(svc, body["new_card_sn"], at=now + 60, **metro("l2-daping", "out")))
    bus = await tap(svc, tap_body(svc, body["new_card_sn"], at=now + 120))
    assert bus["transfer_discount_fen"] > 0, bus  # the window of the exit just before goes on
    assert await svc.balance(body["new_card_no"]) == 2000 - 700 - out["fare_fen"] - bus["fare_fen"]
    assert await db.fetchval("SELECT journey FROM purse WHERE card_id = $1", c["card_id"]) is None


async def test_forged_expired_and_replayed_card_credentials(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 1000)
    before = await verifications(svc)
    forged = tap_body(svc, c["card_sn"])
    forged["cryptogram"] = ("0" if forged["cryptogram"][0] != "0" else "1") + forged["cryptogram"][1:]
    await declined(svc, db, forged, "credential_forged")
    old = int(time.time()) - svc.settings.card_challenge_age_s - svc.settings.clock_skew_s - 10
    expired = tap_body(svc, None, credential={"credential": "card", **svc.card_auth_body(c["card_sn"], now_s=old)})
    await declined(svc, db, expired, "credential_expired")
    body = tap_body(svc, c["card_sn"])
    assert (await tap(svc, body))["result"] == "approved"
    replay = {**body, "terminal_seq": next(_seq)}  # the same card answer under a new terminal sequence
    await declined(svc, db, replay, "credential_replayed")
    assert await svc.balance(c["card_no"]) == 820
    # Counted with every other credential check, which the forged-or-replayed alert watches; a retry of
    # an answered tap (its stored answer) is not a second check.
    assert (await tap(svc, body))["replayed_answer"] is True
    assert delta(before, await verifications(svc)) == {
        ("card_cryptogram", "forged"): 1,
        ("card_cryptogram", "expired"): 1,
        ("card_cryptogram", "ok"): 1,
        ("card_cryptogram", "replayed"): 1,
    }


async def test_unknown_card(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    _, card_sn = new_card_numbers()  # a well-formed card with a valid cryptogram, never issued here
    await declined(svc, db, tap_body(svc, card_sn), "unknown_card")


async def test_card_without_a_transit_purse(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """Declined `no_transit_purse`, which the batch answers before the credential's single-use check: not a
    whole verification, so not counted as an `ok` one (a replayed cryptogram was counted `ok`, hiding it
    from the forged-or-replayed alert). A forged one is still refused and counted as such."""
    c = await svc.new_card(has_purse=False)

    async def counted(outcome: str) -> float:
        return await svc.metric_total("cardsvc_credential_verifications_total", kind="card_cryptogram", outcome=outcome)

    ok_before = await counted("ok")
    body = tap_body(svc, c["card_sn"])
    await declined(svc, db, body, "no_transit_purse")
    await declined(svc, db, {**body, "terminal_seq": next(_seq)}, "no_transit_purse")  # the same cryptogram
    assert await counted("ok") == ok_before
    forged_before = await counted("forged")
    forged = tap_body(svc, c["card_sn"])
    forged["cryptogram"] = ("0" if forged["cryptogram"][0] != "0" else "1") + forged["cryptogram"][1:]
    await declined(svc, db, forged, "credential_forged")
    assert await counted("forged") == forged_before + 1


# ------------------------------------------------------------------ e-card codes and ride codes


async def test_ecard_code_tap(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 1000)
    device = await svc.new_ecard(c["card_no"])
    code = device.next_code(int(time.time()))
    ans = await tap(svc, tap_body(svc, None, credential={"credential": "ecard_code", "code": code}))
    assert ans["result"] == "approved" and ans["fare_fen"] == 180 and ans["balance_fen"] == 820, ans
    await declined(svc, db, tap_body(svc, None, credential={"credential": "ecard_code", "code": code}),
                   "credential_replayed")
    stale = device.next_code(int(time.time()) - svc.settings.ecard_code_lifetime_s - svc.settings.clock_skew_s - 5)
    await declined(svc, db, tap_body(svc, None, credential={"credential": "ecard_code", "code": stale}),
                   "credential_expired")
    assert await svc.balance(c["card_no"]) == 820


async def test_an_ecard_revoked_before_or_while_its_tap_waits_is_refused(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 1000)
    device = await svc.new_ecard(c["card_no"])
    code = device.next_code(int(time.time()))
    async with db.transaction():  # something holds the purse (a batch, a top-up): both wait for it
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", c["card_id"])
        revoke = asyncio.create_task(
            svc.post(f"/v1/ecards/{device.ecard_id}/revoke", {"operator": "staff-1"}, as_="ecard_channel")
        )
        await until_lock_waits(db)
        # The tap was checked (and its e-card read) while the revocation waited; it waits behind it.
        pending = asyncio.create_task(tap(svc, tap_body(svc, None, credential={"credential": "ecard_code", "code": code})))
        await until_lock_waits(db, 2)
    r = await revoke
    assert r.status == 200 and r.body["status"] == "revoked", r.body
    ans = await pending  # the revocation committed first: the tap must not be charged
    assert (ans["result"], ans["reason"], ans.get("card_status")) == ("declined", "card_unusable", "revoked"), ans
    later = await declined(
        svc, db, tap_body(svc, None, credential={"credential": "ecard_code", "code": device.next_code(int(time.time()))}),
        "card_unusable",
    )  # fmt: skip
    assert later["card_status"] == "revoked"
    assert await svc.balance(c["card_no"]) == 1000


async def test_a_revocation_waits_for_a_tap_batch_that_already_read_the_ecard(
    svc: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation sent after the batch read the e-card's state and before it wrote: it waits for the
    batch's purse lock, so it is answered after the tap is committed, never before an approved debit."""
    c = await funded_card(svc, 1000)
    device = await svc.new_ecard(c["card_no"])
    code = device.next_code(int(time.time()))
    real = taps_mod._write
    seen: dict[str, Any] = {}

    async def write(*args: Any) -> Any:
        if not seen:
            revoke = asyncio.create_task(
                svc.post(f"/v1/ecards/{device.ecard_id}/revoke", {"operator": "staff-1"}, as_="ecard_channel")
            )
            done, _ = await asyncio.wait({revoke}, timeout=1.0)
            seen["answered_first"], seen["task"] = bool(done), revoke
        return await real(*args)

    monkeypatch.setattr(taps_mod, "_write", write)
    ans = await tap(svc, tap_body(svc, None, credential={"credential": "ecard_code", "code": code}))
    assert seen["answered_first"] is False  # it waited for the batch
    assert ans["result"] == "approved" and ans["balance_fen"] == 820, ans
    r = await seen["task"]
    assert r.status == 200 and r.body["status"] == "revoked", r.body


async def test_a_revocation_that_waited_for_a_replacement_waits_for_the_new_cards_tap_batch(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A revocation that waited for the old card's purse while a replacement moved the e-card to the new
    card: a tap batch of the new card that read the e-card unrevoked holds the new card's purse, and the
    revocation is answered only after that batch, never before a debit it did not stop."""
    old, new = await funded_card(svc, 1000), await funded_card(svc, 1000)
    device = await svc.new_ecard(old["card_no"])
    mover, batch = await asyncpg.connect(svc.dsn), await asyncpg.connect(svc.dsn)
    try:
        moving = mover.transaction()  # the replacement: the old card's purse, then the e-card moves
        await moving.start()
        await mover.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", old["card_id"])
        await mover.execute("UPDATE ecard SET card_id = $2 WHERE ecard_id = $1", device.ecard_id, new["card_id"])
        revoke = asyncio.create_task(
            svc.post(f"/v1/ecards/{device.ecard_id}/revoke", {"operator": "staff-1"}, as_="ecard_channel")
        )
        await until_lock_waits(db)
        tapping = batch.transaction()  # a tap batch of the new card, which has read the e-card unrevoked
        await tapping.start()
        await batch.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", new["card_id"])
        await moving.commit()
        await until_lock_waits(db)  # the revocation now waits for the batch
        assert not revoke.done()
        await tapping.rollback()
        r = await revoke
        assert r.status == 200 and r.body["status"] == "revoked", r.body
    finally:
        await mover.close()
        await batch.close()


async def ride_phone(svc: ServiceHarness, card_no: str) -> ridecode.RidePhone:
    key = sm.sm2_generate()
    r = await svc.post(
        "/v1/ride-certs",
        {"card_no": card_no, "alg": sm.ALG_SM2_SM3, "user_public_key": sm.public_key_bytes(key).hex()},
        as_="ecard_channel",
    )
    assert r.status == 201, r.body
    return ridecode.RidePhone(ridecode.decode_cert(bytes.fromhex(r.body["cert"])), key)


async def test_ride_code_tap(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 1000)
    phone = await ride_phone(svc, c["card_no"])
    code = phone.next_code(int(time.time()))
    ans = await tap(svc, tap_body(svc, None, credential={"credential": "ride_code", "code": code}))
    assert ans["result"] == "approved" and ans["fare_fen"] == 180 and ans["balance_fen"] == 820, ans
    await declined(svc, db, tap_body(svc, None, credential={"credential": "ride_code", "code": code}),
                   "credential_replayed")
    # A code whose user signature does not verify (another phone key, same certificate).
    unsigned = ridecode.RideCode(phone.cert, int(time.time()), 100, b"")
    forged = ridecode.encode_code(
        ridecode.RideCode(phone.cert, unsigned.time, 100, sm.sign(sm.sm2_generate(), ridecode.code_signed_bytes(unsigned)))
    )
    await declined(svc, db, tap_body(svc, None, credential={"credential": "ride_code", "code": forged}),
                   "credential_forged")
    assert await svc.balance(c["card_no"]) == 820


async def test_an_online_ride_code_tap_is_charged_at_most_the_certificates_max_fare(svc: ServiceHarness) -> None:
    from tests.transit.test_rides import backdated_phone

    c = await funded_card(svc, 1000)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 60, max_fare_fen=100)
    ans = await tap(svc, tap_body(svc, None, credential={"credential": "ride_code", "code": phone.next_code(now)}))
    assert ans["result"] == "approved" and ans["fare_fen"] == 100 and ans["balance_fen"] == 900, ans
    assert "ride_code_max_fare" in ans["rules"]


async def test_ride_code_rides_on_credit_up_to_the_certificate_limit(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 0)
    phone = await ride_phone(svc, c["card_no"])
    ans = await tap(svc, tap_body(svc, None, credential={"credential": "ride_code", "code": phone.next_code(
        int(time.time()))}))
    assert ans["result"] == "approved" and ans["balance_fen"] == -180, ans
    # A plain card tap on the same purse does not get the ride-code credit.
    await declined(svc, db, tap_body(svc, c["card_sn"]), "insufficient_balance")


# ------------------------------------------------------------------ bad input: 400, nothing changed


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mode": "metro", "line_id": "L1", "station_id": "l1-nowhere", "direction": "in"}, "station_id"),
        ({"direction": "in"}, "direction"),
        ({"line_id": "bus-999"}, "line_id"),
        ({"mode": "metro", "line_id": "L1", "station_id": "l1-chaotianmen", "direction": "single"}, "direction"),
        ({"credential": "ecard_code"}, "code"),
        # a line that does not serve the station: not a stored fare_input_invalid decline
        ({"mode": "metro", "line_id": "L2", "station_id": "l1-chaotianmen", "direction": "in"}, "line_id"),
        ({"station_id": "no-such-stop"}, "station_id"),  # no bus stops in the fare table to check it
    ],
)
async def test_bad_input_is_refused_with_nothing_changed(
    svc: ServiceHarness, db: asyncpg.Connection, change: dict[str, Any], field: str
) -> None:
    c = await funded_card(svc, 1000)
    body = tap_body(svc, c["card_sn"])
    before = await money_state(db)
    r = await svc.post("/v1/transit/taps", {**body, **change}, as_="transit_validator")
    assert r.status == 400 and r.body["field"] == field, r.body
    assert await money_state(db) == before
    # The sequence number was not consumed: the corrected tap is accepted under it.
    assert (await tap(svc, body))["result"] == "approved"


async def test_a_signed_tap_sent_again_byte_for_byte_is_replayed_and_charged_once(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    # The tap's nonce is recorded inside the batch's transaction (not by the middleware): the same
    # guarantee, checked here for a resent request, a resent refused request and a nonce reused elsewhere.
    c = await funded_card(svc, 1000)
    body, now, nonce = tap_body(svc, c["card_sn"]), int(time.time()), "tap-nonce-once-0001"
    first = await svc.post("/v1/transit/taps", body, as_="transit_validator", now_s=now, nonce=nonce)
    assert first.status == 200 and first.body["result"] == "approved", first.body
    before = await money_state(db)
    again = await svc.post("/v1/transit/taps", body, as_="transit_validator", now_s=now, nonce=nonce)
    assert again.status == 401 and again.body["code"] == "auth_replayed", again.body
    assert await money_state(db) == before
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE
    # The nonce is spent for the terminal's other operations too.
    r = await svc.get("/v1/hotlist", as_="transit_validator", nonce=nonce)
    assert r.status == 401 and r.body["code"] == "auth_replayed"
    # ... and a nonce spent elsewhere cannot carry a tap.
    await svc.get("/v1/hotlist", as_="transit_validator", nonce="spent-on-hotlist-01")
    r = await svc.post("/v1/transit/taps", tap_body(svc, c["card_sn"]), as_="transit_validator",
                       nonce="spent-on-hotlist-01")  # fmt: skip
    assert r.status == 401 and r.body["code"] == "auth_replayed"
    assert await money_state(db) == before
    # A refused tap uses up its nonce: resent, it is a replay.
    bad = {**tap_body(svc, c["card_sn"]), "line_id": "no-such-line"}
    r = await svc.post("/v1/transit/taps", bad, as_="transit_validator", now_s=now, nonce="bad-tap-nonce-001")
    assert r.status == 400 and r.body["code"] == "invalid_field", r.body
    r = await svc.post("/v1/transit/taps", bad, as_="transit_validator", now_s=now, nonce="bad-tap-nonce-001")
    assert r.status == 401 and r.body["code"] == "auth_replayed"
    assert await money_state(db) == before


async def test_the_same_signed_tap_sent_concurrently_is_answered_once(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    # Copies of one signed request land in one batch or in concurrent ones: exactly one is answered.
    c = await funded_card(svc, 1000)
    body, now = tap_body(svc, c["card_sn"]), int(time.time())
    results = await asyncio.gather(
        *(
            svc.post("/v1/transit/taps", body, as_="transit_validator", now_s=now, nonce="raced-nonce-00001")
            for _ in range(8)
        )
    )
    statuses = sorted(r.status for r in results)
    assert statuses == [200] + [401] * 7, [(r.status, r.body) for r in results]
    assert all(r.body["code"] == "auth_replayed" for r in results if r.status == 401)
    assert await svc.balance(c["card_no"]) == 1000 - BUS_FARE
    assert await db.fetchval("SELECT count(*) FROM request_nonce WHERE nonce = 'raced-nonce-00001'") == 1


async def test_a_tap_stamped_outside_the_clock_window_is_declined_and_a_late_retry_gets_its_answer(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 1000)
    before = await money_state(db)
    far = {**tap_body(svc, c["card_sn"]), "time": 1_000_000_000}
    r = await svc.post("/v1/transit/taps", far, as_="transit_validator")
    assert (r.status, r.body["result"], r.body["reason"]) == (200, "declined", "tap_time_out_of_window"), r.body
    after = await money_state(db)
    # No money moved and no credential was used; only the answer is stored (for retries).
    assert (after[0], after[1], after[3]) == (before[0], before[1], before[3]) and after[2] == before[2] + 1
    # An answered tap retried after the window (its time now far from the clock) gets the stored answer.
    body = tap_body(svc, c["card_sn"])
    first = await tap(svc, body)
    assert first["result"] == "approved"
    await db.execute(
        "UPDATE terminal_txn SET at = at - interval '1 hour' WHERE terminal_seq = $1", body["terminal_seq"]
    )
    late = {**body, "time": body["time"]}
    r = await svc.post("/v1/transit/taps", late, as_="transit_validator")
    assert r.body["replayed_answer"] is True and r.body["txn_id"] == first["txn_id"], r.body


async def test_a_terminal_without_the_tap_operation_is_forbidden(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 1000)
    before = await money_state(db)
    r = await svc.post("/v1/transit/taps", tap_body(svc, c["card_sn"]), as_="merchant_pos")
    assert r.status == 403 and r.body["code"] == "forbidden_operation"
    assert await money_state(db) == before


# ------------------------------------------------------------------ races


async def test_concurrent_taps_on_one_card_never_overspend(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 1000)
    bodies = [tap_body(svc, c["card_sn"]) for _ in range(30)]
    answers = await asyncio.gather(*(tap(svc, b) for b in bodies))
    approved = [a for a in answers if a["result"] == "approved"]
    refused = [a for a in answers if a["result"] != "approved"]
    # Bus after bus within the hour: one transfer ride is free, then every ride pays 180 (one discount
    # per window). 1000 pays 5 rides of 180 and leaves 100.
    assert sorted(a["fare_fen"] for a in approved) == [0, 180, 180, 180, 180, 180]
    assert len(refused) == 24 and {a["reason"] for a in refused} == {"insufficient_balance"}
    assert await svc.balance(c["card_no"]) == 100
    assert min(a["balance_fen"] for a in approved) == 100
    # Each approved answer's balance is distinct where money moved: a serial history.
    paid = sorted((a["balance_fen"] for a in approved if a["fare_fen"]), reverse=True)
    assert paid == [820, 640, 460, 280, 100]
    total = await db.fetchval(
        "SELECT sum(amount_fen) FROM txn_journal WHERE card_id = $1 AND kind = 1", c["card_id"]
    )
    assert total == -900
    assert await db.fetchval(
        "SELECT count(*) FROM terminal_txn WHERE card_id = $1 AND result = 'approved' AND txn_id IS NOT NULL "
        "AND terminal_id = $2", c["card_id"], svc.terminals["transit_validator"].terminal_id
    ) == 6


async def test_the_same_tap_sent_concurrently_is_charged_once(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 1000)
    body = tap_body(svc, c["card_sn"])
    answers = await asyncio.gather(*(tap(svc, body) for _ in range(20)))
    assert sum(not a["replayed_answer"] for a in answers) == 1
    assert len({tuple(sorted((k, str(v)) for k, v in a.items() if k != "replayed_answer")) for a in answers}) == 1
    assert answers[0]["result"] == "approved" and answers[0]["txn_id"] is not None
    assert await svc.balance(c["card_no"]) == 820
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE card_id = $1 AND kind IN (1, 2)", c["card_id"]) == 1


async def test_one_card_twice_at_once_is_charged_in_sequence(svc: ServiceHarness) -> None:
    c = await funded_card(svc, 1000)
    first, second = await asyncio.gather(tap(svc, tap_body(svc, c["card_sn"])), tap(svc, tap_body(svc, c["card_sn"])))
    assert first["result"] == second["result"] == "approved"
    # Whichever went first paid 180 and opened the window; the other is the free transfer.
    assert sorted([first["fare_fen"], second["fare_fen"]]) == [0, 180]
    final = await svc.balance(c["card_no"])
    assert final == 1000 - first["fare_fen"] - second["fare_fen"] == 820
    assert first["balance_fen"] == second["balance_fen"] == final


async def test_many_cards_in_concurrent_batches(svc: ServiceHarness) -> None:
    cards = [await funded_card(svc, 600) for _ in range(4)]
    bodies = [tap_body(svc, c["card_sn"]) for c in cards for _ in range(4)]
    answers = await asyncio.gather(*(tap(svc, b) for b in bodies))
    assert all(a["result"] == "approved" for a in answers)
    for c in cards:
        assert await svc.balance(c["card_no"]) == 600 - 180 - 0 - 180 - 180
