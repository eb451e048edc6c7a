"""Concurrency through the API: many simultaneous operations on one card serialise into a history that
plan() can replay, and single-use credentials stay single-use under concurrent submission."""

from __future__ import annotations

import asyncio
import collections
import random
import time

import asyncpg
import pytest

from cardsvc.flows.lifecycle import CardState, plan
from protocols import ecard, hotlist, sm
from protocols.card import CardStatus, HotlistAction
from tests.helpers import ServiceHarness

OPS = ["temporary-loss", "lift-loss", "lock-app", "unlock-app", "lock-pin", "unlock-pin", "formal-loss"]
WEIGHTS = [6, 6, 5, 5, 5, 5, 1]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_concurrent_lifecycle_operations_serialise(
    svc: ServiceHarness, db: asyncpg.Connection, seed: int
) -> None:
    c = await svc.new_card()
    no, sn = c["card_no"], c["card_sn"]
    rng = random.Random(seed)
    ops = rng.choices(OPS, WEIGHTS, k=40)
    initial_events = len((await svc.get(f"/v1/cards/{no}/events")).body["events"])
    head_before = await db.fetchval("SELECT version FROM hotlist_head")

    responses = await asyncio.gather(
        *(
            svc.post(f"/v1/cards/{no}/{op}", {"operator": "staff-1"}, headers={"X-Request-Id": f"race-{i}"})
            for i, op in enumerate(ops)
        )
    )
    succeeded = set()
    for i, (op, r) in enumerate(zip(ops, responses, strict=True)):
        assert r.status in (200, 409), (op, r.status, r.body)
        if r.status == 409:
            assert r.body["code"] == "illegal_transition", r.body
        else:
            succeeded.add(f"race-{i}")

    evs = (await svc.get(f"/v1/cards/{no}/events")).body["events"][initial_events:]
    # Exactly one audit event per successful request, and none for a refused one.
    assert sorted(e["request_id"] for e in evs) == sorted(succeeded)
    by_request = {f"race-{i}": op for i, op in enumerate(ops)}
    assert all(e["op"] == by_request[e["request_id"]] for e in evs)

    # Replaying the events in event_id order through plan() reproduces every step and the final state.
    state = CardState(CardStatus.ACTIVE, False, False)
    expected_hotlist = []
    for e in sorted(evs, key=lambda e: e["event_id"]):
        assert e["status_before"] == state.status.api_name, e
        p = plan(state, e["op"])
        assert e["status_after"] == p.after.status.api_name, e
        if p.hotlist is not None:
            expected_hotlist.append(p.hotlist)
        state = p.after
    final = (await svc.get(f"/v1/cards/{no}")).body
    assert (final["status"], final["pin_locked"], final["app_locked"], final["usable"]) == (
        state.status.api_name,
        state.pin_locked,
        state.app_locked,
        state.usable,
    )

    # Hotlist: gapless versions; this card's entries are exactly the replayed changes, in order, so the
    # last one matches the card's final usability.
    r = await svc.get(f"/v1/hotlist?since={head_before}", as_="transit_validator")
    block = hotlist.decode_block(r.body)
    assert [e.version for e in block.entries] == list(range(head_before + 1, block.latest_version + 1))
    assert all(e.card_sn == sn for e in block.entries)
    assert [(e.action, e.reason) for e in block.entries] == expected_hotlist
    if block.entries:
        assert (block.entries[-1].action == HotlistAction.BLOCK) == (not state.usable)
    else:
        assert state.usable


async def test_same_ecard_code_concurrently_is_accepted_once(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"], sm.ALG_SM2_SM3)
    code = dev.next_code(int(time.time()))
    responses = await asyncio.gather(
        *(
            svc.post("/v1/ecard-codes/verify", {"code": code, "business_type": "02"}, as_="merchant_pos")
            for _ in range(20)
        )
    )
    outcomes = collections.Counter(r.body.get("code", "ok") if r.status != 200 else "ok" for r in responses)
    assert outcomes == {"ok": 1, "credential_replayed": 19}, outcomes


async def test_same_card_auth_concurrently_is_accepted_once(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    body = svc.card_auth_body(c["card_sn"])
    responses = await asyncio.gather(
        *(svc.post("/v1/card-auth", body, as_="transit_validator") for _ in range(20))
    )
    outcomes = collections.Counter("ok" if r.status == 200 else r.body["code"] for r in responses)
    assert outcomes == {"ok": 1, "credential_replayed": 19}, outcomes


async def test_concurrent_ecard_issuance_for_one_card(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    devices = [ecard.EcardDevice.generate(1, sm.ALG_ED25519) for _ in range(12)]
    responses = await asyncio.gather(
        *(
            svc.post(
                "/v1/ecards",
                {
                    "card_no": c["card_no"],
                    "channel": "bank_app",
                    "alg": sm.ALG_ED25519,
                    "device_public_key": d.public_key_bytes.hex(),
                },
                as_="ecard_channel",
            )
            for d in devices
        )
    )
    outcomes = collections.Counter(r.status if r.status == 201 else r.body["code"] for r in responses)
    assert outcomes == {201: 1, "ecard_exists": 11}, outcomes
    winner = next(r.body for r in responses if r.status == 201)
    card = (await svc.get(f"/v1/cards/{c['card_no']}")).body
    assert card["ecard"]["ecard_id"] == winner["ecard_id"]
    ops = [e["op"] for e in (await svc.get(f"/v1/cards/{c['card_no']}/events")).body["events"]]
    assert ops.count("ecard-issue") == 1
