"""A card stops at the start of its unusable spell, which an application lock may begin (real PostgreSQL;
docs/transit.md "What the tap engine decides at upload time"): a ride-code ride a gate let through during
an application lock, while holding the lock's block, is declined when uploaded, and stays declined after the
card is replaced or after it is reported lost and then unlocked. Before, the stop was the card's last move
out of `active` (the replacement, the loss report), so such a ride became chargeable by waiting."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from tests.helpers import ServiceHarness, replacement_body
from tests.transit.test_rides import gate_downloads, gate_record, rider, upload


async def _op(svc: ServiceHarness, card_no: str, op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    r = await svc.post(f"/v1/cards/{card_no}/{op}", {"operator": "staff-1", **(body or {})})
    assert r.status == 200, (op, r.body)
    return dict(r.body)


async def test_a_ride_during_an_app_lock_is_not_charged_once_the_card_is_replaced(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The card office locks the card's application (the hotlist blocks the card and its ride-code account);
    the gate downloads that block, yet lets a ride code through; later the holder gets a replacement card.

    Uploaded while the card is locked, such a ride is declined `card_unusable` (docs/transit.md: an
    application-locked card is declined even for rides before). Uploaded after the replacement, the same
    kind of ride -- taken while the card was locked and blocked, at a gate that held the block -- is
    charged to the holder's NEW card when rides.py took the old card's "stop" to be its last move out of
    the `active` status (the replacement), ignoring that the card had been stopped (unusable, hotlisted)
    since the application lock: a stopped card charged, the verdict depending only on when the gate
    uploaded."""
    c, phone, _ = await rider(svc)
    locked = await _op(svc, c["card_no"], "lock-app")
    assert locked["usable"] is False
    held = await gate_downloads(svc)  # the gate holds the block of the locked card
    t1 = int(time.time()) + 1
    first = gate_record(svc, phone.next_code(t1), t1, deny_list_version=held)
    [a] = await upload(svc, [first])
    assert (a["result"], a["reason"]) == ("declined", "card_unusable"), a  # locked: declined

    await asyncio.sleep(2.2)  # the replacement comes after both rides
    t2 = t1 + 1
    body = replacement_body()
    await _op(svc, c["card_no"], "replace", body)
    moved = await svc.balance(body["new_card_no"])
    second = gate_record(svc, phone.next_code(t2), t2, deny_list_version=held)
    [b] = await upload(svc, [second], batch_id=2)
    assert (b["result"], b["reason"]) == ("declined", "card_unusable"), b
    assert await svc.balance(body["new_card_no"]) == moved


async def test_unlocking_the_application_of_a_lost_card_does_not_make_locked_time_rides_chargeable(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Application locked (hotlist block, the gate downloads it), then reported lost (temporary loss), then
    the application is unlocked while the loss report stands: the card was never usable again since the lock.

    A ride the gate let through during the lock is declined while the lock stands, but once the application
    is unlocked the very same kind of ride was charged to the holder's purse: taps.py took a temporarily
    lost card's stop to be `status_changed_at` (the loss report), so the locked period before it counted as
    "before the card stopped". The card was stopped (and blocked at the gate that let the ride through)
    the whole time; nothing lifted that stop."""
    c, phone, _ = await rider(svc)
    await _op(svc, c["card_no"], "lock-app")
    held = await gate_downloads(svc)
    t1 = int(time.time()) + 1
    [a] = await upload(svc, [gate_record(svc, phone.next_code(t1), t1, deny_list_version=held)])
    assert (a["result"], a["reason"]) == ("declined", "card_unusable"), a

    await asyncio.sleep(2.2)  # the loss report comes after both rides
    await _op(svc, c["card_no"], "temporary-loss")
    after = await _op(svc, c["card_no"], "unlock-app")
    assert after["status"] == "temporary_loss" and after["usable"] is False
    t2 = t1 + 1
    [b] = await upload(svc, [gate_record(svc, phone.next_code(t2), t2, deny_list_version=held)], batch_id=2)
    assert (b["result"], b["reason"]) == ("declined", "card_unusable"), b
    assert await svc.balance(c["card_no"]) == 1000
