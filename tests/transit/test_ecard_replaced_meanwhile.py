"""An online e-card tap racing a replacement (real PostgreSQL; docs/api.md "Electronic cards": the holder's
e-card moves with a replacement to the new card). The tap's handler reads which card the e-card is on before
the batch locks anything; a replacement that commits in between used to leave the tap on the old, replaced
card: declined `card_unusable` (`replaced`), the rider with a working e-card turned away and the code's use
recorded on the dead card. The batch now reads the e-card's card again under the purse locks and, moved,
runs again with the tap on the new card."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import pytest

from cardsvc.services import Services
from protocols import ecard
from tests.helpers import ServiceHarness, replacement_body
from tests.transit.test_taps import BUS_FARE, funded_card, tap, tap_body


async def test_an_ecard_tap_racing_a_replacement_is_charged_on_the_new_card(
    svc: ServiceHarness, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = await funded_card(svc, 1000)
    device = await svc.new_ecard(c["card_no"])
    body = replacement_body()
    real = Services.run_in_signature_pool
    done: dict[str, Any] = {}

    async def replaced_meanwhile(self: Services, fn: object, *args: object) -> object:
        # The handler has read the e-card's card and now verifies the code: the replacement commits here.
        if fn is ecard.verify_code and not done:
            done["r"] = await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})
        return await real(self, fn, *args)

    monkeypatch.setattr(Services, "run_in_signature_pool", replaced_meanwhile)
    code = device.next_code(int(time.time()))
    ans = await tap(svc, tap_body(svc, None, credential={"credential": "ecard_code", "code": code}))
    assert done["r"].status == 200, done["r"].body
    assert (ans["result"], ans["reason"], ans.get("card_status")) == ("approved", None, None), ans
    assert await svc.balance(body["new_card_no"]) == 1000 - BUS_FARE
    # The code's use is the new card's: the same code again is a replay there, not a second charge.
    again = await tap(svc, tap_body(svc, None, credential={"credential": "ecard_code", "code": code}))
    assert (again["result"], again["reason"]) == ("declined", "credential_replayed"), again
    assert await svc.balance(body["new_card_no"]) == 1000 - BUS_FARE
    new_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", body["new_card_no"])
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE card_id = $1 AND kind = 1", new_id) == 1
