"""Where the card lifecycle bounds transit (real PostgreSQL; docs/api.md): a temporary loss ends 15 days
after its report whatever flag changes meanwhile, a ride-code certificate does not outlive its card, and a
ride taken on its last valid day is charged when it is uploaded after it."""

from __future__ import annotations

import datetime as dt

import asyncpg

from cardsvc import localtime
from cardsvc.flows import views
from cardsvc.http.keys import SERVICES
from cardsvc.transit import flow
from protocols import ridecode, sm
from tests.helpers import ServiceHarness
from tests.service.test_lifecycle import card_op, ok
from tests.transit.test_taps import ride_phone

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


async def test_a_ride_on_the_cards_last_valid_day_uploaded_after_it_is_charged(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A gate uploads its rides later, up to UPLOAD_AGE_S_MAX after them. A ride taken on the card's last
    valid day (the certificate still valid, the gate right to let the rider through) and uploaded the next
    day, the card expired by then, is charged: expiry is a date on the card, not a stop of it. Before, it
    was declined `card_unusable` and went unpaid. A ride after that day stays declined (the gate holds the
    certificate's `valid_to`, and the service verifies the code as the gate did)."""
    today = localtime.local_date(dt.datetime.now(dt.UTC))
    last_day = today - dt.timedelta(days=1)
    c = await svc.new_card(has_purse=True)
    no = c["card_no"]
    r = await svc.post(
        f"/v1/purses/{no}/top-ups",
        {"terminal_seq": 91_001, "amount_fen": 1000, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    # The card's last valid day was yesterday; its phone got a certificate the day before, as the
    # service issues them (bounded by the card's last valid second).
    ctx = svc.app[SERVICES].transit
    valid_from = int(localtime.day_end(last_day).timestamp()) - 2 * 86400
    valid_to = int(localtime.day_end(last_day).timestamp())
    card_id = await db.fetchval("UPDATE card SET expires_on = $2 WHERE card_no = $1 RETURNING card_id", no, last_day)
    key = sm.sm2_generate()
    serial = await db.fetchval(
        """INSERT INTO ride_cert (card_id, alg, user_key, valid_from, valid_to)
           VALUES ($1, $2, $3, to_timestamp($4), to_timestamp($5)) RETURNING cert_serial""",
        card_id, sm.ALG_SM2_SM3, sm.public_key_bytes(key), valid_from, valid_to,
    )
    cert = ridecode.issue_cert(
        ctx.issuer_private, issuer_key_id=flow.ISSUER_KEY_ID, cert_serial=serial, account_id=card_id,
        alg=sm.ALG_SM2_SM3, user_public_key=sm.public_key_bytes(key), valid_from=valid_from, valid_to=valid_to,
        max_fare_fen=svc.settings.ride_max_fare_fen, credit_limit_fen=svc.settings.ride_credit_limit_fen,
    )
    phone = ridecode.RidePhone(cert, key)
    on_last_day = valid_to - 3600  # 23:00 local on the last valid day
    after_it = valid_to + 7200  # beyond any clock skew
    codes = [phone.next_code(on_last_day), phone.next_code(after_it)]
    assert ridecode.verify_at_gate(codes[0], ctx.issuer_public, on_last_day, (), ()).ok
    assert not ridecode.verify_at_gate(codes[1], ctx.issuer_public, after_it, (), ()).ok
    gate = svc.terminals["transit_validator"].terminal_id
    records = [
        ridecode.RideRecord(code, gate, 91_100 + i, "bus-105", "", "single", at, 0)
        for i, (code, at) in enumerate(zip(codes, (on_last_day, after_it), strict=True))
    ]
    r = await svc.post(
        "/v1/transit/ride-batches",
        ridecode.ride_batch_to_dict(ridecode.RideBatch(gate, 1, records)),
        as_="transit_validator",
    )
    assert r.status == 200, r.body
    charged, refused = r.body["records"]
    assert charged["result"] == "approved" and charged["fare_fen"] > 0, charged
    assert (refused["result"], refused["reason"]) == ("declined", "credential_expired"), refused
    assert await svc.balance(no) == 1000 - charged["fare_fen"]
    # An online tap today is refused: the card has expired.
    assert not views.usable(await db.fetchrow("SELECT * FROM card WHERE card_no = $1", no), dt.datetime.now(dt.UTC))
