"""Concurrency through the API: many simultaneous operations on one card serialise into a history that
plan() can replay, and single-use credentials stay single-use under concurrent submission."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time

import asyncpg
import pytest

from cardsvc.app import maintenance_once
from cardsvc.flows.lifecycle import CardState, plan
from cardsvc.http.keys import SERVICES
from protocols import ecard, hotlist, sm
from protocols.card import CardStatus, HotlistAction
from tests.helpers import Response, ServiceHarness, replacement_body, until_lock_waits

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


# ------------------------------------------------------------------ office operations and a purse lock


async def _card_with_purse(svc: ServiceHarness, db: asyncpg.Connection, amount_fen: int) -> tuple[str, int]:
    c = await svc.new_card(has_purse=True)
    if amount_fen:
        r = await _top_up(svc, c["card_no"], amount_fen)
        assert r.status == 200, r.body
    return c["card_no"], await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])


_top_up_seq = itertools.count(1)


async def _top_up(svc: ServiceHarness, card_no: str, amount_fen: int, seq: int | None = None) -> Response:
    body = {"terminal_seq": seq or next(_top_up_seq), "amount_fen": amount_fen, "channel": "cash", "operator": "staff-1"}
    return await svc.post(f"/v1/purses/{card_no}/top-ups", body)


async def _post(db: asyncpg.Connection, card_id: int, amount_fen: int, *, kind: int, counterparty: str, source: int) -> None:
    """What a debit or a top-up writes, in the caller's transaction (which holds the purse lock)."""
    await db.execute("UPDATE purse SET balance_fen = balance_fen + $2 WHERE card_id = $1", card_id, amount_fen)
    await db.execute(
        """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty, source)
           VALUES ($1, $2, 'race-test', 1, $3, 1, now(), $4, $5)""",
        card_id, kind, amount_fen, counterparty, source,
    )


