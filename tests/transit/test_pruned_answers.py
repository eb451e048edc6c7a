"""What a terminal is answered once the maintenance prune has forgotten its first answer in `terminal_txn`
(after `terminal_txn_retention_days`): an uploaded ride is still answered as first (a gate may upload it for
the whole upload window), an offline record under a key first used by a card that is not ours is judged on
its own card, and a card-office key stays taken by its top-up for good."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from cardsvc.app import PruneState, _prune, ride_code_use_retention_s
from cardsvc.http.keys import SERVICES
from protocols.transit import PurseCard
from tests.helpers import ServiceHarness, new_card_numbers
from tests.transit import test_rides as rides
from tests.transit.test_offline import debit, funded, tid
from tests.transit.test_offline import upload as upload_offline
from tests.transit.test_taps import funded_card, tap_body


async def _age_answers(db: asyncpg.Connection, terminal_id: str, seconds: float) -> None:
    await db.execute(
        "UPDATE terminal_txn SET at = at - make_interval(secs => $2) WHERE terminal_id = $1",
        terminal_id,
        seconds,
    )


async def _prune_now(svc: ServiceHarness) -> None:
    await _prune(svc.app[SERVICES].pool, svc.settings)


async def _replayed_ride_codes(svc: ServiceHarness) -> float:
    return await svc.metric_total(
        "cardsvc_credential_verifications_total", kind="ride_code", outcome="replayed"
    )


async def test_an_uploaded_ride_is_answered_as_first_after_the_tap_answers_are_pruned(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A gate that lost its answer uploads a charged ride again after 8 days: it gets the stored answer
    (approved, replayed), not a `credential_replayed` decline, and the re-upload is not counted as a replayed
    ride code. The same gate's online tap answer of that day is pruned; the ride's goes once its window is
    over."""
    c, phone, _ = await rides.rider(svc)
    gate = svc.terminals["transit_validator"].terminal_id
    at = int(time.time()) - 30
    rec = rides.gate_record(svc, phone.next_code(at), at)
    [first] = await rides.upload(svc, [rec])
    assert first["result"] == "approved" and "uploaded" not in first, first
    other = await svc.new_card(has_purse=True)
    top = {"terminal_seq": 950_001, "amount_fen": 1000, "channel": "cash", "operator": "staff-1"}
    assert (await svc.post(f"/v1/purses/{other['card_no']}/top-ups", top)).status == 200
    tap = await svc.post("/v1/transit/taps", tap_body(svc, other["card_sn"], seq=rec.gate_seq + 1000))
    assert tap.status == 200 and tap.body["result"] == "approved", tap.body

    await _age_answers(db, gate, 8 * 86400)
    await _prune_now(svc)
    kept = await db.fetch("SELECT terminal_seq FROM terminal_txn WHERE terminal_id = $1", gate)
    assert [r["terminal_seq"] for r in kept] == [rec.gate_seq]  # the online tap's answer is gone

    replayed_before = await _replayed_ride_codes(svc)
    [again] = await rides.upload(svc, [rec], batch_id=2)
    assert again == {**first, "replayed_answer": True}
    assert await _replayed_ride_codes(svc) == replayed_before
    assert await svc.balance(c["card_no"]) == 1000 - first["fare_fen"]

    await _age_answers(db, gate, ride_code_use_retention_s(svc.settings))
    await _prune_now(svc)
    assert await db.fetchval("SELECT count(*) FROM terminal_txn WHERE terminal_id = $1", gate) == 0


