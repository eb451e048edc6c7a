"""Where the card lifecycle bounds transit (real PostgreSQL; docs/api.md, docs/transit.md "What the tap
engine decides at upload time"): a temporary loss ends 15 days after its report whatever flag changes
meanwhile, a ride-code certificate does not outlive its card, and a journey begun on the card's last valid
day is charged its fare when it is uploaded after it.

After every test the ledger must hold: each purse's balance equals the sum of its journal rows."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cardsvc import localtime
from cardsvc.flows import views
from cardsvc.http.keys import SERVICES
from cardsvc.store.pool import create_pool
from cardsvc.transit import fares, flow, sweep
from protocols import ridecode, sm
from protocols.ridecode import RideBatch, RideRecord
from tests.helpers import ServiceHarness, purse_vs_journal
from tests.service.test_lifecycle import card_op, ok
from tests.transit.test_taps import ride_phone

TABLE = fares.load_demo_table()
ENTRY_STATION, EXIT_STATION = "l1-chaotianmen", "l1-daping"
RIDE = fares.card_price_fen(fares.metro_fare_fen(TABLE, ENTRY_STATION, EXIT_STATION), TABLE.rules.card_discount_percent)
GATE_2 = "card_office"  # a second terminal allowed to upload rides
_seq = itertools.count(7_000)  # top-up and gate keys


@pytest.fixture(autouse=True)
async def ledger_holds(db_dsn: str) -> AsyncIterator[None]:
    yield
    for r in await purse_vs_journal(db_dsn):
        assert r["balance_fen"] == r["journal"], dict(r)


async def expired_rider(
    svc: ServiceHarness, db: asyncpg.Connection, days_ago: int = 2
) -> tuple[dict[str, Any], ridecode.RidePhone, int]:
    """A card topped up with 1000 fen whose last valid day was `days_ago` days ago, and a phone with a
    ride-code certificate the service issued before then (bounded by the card's last valid second, as
    flow.py bounds it). Returns the card, the phone and the certificate's valid_to."""
    c = await svc.new_card(has_purse=True)
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": next(_seq), "amount_fen": 1000, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    last_day = localtime.local_date(dt.datetime.now(dt.UTC)) - dt.timedelta(days=days_ago)
    valid_to = int(localtime.day_end(last_day).timestamp())
    valid_from = valid_to - 2 * 86400
    card_id = await db.fetchval(
        "UPDATE card SET expires_on = $2 WHERE card_no = $1 RETURNING card_id", c["card_no"], last_day
    )
    ctx = svc.app[SERVICES].transit
    key = sm.sm2_generate()
    serial = await db.fetchval(
        """INSERT INTO ride_cert (card_id, alg, user_key, valid_from, valid_to)
           VALUES ($1, $2, $3, to_timestamp($4), to_timestamp($5)) RETURNING cert_serial""",
        card_id, sm.ALG_SM2_SM3, sm.public_key_bytes(key), valid_from, valid_to,
    )  # fmt: skip
    cert = ridecode.issue_cert(
        ctx.issuer_private, issuer_key_id=flow.ISSUER_KEY_ID, cert_serial=serial, account_id=card_id,
        alg=sm.ALG_SM2_SM3, user_public_key=sm.public_key_bytes(key), valid_from=valid_from, valid_to=valid_to,
        max_fare_fen=svc.settings.ride_max_fare_fen, credit_limit_fen=svc.settings.ride_credit_limit_fen,
    )  # fmt: skip
    return c, ridecode.RidePhone(cert, key), valid_to


def metro(svc: ServiceHarness, phone: ridecode.RidePhone, at: int, direction: str, gate: str) -> RideRecord:
    """A metro ride record at `at`, checked as the gate checks it (default gate skew)."""
    code = phone.next_code(at)
    ctx = svc.app[SERVICES].transit
    decision = ridecode.verify_at_gate(code, ctx.issuer_public, at, (), ())
    assert decision.ok, (decision.outcome, at)  # the gate let the rider through
    station = ENTRY_STATION if direction == "in" else EXIT_STATION
    return RideRecord(code, svc.terminals[gate].terminal_id, next(_seq), "L1", station, direction, at, 0)


async def upload(svc: ServiceHarness, rec: RideRecord, gate: str) -> dict[str, Any]:
    r = await svc.post(
        "/v1/transit/ride-batches",
        ridecode.ride_batch_to_dict(RideBatch(rec.gate_id, next(_seq), [rec])),
        as_=gate,
    )
    assert r.status == 200, r.body
    [answer] = r.body["records"]
    return dict(answer)