async def test_a_cancel_is_refused_when_a_top_up_commits_before_it(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """Cancelling needs an empty purse. A top-up that commits after the cancel read the card, but before
    the cancel decides, must stop it: the money would otherwise sit on a dead card."""
    no, card_id = await _card_with_purse(svc, db, 0)
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        cancel = asyncio.create_task(svc.post(f"/v1/cards/{no}/cancel", {"operator": "staff-1"}))
        await until_lock_waits(db)  # the cancel holds the card and waits for the purse
        await _post(db, card_id, 700, kind=3, counterparty="topup:cash", source=4)  # a top-up
    r = await cancel
    assert (r.status, r.body["code"]) == (409, "illegal_transition"), r.body
    card = (await svc.get(f"/v1/cards/{no}")).body
    assert (card["status"], card["purse_balance_fen"]) == ("active", 700)


async def test_a_replacement_moves_and_records_the_balance_it_locked(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A debit that commits while the replacement waits for the purse lock: what the new card gets, what
    the answer says and what the append-only event records are all the balance after that debit."""
    no, card_id = await _card_with_purse(svc, db, 500)
    body = replacement_body()
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        replace = asyncio.create_task(svc.post(f"/v1/cards/{no}/replace", {**body, "operator": "staff-1"}))
        await until_lock_waits(db)
        await _post(db, card_id, -200, kind=1, counterparty="cq-bus", source=1)  # a fare
    r = await replace
    assert r.status == 200, r.body
    assert r.body["purse_balance_fen"] == 300
    moved = await db.fetchval(
        "SELECT detail->>'purse_moved_fen' FROM card_event WHERE op = 'issue-replacement' AND card_id = "
        "(SELECT card_id FROM card WHERE card_no = $1)",
        body["new_card_no"],
    )
    assert moved == "300"


async def test_the_same_top_up_sent_twice_at_once_credits_once_and_answers_both(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    no, card_id = await _card_with_purse(svc, db, 0)
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        both = [asyncio.create_task(_top_up(svc, no, 300, seq=999_001)) for _ in range(2)]
        await until_lock_waits(db, 2)
    first, second = await asyncio.gather(*both)
    assert (first.status, second.status) == (200, 200), (first.body, second.body)
    assert {first.body["replayed_answer"], second.body["replayed_answer"]} == {False, True}
    assert first.body["txn_id"] == second.body["txn_id"] and first.body["balance_fen"] == 300
    assert await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id) == 300


async def test_a_top_up_and_a_refund_keep_their_clerk(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """Money put into or taken out of a purse names its clerk with the key kept for good (topup_key.staff,
    migration 0023), as a fare correction and a quota ride return do; before, `operator` was accepted and
    dropped. No clerk named: ''. A resend adds nothing."""
    no, card_id = await _card_with_purse(svc, db, 0)
    up = await _top_up(svc, no, 500, seq=999_020)
    assert up.status == 200, up.body
    body = {"terminal_seq": 999_021, "amount_fen": 200, "channel": "refund"}
    down = await svc.post(f"/v1/purses/{no}/top-ups", body)
    assert down.status == 200, down.body
    assert (await _top_up(svc, no, 500, seq=999_020)).body["replayed_answer"] is True
    rows = await db.fetch(
        "SELECT terminal_seq, amount_fen, staff FROM topup_key WHERE card_id = $1 ORDER BY terminal_seq", card_id
    )
    assert [tuple(r) for r in rows] == [(999_020, 500, "staff-1"), (999_021, -200, "")]


async def test_a_top_up_resent_after_its_answer_was_pruned_is_still_answered_not_credited_again(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Maintenance prunes terminal_txn after the retention period. A top-up has no time of its own that
    would refuse a late copy (a tap has), so a bank channel resending it a week later must still get its
    answer from the top-up keys kept for good, not a second credit; another body under the key is still
    a conflict, for this card or another."""
    no, card_id = await _card_with_purse(svc, db, 0)
    first = await _top_up(svc, no, 500, seq=999_010)
    assert first.status == 200, first.body
    await db.execute("UPDATE terminal_txn SET at = at - interval '8 days' WHERE txn_id = $1", first.body["txn_id"])
    await maintenance_once(svc.app[SERVICES].pool, svc.settings, svc.app[SERVICES].transit.table)
    assert await db.fetchval("SELECT count(*) FROM terminal_txn WHERE txn_id = $1", first.body["txn_id"]) == 0
    again = await _top_up(svc, no, 500, seq=999_010)
    assert again.status == 200 and again.body == {**first.body, "replayed_answer": True}, again.body
    # A top-up the release before migration 0009 wrote while the migration ran has no topup_key row:
    # maintenance keeps its answer there before pruning it.
    second = await _top_up(svc, no, 200, seq=999_011)
    with pytest.raises(asyncpg.PostgresError, match="append-only"):  # migration 0023
        await db.execute("DELETE FROM topup_key WHERE txn_id = $1", second.body["txn_id"])
    await db.execute("ALTER TABLE topup_key DISABLE TRIGGER topup_key_append_only")
    await db.execute("DELETE FROM topup_key WHERE txn_id = $1", second.body["txn_id"])
    await db.execute("ALTER TABLE topup_key ENABLE TRIGGER topup_key_append_only")
    await db.execute("UPDATE terminal_txn SET at = at - interval '8 days' WHERE txn_id = $1", second.body["txn_id"])
    await maintenance_once(svc.app[SERVICES].pool, svc.settings, svc.app[SERVICES].transit.table)
    assert (await _top_up(svc, no, 200, seq=999_011)).body == {**second.body, "replayed_answer": True}
    other, _ = await _card_with_purse(svc, db, 0)
    for card_no, amount in ((no, 600), (other, 500)):
        r = await _top_up(svc, card_no, amount, seq=999_010)
        assert (r.status, r.body["code"]) == (409, "idempotency_conflict"), r.body
    assert await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id) == 700
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE card_id = $1 AND kind = 3", card_id) == 2


async def test_one_top_up_key_for_two_cards_at_once_is_a_conflict_not_an_error(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    (a, a_id), (b, b_id) = [await _card_with_purse(svc, db, 0) for _ in range(2)]
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = ANY($1) FOR UPDATE", [a_id, b_id])
        both = [asyncio.create_task(_top_up(svc, no, 300, seq=999_002)) for no in (a, b)]
        await until_lock_waits(db, 2)
    answers = sorted([(r.status, r.body.get("code")) for r in await asyncio.gather(*both)], key=str)
    assert answers == [(200, None), (409, "idempotency_conflict")], answers
    balances = await db.fetch("SELECT balance_fen FROM purse WHERE card_id = ANY($1)", [a_id, b_id])
    assert sorted(r["balance_fen"] for r in balances) == [0, 300]


async def test_a_replaced_or_cancelled_card_takes_no_top_up_but_a_retry_gets_its_answer(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Money credited to a dead card would be stuck there: refused, nothing written. A top-up approved
    before the replacement, sent again after it, still gets its stored answer."""
    no, card_id = await _card_with_purse(svc, db, 0)
    first = await _top_up(svc, no, 300, seq=999_101)
    assert first.status == 200, first.body
    r = await svc.post(f"/v1/cards/{no}/replace", {**replacement_body(), "operator": "staff-1"})
    assert r.status == 200, r.body
    rows = await db.fetchval("SELECT count(*) FROM txn_journal")
    refused = await _top_up(svc, no, 500)
    assert (refused.status, refused.body["code"], refused.body["card_status"]) == (422, "card_unusable", "replaced")
    assert await db.fetchval("SELECT count(*) FROM txn_journal") == rows
    assert await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id) == 0
    again = await _top_up(svc, no, 300, seq=999_101)
    assert (again.status, again.body["replayed_answer"], again.body["txn_id"]) == (200, True, first.body["txn_id"])


async def test_a_cancelled_card_in_debt_takes_a_top_up_up_to_zero(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """A ride-code overdraft may leave a debt on a card that is then cancelled: a credit settles it, up to
    0, and no further."""
    no, card_id = await _card_with_purse(svc, db, 0)
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        await _post(db, card_id, -300, kind=1, counterparty="cq-bus", source=3)  # a ride on credit
    r = await svc.post(f"/v1/cards/{no}/cancel", {"operator": "staff-1"})
    assert r.status == 200, r.body
    over = await _top_up(svc, no, 301)
    assert (over.status, over.body["code"], over.body["card_status"]) == (422, "card_unusable", "cancelled")
    settled = await _top_up(svc, no, 300)
    assert (settled.status, settled.body["balance_fen"]) == (200, 0), settled.body
    assert (await _top_up(svc, no, 1)).status == 422


async def test_a_top_up_waiting_while_the_card_is_replaced_is_refused(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    no, card_id = await _card_with_purse(svc, db, 0)
    async with db.transaction():
        await db.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        top_up = asyncio.create_task(_top_up(svc, no, 500))
        await until_lock_waits(db)  # the top-up read the card as active and waits for the purse
        await db.execute("UPDATE card SET status = 5 WHERE card_id = $1", card_id)  # what a replacement commits
    r = await top_up
    assert (r.status, r.body["code"]) == (422, "card_unusable"), r.body
    assert await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id) == 0