async def test_a_key_first_used_by_a_card_not_ours_is_free_again_once_its_answer_is_pruned(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A validator uploads records of cards that are not ours (`card_unknown`, kept in offline_refusal), is
    reset, and more than 7 days later reuses such a terminal_seq for one of our cards: that genuine debit is
    judged on its own card and posted (docs/api.md), not refused `terminal_seq_reused` for good. Every record
    uploaded before keeps its first verdict, the reused key's refusal within the 7 days included."""
    t = tid(svc)
    (c1, chip1), (c2, chip2) = await funded(svc, 1000), await funded(svc, 1000)
    strangers = [
        PurseCard(new_card_numbers()[1], master_key=svc.keys.card_tac_master, balance_fen=500) for _ in "ab"
    ]
    s1, s2 = debit(strangers[0], t, 150), debit(strangers[1], t, 150)
    assert [a["result"] for a in await upload_offline(svc, [s1, s2])] == ["card_unknown", "card_unknown"]
    g2 = chip2.debit(180, t, s2.terminal_seq, s2.txn_time + 60, line_id="bus-105")  # a reset reused s2's key
    assert [(a["result"], a["reason"]) for a in await upload_offline(svc, [g2])] == [
        ("conflict", "terminal_seq_reused")
    ]

    await _age_answers(db, t, 8 * 86400)
    await _prune_now(svc)
    g1 = chip1.debit(180, t, s1.terminal_seq, s1.txn_time + 60, line_id="bus-105")  # s1's key, reused later
    [posted] = await upload_offline(svc, [g1])
    assert (posted["result"], posted["reason"], posted["replayed_answer"]) == ("accepted", None, False), (
        posted
    )
    assert (await svc.balance(c1["card_no"]), await svc.balance(c2["card_no"])) == (820, 1000)
    again = [
        *await upload_offline(svc, [s1, s2]),
        *await upload_offline(svc, [g1]),
        *await upload_offline(svc, [g2]),
    ]
    assert [(a["result"], a["reason"], a["replayed_answer"]) for a in again] == [
        ("card_unknown", "card_not_known", True), ("card_unknown", "card_not_known", True),
        ("accepted", None, True), ("conflict", "terminal_seq_reused", True),
    ]  # fmt: skip
    assert (await svc.balance(c1["card_no"]), await svc.balance(c2["card_no"])) == (820, 1000)


async def test_a_card_office_tap_under_a_pruned_top_up_key_is_a_conflict(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The card office taps and tops up under one key space. Once a top-up's terminal_txn answer is pruned
    (its answer stays for good in topup_key), a tap sent under its key is `idempotency_conflict`, not a
    second transaction, and the top-up's own retry still gets its stored answer."""
    c = await funded_card(svc, 1000)
    top: dict[str, Any] = {
        "terminal_seq": 900_001,
        "amount_fen": 500,
        "channel": "cash",
        "operator": "staff-1",
    }
    first = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", top)
    assert first.status == 200 and first.body["balance_fen"] == 1500, first.body
    office = svc.terminals["card_office"].terminal_id
    await _age_answers(db, office, 8 * 86400)
    await _prune_now(svc)
    assert await db.fetchval("SELECT count(*) FROM terminal_txn WHERE terminal_id = $1", office) == 0

    r = await svc.post(
        "/v1/transit/taps", {**tap_body(svc, c["card_sn"]), "terminal_seq": 900_001}, as_="card_office"
    )
    assert (r.status, r.body.get("code")) == (409, "idempotency_conflict"), r.body
    again = await svc.post(f"/v1/purses/{c['card_no']}/top-ups", top)
    assert again.status == 200 and again.body == {**first.body, "replayed_answer": True}, again.body
    assert await svc.balance(c["card_no"]) == 1500
    # another key of the same terminal still taps
    r = await svc.post(
        "/v1/transit/taps", {**tap_body(svc, c["card_sn"]), "terminal_seq": 900_002}, as_="card_office"
    )
    assert r.status == 200 and r.body["result"] == "approved", r.body


async def test_the_maintenance_loops_prune_deletes_each_answer_as_it_passes_its_retention(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The loop's prune reads, after its first pass, only the answers that passed the retention since the
    previous pass (PruneState): a tap's answer that passes it later is still deleted, an uploaded ride's
    stays until the upload window is over, and a top-up answered only in terminal_txn is still kept."""
    c, phone, _ = await rides.rider(svc)
    gate = svc.terminals["transit_validator"].terminal_id
    at = int(time.time()) - 30
    rec = rides.gate_record(svc, phone.next_code(at), at)
    [first] = await rides.upload(svc, [rec])
    tap = await svc.post("/v1/transit/taps", tap_body(svc, c["card_sn"], seq=rec.gate_seq + 1000))
    assert tap.status == 200, tap.body
    await _age_answers(db, gate, 10 * 86400)
    state = PruneState()
    pool = svc.app[SERVICES].pool
    await _prune(pool, svc.settings, state)  # the first pass: everything past the retention
    assert [
        r["terminal_seq"]
        for r in await db.fetch("SELECT terminal_seq FROM terminal_txn WHERE terminal_id = $1", gate)
    ] == [rec.gate_seq]
    assert state.answers_pruned_to is not None

    later = await svc.post("/v1/transit/taps", tap_body(svc, c["card_sn"], seq=rec.gate_seq + 1001))
    assert later.status == 200, later.body
    office = svc.terminals["card_office"].terminal_id
    await db.execute(  # a top-up answered only in terminal_txn (a release before migration 0009)
        """INSERT INTO terminal_txn (terminal_id, terminal_seq, request_hash, card_id, result, amount_fen,
                                     balance_fen, txn_id, at)
           VALUES ($1, 990001, '\\x00', $2, 'approved', 100, 100, 1, now())""",
        office, await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"]),
    )  # fmt: skip
    # both pass the retention after the first pass's cut-off: 7 days and a minute after it
    await db.execute(
        """UPDATE terminal_txn SET at = $1::timestamptz - interval '1 minute'
           WHERE (terminal_id, terminal_seq) IN (($2, $3), ($4, 990001))""",
        state.answers_pruned_to, gate, rec.gate_seq + 1001, office,
    )  # fmt: skip
    await _prune(pool, svc.settings, state)
    assert [
        r["terminal_seq"]
        for r in await db.fetch("SELECT terminal_seq FROM terminal_txn WHERE terminal_id = $1", gate)
    ] == [rec.gate_seq]
    assert (
        await db.fetchval(
            "SELECT count(*) FROM topup_key WHERE terminal_id = $1 AND terminal_seq = 990001", office
        )
        == 1
    )
    [again] = await rides.upload(svc, [rec], batch_id=2)
    assert again == {**first, "replayed_answer": True}

    await _age_answers(db, gate, ride_code_use_retention_s(svc.settings))
    await _prune(pool, svc.settings, state)
    assert await db.fetchval("SELECT count(*) FROM terminal_txn WHERE terminal_id = $1", gate) == 0