async def sweep_after_timeout(svc: ServiceHarness) -> sweep.SweepResult:
    now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=TABLE.rules.journey_timeout_s + 60)
    pool = await create_pool(svc.dsn, svc.settings)
    try:
        return await sweep.sweep_timed_out_journeys(pool, TABLE, svc.settings.purse_overdraft_fen, now=now)
    finally:
        await pool.close()


# ------------------------------------------------------------------ temporary loss: its own period only


async def test_a_pin_or_app_lock_does_not_extend_a_temporary_loss(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md: a temporary loss ends by itself 15 days after the report; `lock-pin`/`lock-app` (and
    their unlocks) only change a flag. A card office locking the PIN of a card reported lost 14 days ago
    does not give the report another 15 days (before, it did: the card stayed refused everywhere for up to a
    month)."""
    c = await svc.new_card()
    no = c["card_no"]
    await ok(svc, no, "temporary-loss")
    # The report was made 14 days ago: one day of it is left.
    await db.execute("UPDATE card SET temp_loss_until = now() + interval '1 day' WHERE card_no = $1", no)
    until = await db.fetchval("SELECT temp_loss_until FROM card WHERE card_no = $1", no)
    for op in ("lock-pin", "lock-app", "unlock-app", "unlock-pin"):
        r = await card_op(svc, no, op)
        assert r.status == 200, (op, r.body)
        assert r.body["status"] == "temporary_loss"
        after = await db.fetchval("SELECT temp_loss_until FROM card WHERE card_no = $1", no)
        assert after == until, (op, until, after)


# ------------------------------------------------------------------ ride-code certificates and card expiry


async def test_a_ride_certificate_does_not_outlive_its_card(svc: ServiceHarness) -> None:
    """A gate checks a ride code offline: its certificate's `valid_to` and the hotlist's blocked accounts.
    An expired card is not on the hotlist (it was never lost), so the certificate is the gate's only bound.
    Issued on a card that expires tomorrow, it ends with the card's last valid local day. (Before, it was
    signed for RIDE_CERT_DAYS (30) anyway: for four weeks after that day the gate let the phone through,
    and the uploaded ride was declined `card_unusable`, a ride nobody paid for.)"""
    tomorrow = localtime.local_date(dt.datetime.now(dt.UTC)) + dt.timedelta(days=1)
    c = await svc.new_card(has_purse=True, expires_on=tomorrow)
    phone = await ride_phone(svc, c["card_no"])
    cert = phone.cert
    issuer = svc.app[SERVICES].transit.issuer_public
    # The first instant the card is no longer valid: local midnight after its expires_on.
    offset = dt.timedelta(minutes=localtime.utc_offset_minutes())
    card_ends = dt.datetime.combine(tomorrow + dt.timedelta(days=1), dt.time(), dt.UTC) - offset
    # A week after that, the service refuses the card (online tap, upload) ...
    later = card_ends + dt.timedelta(days=7)
    row = {"status": 2, "temp_loss_until": None, "app_locked": False, "expires_on": tomorrow}
    assert not views.usable(row, later)
    # ... and so must the gate, which has only the certificate to go by.
    at = int(later.timestamp())
    decision = ridecode.verify_at_gate(phone.next_code(at), issuer, at, (), ())
    assert not decision.ok, (decision.outcome, cert.valid_to, int(card_ends.timestamp()))
    assert cert.valid_to < int(card_ends.timestamp()) + 1


# ------------------------------------------------------------------ card expiry: rides through the last valid day


async def test_a_ride_on_the_cards_last_valid_day_uploaded_after_it_is_charged(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A gate uploads its rides later, up to UPLOAD_AGE_S_MAX after them. A ride taken on the card's last
    valid day (the certificate still valid, the gate right to let the rider through) and uploaded the next
    day, the card expired by then, is charged: expiry is a date on the card, not a stop of it. Before, it
    was declined `card_unusable` and went unpaid. A ride after that day stays declined (the gate holds the
    certificate's `valid_to`, and the service verifies the code as the gate did)."""
    c, phone, valid_to = await expired_rider(svc, db, days_ago=1)
    ctx = svc.app[SERVICES].transit
    on_last_day = valid_to - 3600  # 23:00 local on the last valid day
    after_it = valid_to + 7200  # beyond any clock skew
    codes = [phone.next_code(on_last_day), phone.next_code(after_it)]
    assert ridecode.verify_at_gate(codes[0], ctx.issuer_public, on_last_day, (), ()).ok
    assert not ridecode.verify_at_gate(codes[1], ctx.issuer_public, after_it, (), ()).ok
    gate = svc.terminals["transit_validator"].terminal_id
    records = [
        RideRecord(code, gate, next(_seq), "bus-105", "", "single", at, 0)
        for code, at in zip(codes, (on_last_day, after_it), strict=True)
    ]
    r = await svc.post("/v1/transit/ride-batches", ridecode.ride_batch_to_dict(RideBatch(gate, 1, records)),
                       as_="transit_validator")  # fmt: skip
    assert r.status == 200, r.body
    charged, refused = r.body["records"]
    assert charged["result"] == "approved" and charged["fare_fen"] > 0, charged
    assert (refused["result"], refused["reason"]) == ("declined", "credential_expired"), refused
    assert await svc.balance(c["card_no"]) == 1000 - charged["fare_fen"]
    # An online tap today is refused: the card has expired.
    row = await db.fetchrow("SELECT * FROM card WHERE card_no = $1", c["card_no"])
    assert not views.usable(row, dt.datetime.now(dt.UTC))


