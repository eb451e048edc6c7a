"""Where the card lifecycle bounds transit (real PostgreSQL; docs/api.md): a temporary loss ends 15 days
after its report whatever flag changes meanwhile, and a ride-code certificate does not outlive its card."""

from __future__ import annotations

import datetime as dt

import asyncpg

from cardsvc import localtime
from cardsvc.flows import views
from cardsvc.http.keys import SERVICES
from protocols import ridecode
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
