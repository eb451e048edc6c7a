"""A purse's bounds against the money's direction (POST /v1/purses/{card_no}/top-ups, real PostgreSQL): a
top-up smaller than a debt settles part of it, and a refund from a purse above its maximum takes money out.
Before, the refund's `balance >= 0` and the credit's maximum were checked for every channel."""

from __future__ import annotations

import itertools
import time
from typing import Any

import asyncpg

from cardsvc.transit import fares
from tests.helpers import ServiceHarness
from tests.transit.test_late_refunds import RIDE, charged_exit, entry_record
from tests.transit.test_rides import upload
from tests.transit.test_taps import funded_card, ledger_holds, ride_phone, tap, tap_body  # noqa: F401 (fixture)

TABLE = fares.load_demo_table()
_seq = itertools.count(7_100_000)


def topup(amount: int, channel: str = "cash", seq: int | None = None) -> dict[str, Any]:
    return {"terminal_seq": next(_seq) if seq is None else seq, "amount_fen": amount, "channel": channel,
            "operator": "clerk-9"}  # fmt: skip


async def test_a_top_up_smaller_than_the_debt_is_refused_as_a_refund_too_large(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A rider whose ride-code rides went on credit owes 180 fen (balance -180, allowed by the
    certificate's credit). They top up 100 fen at the bank: the service answers `400 invalid_field` "a
    refund cannot exceed the balance" and credits nothing. It was not a refund; a top-up only adds money,
    and docs/api.md says a debt "can still be settled by a top-up" — the rider can only pay it off in one
    go of at least the whole debt. `flow.top_up` applied the refund's `new_balance < 0` check to every
    channel."""
    c = await funded_card(svc, 0)
    phone = await ride_phone(svc, c["card_no"])
    ride = await tap(svc, tap_body(svc, None, credential={"credential": "ride_code",
                                                           "code": phone.next_code(int(time.time()))}))  # fmt: skip
    assert ride["result"] == "approved" and ride["balance_fen"] == -180, ride
    r = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", topup(100, "bank"), as_="bank_channel")
    assert r.status == 200, r.body
    assert (r.body["amount_fen"], r.body["balance_fen"]) == (100, -80)
    assert await svc.balance(c["card_no"]) == -80
    refund = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", topup(1, "refund"))  # from a debt: none
    assert refund.status == 400 and refund.body["code"] == "invalid_field", refund.body
    assert await svc.balance(c["card_no"]) == -80


async def test_a_purse_pushed_over_the_maximum_cannot_be_refunded_at_all(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A rider charged the maximum fare for a ride-code exit without entry tops the purse up to the
    maximum (PURSE_BALANCE_MAX_FEN, 100000 fen). The entry is uploaded later and the penalty is given back
    (the tap engine's late refund credits the purse with no regard to the maximum), so the purse holds
    more than the maximum. Now the holder asks the card office for a refund of 100 fen: it is refused
    `422 purse_balance_cap` ("the top-up would take the purse over its maximum balance"). Taking money
    out can never take a purse over its maximum; the holder can neither get a refund nor, since a cancel
    needs an empty purse, cancel the card. `flow.top_up` checked the cap for refunds as well as credits."""
    c, phone, exit_at = await charged_exit(svc)
    cap = svc.settings.purse_balance_max_fen
    held = await svc.balance(c["card_no"])
    r = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", topup(cap - held))
    assert r.status == 200 and r.body["balance_fen"] == cap, r.body
    [in_] = await upload(svc, [entry_record(svc, phone, exit_at - 1200)], batch_id=2)
    assert in_["result"] == "approved" and in_["refund"]["amount_fen"] == TABLE.cap_fen, in_
    over = cap + TABLE.cap_fen - RIDE
    assert await svc.balance(c["card_no"]) == over > cap

    refund = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", topup(100, "refund"))
    assert refund.status == 200, refund.body
    assert (refund.body["amount_fen"], refund.body["balance_fen"]) == (-100, over - 100)
    # The bounds still hold in their own direction: no credit while above the maximum, no refund past 0.
    credit = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", topup(1))
    assert credit.status == 422 and credit.body["code"] == "purse_balance_cap", credit.body
    too_much = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", topup(over, "refund"))
    assert too_much.status == 400 and too_much.body["code"] == "invalid_field", too_much.body
    assert await svc.balance(c["card_no"]) == over - 100