# A metro journey entered at 23:50 on the card's last valid day and left 20 s after midnight (the gate lets
# the certificate through within its skew): whichever gate uploads first, and with the sweep or a loss
# report in between, the ride costs its distance fare, not the maximum fare.


@pytest.mark.parametrize("exit_first", [False, True])
async def test_an_expired_cards_journey_begun_on_its_last_day_costs_its_fare_in_either_upload_order(
    svc: ServiceHarness, db: asyncpg.Connection, exit_first: bool
) -> None:
    """Entry first, the exit ends the open journey. Exit first, it is held for an entry before the end of
    the last valid day (`Tap.entered_before`, as after a loss report), and the entry prices it. Before, the
    exit uploaded first was judged by its own day and declined `card_unusable`; the late entry then opened
    a journey that the sweep charged the maximum fare."""
    c, phone, valid_to = await expired_rider(svc, db)
    entry = metro(svc, phone, valid_to - 600, "in", "transit_validator")
    exit_ = metro(svc, phone, valid_to + 20, "out", GATE_2)
    if exit_first:
        answers = [await upload(svc, exit_, GATE_2), await upload(svc, entry, "transit_validator")]
    else:
        answers = [await upload(svc, entry, "transit_validator"), await upload(svc, exit_, GATE_2)]
    assert [a["result"] for a in answers] == ["approved", "approved"], answers
    swept = await sweep_after_timeout(svc)
    balance = await svc.balance(c["card_no"])
    assert balance == 1000 - RIDE, (balance, answers, swept)


async def test_an_expired_cards_exit_after_the_sweep_gets_the_maximum_fare_back(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The entry of the card's last valid day is uploaded first and the sweep charges its journey the maximum
    fare; the exit, 20 s after midnight and within the journey timeout, is uploaded next. It gives the
    maximum fare back and pays the ride, as on a card that has not expired (docs/fares.md, late halves
    given back). Before, the swept journey not being the card's open one, the exit was judged by its own
    day and declined: the rider kept paying the maximum fare."""
    c, phone, valid_to = await expired_rider(svc, db)
    entry = metro(svc, phone, valid_to - 600, "in", "transit_validator")
    exit_ = metro(svc, phone, valid_to + 20, "out", GATE_2)
    in_ = await upload(svc, entry, "transit_validator")
    assert (in_["result"], in_["fare_fen"]) == ("approved", 0), in_
    swept = await sweep_after_timeout(svc)
    assert swept.closed == 1, swept
    out = await upload(svc, exit_, GATE_2)
    balance = await svc.balance(c["card_no"])
    assert balance == 1000 - RIDE, (balance, out)


async def test_an_expired_then_lost_cards_exit_after_midnight_ends_its_last_day_journey(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The same journey, the card reported lost after it expired, both rides uploaded after the report, entry
    first. The gates held no block, so the rides are judged as if the card were not lost: the journey
    costs its fare, as it would without the report. Before, a ride its gate could not refuse was judged by
    its own day, so the exit was declined and the sweep charged the journey the maximum fare."""
    c, phone, valid_to = await expired_rider(svc, db)
    entry = metro(svc, phone, valid_to - 600, "in", "transit_validator")
    exit_ = metro(svc, phone, valid_to + 20, "out", GATE_2)
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})
    assert r.status == 200, r.body
    in_ = await upload(svc, entry, "transit_validator")
    out = await upload(svc, exit_, GATE_2)
    swept = await sweep_after_timeout(svc)
    balance = await svc.balance(c["card_no"])
    assert balance == 1000 - RIDE, (balance, in_, out, swept)
