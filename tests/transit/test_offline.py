"""Offline purse records uploaded by validators (POST /v1/transit/offline-batches): TAC, verdicts in
precedence order, posting to the journal and the shadow balance, idempotent re-uploads, refusals.

Records are made by the card simulator (protocols.transit.PurseCard) with the service's TAC master key,
as a real card would sign them. After every test the ledger must hold: each purse's balance equals the
sum of its journal rows (offline debits may take it below zero: the chip already paid).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from cardsvc import audit, limits
from cardsvc.app import maintenance_once
from cardsvc.flows import lifecycle
from cardsvc.flows.actor import Actor
from cardsvc.http.keys import SERVICES
from cardsvc.store import migrate
from cardsvc.transit import offline as offline_mod
from protocols import transit
from protocols.transit import OfflineBatch, OfflineRecord, PurseCard
from tests.helpers import (
    ServiceHarness,
    new_card_numbers,
    purse_vs_journal,
    replacement_body,
    until_lock_waits,
)
from tests.service.test_auth import auth_failures

BUS = {"line_id": "bus-105", "station_id": "", "direction": "single"}
_seq = itertools.count(1)
_batch = itertools.count(1)
# A second terminal with transit.upload (the card office may do everything); terminals added at run time
# reach the service's cache asynchronously.
OTHER = "card_office"


@pytest.fixture(autouse=True)
async def ledger_holds(db_dsn: str) -> AsyncIterator[None]:
    yield
    for r in await purse_vs_journal(db_dsn):
        assert r["balance_fen"] == r["journal"], dict(r)


# ------------------------------------------------------------------ helpers


def tid(svc: ServiceHarness, name: str = "transit_validator") -> str:
    return svc.terminals[name].terminal_id


async def funded(svc: ServiceHarness, amount_fen: int = 1000) -> tuple[dict[str, Any], PurseCard]:
    """A card with a purse topped up online, and its chip (same balance, purse_seq 0)."""
    c = await svc.new_card(has_purse=True)
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": next(_seq), "amount_fen": amount_fen, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    chip = PurseCard(c["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=amount_fen)
    return c, chip


def debit(chip: PurseCard, terminal_id: str, amount: int = 180, **kw: Any) -> OfflineRecord:
    place = {**BUS, **kw.pop("place", {})}
    return chip.debit(amount, terminal_id, next(_seq), kw.pop("txn_time", int(time.time()) - 60), **place, **kw)


async def upload(
    svc: ServiceHarness, records: list[OfflineRecord], *, batch_id: int | None = None, as_: str = "transit_validator"
) -> list[dict[str, Any]]:
    records = sorted(records, key=lambda r: r.terminal_seq)
    batch = OfflineBatch(records[0].terminal_id, batch_id or next(_batch), records)
    r = await svc.post("/v1/transit/offline-batches", transit.batch_to_dict(batch), as_=as_)
    assert r.status == 200, r.body
    assert [a["terminal_seq"] for a in r.body["records"]] == [x.terminal_seq for x in records]
    return list(r.body["records"])


def results(answers: list[dict[str, Any]]) -> list[str]:
    return [a["result"] for a in answers]


async def money_state(db: asyncpg.Connection) -> tuple[Any, ...]:
    return (
        await db.fetch("SELECT card_id, balance_fen, purse_seq FROM purse ORDER BY card_id"),
        await db.fetchval("SELECT count(*) FROM txn_journal"),
        await db.fetchval("SELECT count(*) FROM offline_record"),
        await db.fetchval("SELECT count(*) FROM terminal_txn"),
        await db.fetchval("SELECT count(*) FROM offline_refusal"),
    )


async def refusals(db: asyncpg.Connection, terminal_id: str) -> list[tuple[Any, ...]]:
    """The refused records kept outside any card's ledger: (terminal_seq, card_id, result, reason, amount)."""
    rows = await db.fetch(
        """SELECT terminal_seq, card_id, result, reason, (record->>'amount_fen')::int AS amount FROM offline_refusal
           WHERE terminal_id = $1 ORDER BY terminal_seq, amount""",
        terminal_id,
    )
    return [tuple(r.values()) for r in rows]


def forge(record: OfflineRecord, **changes: Any) -> OfflineRecord:
    return dataclasses.replace(record, **changes)


# ------------------------------------------------------------------ posting


async def test_valid_records_are_posted_and_the_operator_of_the_line_is_paid(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    now = int(time.time())
    recs = [
        debit(chip, t, 180, txn_time=now - 600),
        debit(chip, t, 0, txn_time=now - 500, place={"line_id": "L1", "station_id": "l1-chaotianmen", "direction": "in"}),
        debit(chip, t, 300, txn_time=now - 400, place={"line_id": "L1", "station_id": "l1-daping", "direction": "out"}),
    ]
    answers = await upload(svc, recs)
    assert answers == [
        {"terminal_seq": r.terminal_seq, "result": "accepted", "reason": None, "replayed_answer": False} for r in recs
    ]
    assert await svc.balance(c["card_no"]) == 1000 - 180 - 300
    rows = await db.fetch(
        """SELECT j.kind, j.source, j.amount_fen, j.counterparty, j.line_id, j.station_id, extract(epoch FROM j.at)::int AS at,
                  j.terminal_seq
           FROM txn_journal j JOIN card c USING (card_id) WHERE c.card_no = $1 AND j.kind = 5 ORDER BY j.at""",
        c["card_no"],
    )
    assert [dict(r) for r in rows] == [
        {"kind": 5, "source": 2, "amount_fen": -180, "counterparty": "cq-bus", "line_id": "bus-105",
         "station_id": None, "at": now - 600, "terminal_seq": recs[0].terminal_seq},
        {"kind": 5, "source": 2, "amount_fen": -300, "counterparty": "cq-metro", "line_id": "L1",
         "station_id": "l1-daping", "at": now - 400, "terminal_seq": recs[2].terminal_seq},
    ]  # fmt: skip
    assert await db.fetchval("SELECT purse_seq FROM purse p JOIN card c USING (card_id) WHERE c.card_no = $1",
                             c["card_no"]) == 3  # fmt: skip


async def test_a_debit_below_zero_is_posted_the_chip_already_paid(svc: ServiceHarness) -> None:
    c, _ = await funded(svc, 100)
    chip = PurseCard(c["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=100, overdraft_fen=500)
    assert results(await upload(svc, [debit(chip, tid(svc), 300)])) == ["accepted"]
    assert await svc.balance(c["card_no"]) == -200


# ------------------------------------------------------------------ TAC


async def test_bad_and_tampered_tacs_are_refused_and_move_nothing(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    good = debit(chip, t, 180)
    other_key = PurseCard(c["card_sn"], master_key=bytes(16), balance_fen=1000).debit(
        180, t, next(_seq), good.txn_time, **BUS
    )
    before = await money_state(db)
    bad = [
        forge(good, terminal_seq=next(_seq), tac=bytes(a ^ 0xFF for a in good.tac)),  # a wrong TAC
        forge(good, terminal_seq=next(_seq)),  # the TAC covers terminal_seq
        forge(good, terminal_seq=next(_seq), amount_fen=1),  # tampered amount
        forge(good, terminal_seq=next(_seq), balance_before_fen=5000),  # tampered balance
        other_key,  # a card (or clone) keyed by another master key
    ]
    answers = await upload(svc, bad)
    assert [(a["result"], a["reason"]) for a in answers] == [("bad_tac", "tac_mismatch")] * 5
    after = await money_state(db)
    assert after[0] == before[0] and after[1] == before[1]  # no balance, sequence or journal change
    assert after[2] == before[2] + 5  # every refused record is kept for investigation
    # The genuine record is still accepted afterwards.
    assert results(await upload(svc, [good])) == ["accepted"]
    assert await svc.balance(c["card_no"]) == 820


# ------------------------------------------------------------------ idempotency


async def test_reuploading_a_batch_answers_the_same_and_changes_nothing(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    r1 = debit(chip, t, 180)
    bad = forge(debit(chip, t, 180), terminal_seq=next(_seq))  # refused; the chip moved on: a gap follows
    recs = [r1, bad, debit(chip, t, 180), debit(chip, t, 180)]
    first = await upload(svc, recs, batch_id=77)
    # After the gap the shadow balance lacks the refused debit: the next record is flagged too.
    assert results(first) == ["accepted", "bad_tac", "sequence_gap", "balance_mismatch"]
    state = await money_state(db)
    again = await upload(svc, recs, batch_id=77)
    assert again == [{**a, "replayed_answer": True} for a in first]
    assert await money_state(db) == state
    # The same records in another batch id (a validator that lost its batch numbering): the same answers.
    assert results(await upload(svc, recs[1:], batch_id=78)) == results(first)[1:]
    # Past the terminal-answer retention the card's ledger still answers, nothing posts twice. The key is
    # part of the record (and of its TAC), so a posted record is always found by its key first: replayed
    # with its first verdict, never answered `duplicate`.
    await db.execute("DELETE FROM terminal_txn WHERE terminal_id = $1", t)
    assert await upload(svc, recs) == again
    assert (await money_state(db))[:3] == state[:3]
    assert await svc.balance(c["card_no"]) == 1000 - 3 * 180


async def test_overlapping_batches_post_each_record_once(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    recs = [debit(chip, t, 100) for _ in range(5)]
    assert results(await upload(svc, recs[:3])) == ["accepted"] * 3
    second = await upload(svc, recs[1:])
    assert [(a["result"], a["replayed_answer"]) for a in second] == [("accepted", True)] * 2 + [("accepted", False)] * 2
    assert await svc.balance(c["card_no"]) == 500
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE kind = 5") == 5


async def test_the_same_batch_uploaded_concurrently_is_posted_once(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    cards = [await funded(svc, 1000) for _ in range(3)]
    t = tid(svc)
    recs = [debit(chip, t, 150) for _, chip in cards for _ in range(2)]
    unknown = PurseCard(new_card_numbers()[1], master_key=svc.keys.card_tac_master, balance_fen=500)
    recs.append(debit(unknown, t, 150))
    a, b = await asyncio.gather(upload(svc, recs, batch_id=5), upload(svc, recs, batch_id=5))
    assert results(a) == results(b) == ["accepted"] * 6 + ["card_unknown"]
    assert sorted([a[0]["replayed_answer"], b[0]["replayed_answer"]]) == [False, True]
    for c, _ in cards:
        assert await svc.balance(c["card_no"]) == 700
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE kind = 5") == 6


# ------------------------------------------------------------------ conflicts, gaps, balances


async def test_the_same_purse_seq_with_another_amount_is_a_conflict(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, chip = await funded(svc, 1000)
    clone = PurseCard(c["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=1000)
    t = tid(svc)
    other = tid(svc, OTHER)
    original = debit(chip, t, 180)
    cloned = debit(clone, other, 200)  # the same purse_seq 1, signed by the same card key
    assert original.purse_seq == cloned.purse_seq == 1
    assert results(await upload(svc, [original])) == ["accepted"]
    answers = await upload(svc, [cloned], as_=OTHER)
    assert [(a["result"], a["reason"]) for a in answers] == [("conflict", "purse_seq_posted_differently")]
    # The same (terminal, terminal_seq) with other content: refused, not posted, kept.
    reused = debit(chip, t, 120)
    reused = chip_resign(svc, forge(reused, terminal_seq=original.terminal_seq))
    assert [(a["result"], a["reason"]) for a in await upload(svc, [reused])] == [("conflict", "terminal_seq_reused")]
    assert await svc.balance(c["card_no"]) == 820
    # Kept for investigation: the clone's record in the card's ledger, the record reusing a key with the
    # refused records (the card's ledger holds that key for the original).
    kept = await db.fetch("SELECT terminal_id, result, posted FROM offline_record ORDER BY terminal_id")
    assert sorted((r["terminal_id"], r["result"], r["posted"]) for r in kept) == sorted(
        [(t, "accepted", True), (other, "conflict", False)]
    )
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    assert await refusals(db, t) == [(original.terminal_seq, card_id, "conflict", "terminal_seq_reused", 120)]


async def test_a_record_refused_for_a_reused_key_gets_the_same_answer_after_the_answers_are_pruned(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A validator reset reuses a terminal_seq for another card. The terminal's answers are pruned after
    their retention, the offline ledger is not: a re-upload within the upload window still gets the first
    answer (the key is taken), never a second verdict or an error."""
    (cx, chip_x), (cy, chip_y) = await funded(svc, 1000), await funded(svc, 1000)
    t = tid(svc)
    x = debit(chip_x, t, 180)
    y = chip_y.debit(200, t, x.terminal_seq, x.txn_time + 1, **BUS)  # the same key, another card
    assert results(await upload(svc, [x])) == ["accepted"]
    first = await upload(svc, [y])
    assert [(a["result"], a["reason"]) for a in first] == [("conflict", "terminal_seq_reused")]
    await db.execute("DELETE FROM terminal_txn WHERE terminal_id = $1", t)  # retention pruning
    before = await money_state(db)
    for record in (y, x):
        again = await upload(svc, [record])
        assert [(a["result"], a["replayed_answer"]) for a in again] == [
            ("conflict" if record is y else "accepted", True)
        ], again
    assert await money_state(db) == before
    assert (await svc.balance(cx["card_no"]), await svc.balance(cy["card_no"])) == (820, 1000)
    card_y = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", cy["card_no"])
    assert await refusals(db, t) == [(x.terminal_seq, card_y, "conflict", "terminal_seq_reused", 200)]


async def test_a_reused_key_of_the_same_card_is_kept_never_posted_and_replayed(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A validator reset: the same card taps again under a terminal_seq its first record used. The card's
    ledger holds that key for the first record, so the refused one is kept with the refused records;
    re-uploads (at once, later, after the answers are pruned) are replays and change nothing."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    x1 = debit(chip, t, 180)
    assert results(await upload(svc, [x1])) == ["accepted"]
    x2 = chip.debit(200, t, x1.terminal_seq, x1.txn_time + 60, **BUS)  # genuine TAC, purse_seq 2
    answers = await asyncio.gather(upload(svc, [x2], batch_id=41), upload(svc, [x2], batch_id=41))
    assert sorted((a[0]["result"], a[0]["reason"], a[0]["replayed_answer"]) for a in answers) == [
        ("conflict", "terminal_seq_reused", False), ("conflict", "terminal_seq_reused", True)
    ]  # fmt: skip
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    kept = [(x1.terminal_seq, card_id, "conflict", "terminal_seq_reused", 200)]
    assert await refusals(db, t) == kept
    assert orjson.loads(await db.fetchval("SELECT record FROM offline_refusal")) == transit.record_to_dict(x2)
    state = await money_state(db)
    await db.execute("DELETE FROM terminal_txn WHERE terminal_id = $1", t)  # retention pruning
    for record, verdict in ((x2, "conflict"), (x1, "accepted")):
        again = await upload(svc, [record])
        assert [(a["result"], a["replayed_answer"]) for a in again] == [(verdict, True)], again
    assert (await money_state(db))[:3] == state[:3] and await refusals(db, t) == kept
    assert await svc.balance(c["card_no"]) == 820  # never posted: its purse_seq stays a gap of the card
    assert results(await upload(svc, [debit(chip, t, 100)])) == ["sequence_gap"]


async def test_records_of_unknown_cards_are_kept_and_replayed_after_the_answers_are_pruned(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A card that is not ours (e.g. another city's): its records, and one that also reuses a key, are
    kept with the refused records; a re-upload is a replay, before and after terminal_txn is pruned."""
    _, chip = await funded(svc, 1000)
    t = tid(svc)
    x = debit(chip, t, 180)
    assert results(await upload(svc, [x])) == ["accepted"]
    stranger = PurseCard(new_card_numbers()[1], master_key=svc.keys.card_tac_master, balance_fen=500)
    reused = stranger.debit(150, t, x.terminal_seq, x.txn_time + 1, **BUS)
    unknown = debit(stranger, t, 120)
    first = await upload(svc, [reused, unknown])
    assert [(a["result"], a["reason"], a["replayed_answer"]) for a in first] == [
        ("conflict", "terminal_seq_reused", False), ("card_unknown", "card_not_known", False)
    ]  # fmt: skip
    kept = [(x.terminal_seq, None, "conflict", "terminal_seq_reused", 150),
            (unknown.terminal_seq, None, "card_unknown", "card_not_known", 120)]  # fmt: skip
    assert await refusals(db, t) == kept
    state = await money_state(db)
    assert await upload(svc, [reused, unknown]) == [{**a, "replayed_answer": True} for a in first]
    assert await money_state(db) == state
    await db.execute("DELETE FROM terminal_txn WHERE terminal_id = $1", t)  # retention pruning
    assert await upload(svc, [reused, unknown]) == [{**a, "replayed_answer": True} for a in first]
    assert (await money_state(db))[:3] == state[:3] and await refusals(db, t) == kept


async def test_migration_0008_keeps_the_records_of_unknown_cards_answered_before_it(db: asyncpg.Connection) -> None:
    """Before migration 0008 a record of no known card was kept only in its terminal answer (detail.record),
    pruned with it: the migration copies those still there."""
    stranger = PurseCard(new_card_numbers()[1], master_key=bytes(16), balance_fen=500)
    record = transit.record_to_dict(stranger.debit(150, "v-old", 9, int(time.time()) - 60, **BUS))
    old = {"kind": "offline", "batch_id": 3, "reason": "card_not_known", "record": record}
    [migration] = [m for m in migrate.available() if m.version == 8]
    tx = db.transaction()
    await tx.start()
    try:
        await db.execute("DROP TABLE offline_refusal")
        await db.execute(
            """INSERT INTO terminal_txn (terminal_id, terminal_seq, request_hash, card_id, result, detail)
               VALUES ('v-old', 9, '\\x01', NULL, 'card_unknown', $1::jsonb),
                      ('v-old', 10, '\\x02', 1, 'accepted', '{"kind": "offline", "batch_id": 3, "purse_seq": 1}'),
                      ('v-old', 11, '\\x03', 1, 'approved', '{"fare": 180}')""",
            orjson.dumps(old).decode(),
        )
        await db.execute(migration.sql)
        rows = await db.fetch("SELECT * FROM offline_refusal")
        assert [(r["terminal_id"], r["terminal_seq"], bytes(r["request_hash"]), r["card_id"], r["result"], r["reason"],
                 orjson.loads(r["record"]), r["batch_id"]) for r in rows] == [
            ("v-old", 9, b"\x01", None, "card_unknown", "card_not_known", record, 3)
        ]  # fmt: skip
    finally:
        await tx.rollback()


def chip_resign(svc: ServiceHarness, record: OfflineRecord) -> OfflineRecord:
    """Sign a record with the card's real TAC key (what a cloned card could do)."""
    key = PurseCard(record.card_sn, master_key=svc.keys.card_tac_master).tac_key
    return forge(record, tac=transit.compute_tac(key, record))


async def test_a_sequence_gap_is_posted_and_a_late_record_fills_it(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    r1, r2, r3 = (debit(chip, t, 100) for _ in range(3))
    answers = await upload(svc, [r1, r3])
    assert [(a["result"], a["reason"]) for a in answers] == [("accepted", None), ("sequence_gap", "purse_seq_gap")]
    assert await svc.balance(c["card_no"]) == 800
    assert [(a["result"], a["reason"]) for a in await upload(svc, [r2])] == [("accepted", "fills_earlier_gap")]
    assert await svc.balance(c["card_no"]) == 700
    assert await db.fetchval("SELECT purse_seq FROM purse p JOIN card c USING (card_id) WHERE card_no = $1",
                             c["card_no"]) == 3  # fmt: skip


async def test_a_balance_mismatch_is_posted_and_flagged(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, _ = await funded(svc, 1000)
    chip = PurseCard(c["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=1500)  # the chip says 1500
    answers = await upload(svc, [debit(chip, tid(svc), 180)])
    assert [(a["result"], a["reason"]) for a in answers] == [("balance_mismatch", "balance_before_differs")]
    assert await svc.balance(c["card_no"]) == 820  # the shadow follows the debit; the difference is flagged
    detail = orjson.loads(await db.fetchval("SELECT detail FROM terminal_txn WHERE terminal_id = $1", tid(svc)))
    assert detail["shadow_balance_before_fen"] == 1000
    assert await db.fetchval("SELECT counterparty FROM txn_journal WHERE kind = 5") == "cq-bus"


async def test_a_hotlisted_card_moves_the_purse_but_the_operator_is_not_paid(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    before_loss = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})
    assert r.status == 200, r.body
    loss = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    assert loss > before_loss
    old_list = debit(chip, t, 180, hotlist_version=before_loss)  # the validator did not know yet
    new_list = debit(chip, t, 200, hotlist_version=loss)  # it knew, and should have refused the card
    newer = debit(chip, t, 100, hotlist_version=loss + 5)
    answers = await upload(svc, [old_list, new_list, newer])
    assert [(a["result"], a["reason"]) for a in answers] == [
        ("accepted", None),
        ("hotlisted", "blocked_at_validator_hotlist_version"),
        ("hotlisted", "blocked_at_validator_hotlist_version"),
    ]
    assert await svc.balance(c["card_no"]) == 1000 - 480
    rows = await db.fetch("SELECT counterparty, amount_fen FROM txn_journal WHERE kind = 5 ORDER BY terminal_seq")
    assert [(r["counterparty"], r["amount_fen"]) for r in rows] == [
        ("cq-bus", -180), ("hotlisted:cq-bus", -200), ("hotlisted:cq-bus", -100)
    ]  # fmt: skip


async def _replaced_journal(db: asyncpg.Connection, old_no: str, new_no: str) -> list[tuple[str, int, int, str]]:
    rows = await db.fetch(
        """SELECT c.card_no, j.kind, j.amount_fen, j.counterparty FROM txn_journal j JOIN card c USING (card_id)
           WHERE c.card_no = ANY($1::text[]) AND j.kind IN (5, 7) ORDER BY j.txn_id""",
        [old_no, new_no],
    )
    return [("old" if r["card_no"] == old_no else "new", r["kind"], r["amount_fen"], r["counterparty"]) for r in rows]


async def test_a_replaced_cards_offline_debits_are_carried_to_the_new_card(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The old chip paid offline before its validators knew of the replacement; the records arrive after
    the replacement moved the purse. Each is judged on the old chip's own ledger (its sequence, and its
    balance: the moved money is still on the chip), posted there, and carried to the new card's purse
    through the replacement account: the dead card keeps no debt, the new card pays."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    before = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    early = [debit(chip, t, 180, hotlist_version=before), debit(chip, t, 200, hotlist_version=before)]
    body = replacement_body()
    r = await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})
    assert r.status == 200, r.body
    after = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    late = debit(chip, t, 100, hotlist_version=after)  # this validator knew: it should have refused the chip
    answers = await upload(svc, [early[0]])
    answers += await upload(svc, [early[1], late])
    assert [(a["result"], a["reason"]) for a in answers] == [
        ("accepted", None), ("accepted", None), ("hotlisted", "blocked_at_validator_hotlist_version")
    ]  # fmt: skip
    assert (await svc.balance(c["card_no"]), await svc.balance(body["new_card_no"])) == (0, 1000 - 480)
    journal = await _replaced_journal(db, c["card_no"], body["new_card_no"])
    assert journal[:2] == [("old", 7, -1000, "replacement"), ("new", 7, 1000, "replacement")]  # the move
    assert sorted(journal[2:]) == sorted([
        ("old", 5, -180, "cq-bus"), ("old", 7, 180, "replacement"), ("new", 7, -180, "replacement"),
        ("old", 5, -200, "cq-bus"), ("old", 7, 200, "replacement"), ("new", 7, -200, "replacement"),
        ("old", 5, -100, "hotlisted:cq-bus"), ("old", 7, 100, "replacement"), ("new", 7, -100, "replacement"),
    ])  # fmt: skip
    # Uploaded again: answered, nothing moves.
    again = await upload(svc, [*early, late])
    assert all(a["replayed_answer"] for a in again)
    assert await svc.balance(body["new_card_no"]) == 520
    _, checks = await audit.run_audit(db, svc.settings, svc.app[SERVICES].transit.table)
    assert all(ch.ok for ch in checks), [ch for ch in checks if not ch.ok]


async def test_a_late_debit_of_the_old_chip_may_overdraw_the_new_card_and_the_audit_knows_why(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The new card spent its balance online; then the old chip's offline debit (its own balance allowed
    it) arrives and is carried over: the new purse is below zero, and the audit counts it as offline
    shadow debt, not as an online overdraft."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    rec = debit(chip, t, 180, hotlist_version=(await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"])
    body = replacement_body()
    assert (await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})).status == 200
    r = await svc.post(
        f"/v1/purses/{body['new_card_no']}/top-ups",
        {"terminal_seq": next(_seq), "amount_fen": 900, "channel": "refund", "operator": "staff-1"},
    )
    assert r.status == 200 and r.body["balance_fen"] == 100, r.body
    [answer] = await upload(svc, [rec])
    assert answer["result"] == "accepted" and await svc.balance(body["new_card_no"]) == -80
    _, checks = await audit.run_audit(db, svc.settings, svc.app[SERVICES].transit.table)
    overdraft = next(ch for ch in checks if ch.name == "purse_overdraft")
    assert overdraft.ok and overdraft.counts["offline_shadow"] == 1, overdraft
    assert overdraft.counts["offline_shadow_fen"] == 80, overdraft  # the default overdraft limit is 0
    assert all(ch.ok for ch in checks), [ch for ch in checks if not ch.ok]


async def test_a_replacement_committed_while_an_upload_waits_for_the_purse(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The replacement holds the old purse's lock and commits while the upload waits for it: the upload
    read the card before the wait (still active), sees it changed when it writes, and runs again."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    rec = debit(chip, t, 180, hotlist_version=(await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"])
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    body = replacement_body()
    async with svc.app[SERVICES].pool.acquire() as office, office.transaction():  # the office's replacement
        await office.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        pending = asyncio.create_task(upload(svc, [rec]))
        await until_lock_waits(db)
        await lifecycle.apply(
            office, c["card_no"], "replace", {**body, "expires_on": dt.date.fromisoformat(body["expires_on"])},
            Actor("card-office-test", "staff-1"), dt.datetime.now(dt.UTC), 30,
        )  # fmt: skip
    [answer] = await pending
    assert (answer["result"], answer["reason"]) == ("accepted", None), answer
    assert (await svc.balance(c["card_no"]), await svc.balance(body["new_card_no"])) == (0, 820)


async def test_card_changes_that_do_not_move_the_purse_do_not_make_an_upload_run_again(
    svc: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write checks that each card's status and replacement are still those the batch read; a PIN lock
    or unlock committed in between changes neither, so the upload is written at its first attempt."""
    c, chip = await funded(svc, 1000)
    rec = debit(chip, tid(svc), 180, hotlist_version=(await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"])
    real = offline_mod._write
    calls = 0

    async def write(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        r = await svc.post(f"/v1/cards/{c['card_no']}/{'lock-pin' if calls % 2 else 'unlock-pin'}", {"operator": "staff-1"})
        assert r.status == 200, r.body
        return await real(*args)

    monkeypatch.setattr(offline_mod, "_write", write)
    [answer] = await upload(svc, [rec])
    assert answer["result"] == "accepted" and calls == 1, (answer, calls)


async def test_the_journal_has_a_month_for_the_oldest_record_an_upload_may_post(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Records up to UPLOAD_AGE_S_MAX old are posted with their own time, into the journal partition of
    their month. A database created early in a month had none for a record a month old (the migration
    creates the partitions from a month back): the upload failed with 500. The maintenance pass keeps the
    months back to the oldest postable record. (Today's oldest record is in an earlier month than today
    on every day but the 31st, when it is in this month and the test shows nothing.)"""
    _, chip = await funded(svc, 1000)
    now = int(time.time())  # one clock read for both months
    oldest = now - limits.UPLOAD_AGE_S_MAX + 3600
    month = dt.datetime.fromtimestamp(oldest, dt.UTC).strftime("%Y%m")
    if month != dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m"):
        assert not await db.fetchval(f"SELECT count(*) FROM txn_journal_{month}")
        await db.execute(f"DROP TABLE txn_journal_{month}")  # as if the database were created this month
    await maintenance_once(svc.app[SERVICES].pool, svc.settings)
    [answer] = await upload(svc, [debit(chip, tid(svc), 180, txn_time=oldest)])
    assert answer["result"] == "accepted", answer
    assert await db.fetchval("SELECT tableoid::regclass::text FROM txn_journal WHERE kind = 5") == f"txn_journal_{month}"


async def test_a_record_made_after_its_validator_downloaded_a_block_is_judged_as_of_that_block(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The hotlist version a record claims is not covered by its TAC. A validator that downloaded the loss
    cannot claim, for a record it made afterwards, the list from before it: that record is judged as of
    the version it was served (the operator is not paid for a blocked card); one made before the
    download keeps its claim."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    before_loss = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})
    assert r.status == 200, r.body
    now = int(time.time())
    earlier = debit(chip, t, 180, hotlist_version=before_loss, txn_time=now - 60)
    served = await svc.get(f"/v1/hotlist?since={before_loss}", as_="transit_validator")
    assert served.status == 200 and served.body["to_version"] > before_loss, served.body
    later = debit(chip, t, 200, hotlist_version=before_loss, txn_time=now + 2)  # claims the old list
    answers = await upload(svc, [earlier, later])
    assert [(a["result"], a["reason"]) for a in answers] == [
        ("accepted", None), ("hotlisted", "blocked_at_validator_hotlist_version")
    ]  # fmt: skip
    rows = await db.fetch("SELECT counterparty, amount_fen FROM txn_journal WHERE kind = 5 ORDER BY terminal_seq")
    assert [(r["counterparty"], r["amount_fen"]) for r in rows] == [("cq-bus", -180), ("hotlisted:cq-bus", -200)]
    # Polling again with nothing new does not move the time the version was served.
    kept = await db.fetchrow("SELECT version, served_at FROM terminal_hotlist WHERE terminal_id = $1", t)
    assert (await svc.get(f"/v1/hotlist?since={served.body['to_version']}", as_="transit_validator")).status == 200
    assert await db.fetchrow("SELECT version, served_at FROM terminal_hotlist WHERE terminal_id = $1", t) == kept


async def test_a_record_made_between_two_downloads_is_judged_as_of_the_first(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Validators poll the hotlist every few minutes and upload later: by the upload, the terminal's last
    download is after its records. A record made after the download that brought the loss, claiming the
    list from before it, is still judged as of that download (kept an hour at a time, migration 0012)."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    before_loss = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    assert (await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    served = await svc.get(f"/v1/hotlist?since={before_loss}", as_="transit_validator")
    assert served.status == 200 and served.body["to_version"] > before_loss, served.body
    # That download was ten minutes ago, the record five minutes ago.
    await db.execute("UPDATE terminal_hotlist SET served_at = served_at - interval '10 minutes' WHERE terminal_id = $1", t)
    await db.execute(
        """UPDATE terminal_hotlist_serve SET first_at = first_at - interval '10 minutes',
                  last_at = last_at - interval '10 minutes', hour = date_trunc('hour', first_at - interval '10 minutes')
           WHERE terminal_id = $1""",
        t,
    )
    first = await db.fetchval("SELECT first_at FROM terminal_hotlist_serve WHERE terminal_id = $1", t)
    rec = debit(chip, t, 200, hotlist_version=before_loss, txn_time=int(first.timestamp()) + 300)
    # Then another loss, and the validator downloads it too before uploading.
    other = await svc.new_card(has_purse=True)
    assert (await svc.post(f"/v1/cards/{other['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    again = await svc.get(f"/v1/hotlist?since={served.body['to_version']}", as_="transit_validator")
    assert again.status == 200 and again.body["to_version"] > served.body["to_version"], again.body
    assert await db.fetchval("SELECT served_at FROM terminal_hotlist WHERE terminal_id = $1", t) > first
    [answer] = await upload(svc, [rec])
    assert (answer["result"], answer["reason"]) == ("hotlisted", "blocked_at_validator_hotlist_version"), answer
    assert await db.fetchval("SELECT counterparty FROM txn_journal WHERE kind = 5") == "hotlisted:cq-bus"


async def test_the_serves_older_than_the_upload_window_are_pruned_but_the_newest_of_them(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    window = limits.UPLOAD_AGE_S_MAX + svc.settings.clock_skew_s + 86400
    for terminal, age, version in (("T-1", window + 7200, 3), ("T-1", window + 3600, 4), ("T-1", window - 3600, 5),
                                   ("T-2", window + 7200, 3), ("T-2", window + 3600, 4)):  # fmt: skip
        await db.execute(
            """INSERT INTO terminal_hotlist_serve (terminal_id, hour, first_version, first_at, last_version, last_at)
               VALUES ($1, date_trunc('hour', now() - make_interval(secs => $2)), $3,
                       now() - make_interval(secs => $2), $3, now() - make_interval(secs => $2))""",
            terminal, float(age), version,
        )  # fmt: skip
    await maintenance_once(svc.app[SERVICES].pool, svc.settings)
    kept = await db.fetch("SELECT terminal_id, last_version FROM terminal_hotlist_serve ORDER BY 1, 2")
    # Each terminal keeps its newest hour before the window (a record early in the window was made under it).
    assert [(r["terminal_id"], r["last_version"]) for r in kept] == [("T-1", 4), ("T-1", 5), ("T-2", 4)]


async def test_a_record_early_in_the_window_is_judged_as_of_the_serve_before_it(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The serve a record was made under may be older than the upload window (a terminal whose list rarely
    moves); it still counts, after a later download."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    before_loss = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    assert (await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    served = await svc.get(f"/v1/hotlist?since={before_loss}", as_="transit_validator")
    edge = int(time.time()) - offline_mod.RECORD_AGE_S_MAX  # the oldest record an upload takes
    at = float(edge - svc.settings.clock_skew_s - 600)  # the download: before the window
    await db.execute("UPDATE terminal_hotlist SET served_at = to_timestamp($2) WHERE terminal_id = $1", t, at)
    await db.execute(
        """UPDATE terminal_hotlist_serve SET first_at = to_timestamp($2), last_at = to_timestamp($2),
                  hour = date_trunc('hour', to_timestamp($2)) WHERE terminal_id = $1""",
        t, at,
    )  # fmt: skip
    rec = debit(chip, t, 200, hotlist_version=before_loss, txn_time=edge + 120)
    other = await svc.new_card(has_purse=True)
    assert (await svc.post(f"/v1/cards/{other['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    again = await svc.get(f"/v1/hotlist?since={served.body['to_version']}", as_="transit_validator")
    assert again.status == 200 and again.body["to_version"] > served.body["to_version"], again.body
    [answer] = await upload(svc, [rec])
    assert (answer["result"], answer["reason"]) == ("hotlisted", "blocked_at_validator_hotlist_version"), answer


async def test_a_serve_counts_from_the_whole_second_after_it(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """Records carry whole seconds. A download at T + 0.7 s with card C's loss: C's record stamped T, claiming
    the list from before the loss, may have been made before the download, so the validator could not
    refuse it: accepted, its operator paid. Before, the serve's time was cut to T and the record judged
    `hotlisted`. One stamped T + 1 was made after the download: hotlisted."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    before_loss = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    assert (await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    assert (await svc.get(f"/v1/hotlist?since={before_loss}", as_="transit_validator")).status == 200
    whole = int(time.time()) - 600
    served_at = whole + 0.7
    await db.execute("UPDATE terminal_hotlist SET served_at = to_timestamp($2) WHERE terminal_id = $1", t, served_at)
    await db.execute(
        """UPDATE terminal_hotlist_serve SET first_at = to_timestamp($2), last_at = to_timestamp($2),
                  hour = date_trunc('hour', to_timestamp($2)) WHERE terminal_id = $1""",
        t, served_at,
    )  # fmt: skip
    same_second = debit(chip, t, 200, hotlist_version=before_loss, txn_time=whole)
    next_second = debit(chip, t, 200, hotlist_version=before_loss, txn_time=whole + 1)
    first, second = await upload(svc, [same_second, next_second])
    assert first["result"] == "accepted", first
    assert (second["result"], second["reason"]) == ("hotlisted", "blocked_at_validator_hotlist_version"), second


async def test_the_last_serve_of_an_hour_counts_after_a_quiet_hour_and_a_later_download(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Hour H: downloads at H:05 and at H:50, the second with card C's loss; nothing new in hour H+1; a
    download later. C's record at H+1:20, claiming the list from before C's loss, is judged as of H:50."""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    v0 = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    first_loss = await svc.new_card(has_purse=True)
    assert (await svc.post(f"/v1/cards/{first_loss['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    s1 = await svc.get(f"/v1/hotlist?since={v0}", as_="transit_validator")
    assert (await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    s2 = await svc.get(f"/v1/hotlist?since={s1.body['to_version']}", as_="transit_validator")
    row = await db.fetchrow(  # one row per hour: two if an hour began between the downloads
        "SELECT min(first_version) AS first, max(last_version) AS last FROM terminal_hotlist_serve WHERE terminal_id = $1", t
    )
    assert (row["first"], row["last"]) == (s1.body["to_version"], s2.body["to_version"])
    await db.execute(
        """DELETE FROM terminal_hotlist_serve WHERE terminal_id = $1
           AND hour > (SELECT min(hour) FROM terminal_hotlist_serve WHERE terminal_id = $1)""",
        t,
    )  # fmt: skip
    h = float(int(time.time()) // 3600 * 3600 - 3 * 3600)  # hour H, three hours ago
    await db.execute(
        """UPDATE terminal_hotlist_serve SET hour = to_timestamp($2), first_at = to_timestamp($2 + 300),
                  last_at = to_timestamp($2 + 3000), last_version = $3 WHERE terminal_id = $1""",
        t, h, row["last"],
    )  # fmt: skip
    await db.execute("UPDATE terminal_hotlist SET served_at = to_timestamp($2 + 3000) WHERE terminal_id = $1", t, h)
    rec = debit(chip, t, 200, hotlist_version=s1.body["to_version"], txn_time=int(h) + 3600 + 1200)
    third = await svc.new_card(has_purse=True)
    assert (await svc.post(f"/v1/cards/{third['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    assert (await svc.get(f"/v1/hotlist?since={s2.body['to_version']}", as_="transit_validator")).status == 200
    [answer] = await upload(svc, [rec])
    assert (answer["result"], answer["reason"]) == ("hotlisted", "blocked_at_validator_hotlist_version"), answer


async def test_the_serves_read_for_an_upload_include_the_hour_holding_the_window_start(
    db: asyncpg.Connection,
) -> None:
    """The upload window starts inside an hour: that hour's first serve (which may come before a record at
    the window's start) and the newest hour before it are read too, not only the hour's last serve."""
    h = dt.datetime(2026, 11, 1, 8, tzinfo=dt.UTC)
    rows = [  # (hour, first version, first at, last version, last at)
        (h - dt.timedelta(hours=2), 1, 10, 2, 20),
        (h - dt.timedelta(hours=1), 3, 10, 4, 50),  # the newest hour before the window's hour
        (h, 5, 1, 6, 59),  # the hour holding the window's start (at minute 30)
        (h + dt.timedelta(hours=1), 7, 5, 7, 5),
    ]
    for hour, v1, m1, v2, m2 in rows:
        await db.execute(
            """INSERT INTO terminal_hotlist_serve (terminal_id, hour, first_version, first_at, last_version, last_at)
               VALUES ('T-w', $1::timestamptz, $2, $1::timestamptz + make_interval(mins => $3), $4,
                       $1::timestamptz + make_interval(mins => $5))""",
            hour, v1, m1, v2, m2,
        )  # fmt: skip
    read = await db.fetch(offline_mod._SERVED_SQL, "T-w", h + dt.timedelta(minutes=30))
    served = offline_mod.Served.of([(int(r["served_at"].timestamp()), r["version"]) for r in read])
    at = int((h + dt.timedelta(minutes=45)).timestamp())  # a record in the window, before the hour's last serve
    assert served.at(at) == 5
    assert served.at(int(h.timestamp())) == 4  # before the hour's first serve: the hour before
    assert sorted(r["version"] for r in read) == [4, 5, 6, 7, 7]


def test_the_versions_served_give_the_highest_at_or_before_a_time() -> None:
    served = offline_mod.Served.of([(300, 7), (100, 5), (200, 4)])  # a lower version later: a stale answer
    assert [served.at(t) for t in (99, 100, 199, 200, 299, 300, 10**9)] == [0, 5, 5, 5, 5, 7, 7]
    assert offline_mod.Served.of([]).at(10**9) == 0


async def test_unknown_cards_and_cards_without_a_purse(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    t = tid(svc)
    stranger = PurseCard(new_card_numbers()[1], master_key=svc.keys.card_tac_master, balance_fen=500)
    no_purse = await svc.new_card(has_purse=False)
    chip = PurseCard(no_purse["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=500)
    before = await money_state(db)
    answers = await upload(svc, [debit(stranger, t), debit(chip, t)])
    assert [(a["result"], a["reason"]) for a in answers] == [("card_unknown", "card_not_known")] * 2
    after = await money_state(db)
    # Answered (terminal_txn) and kept with the refused records, without a card: neither is a purse of ours.
    assert after[:3] == before[:3] and (after[3], after[4]) == (before[3] + 2, before[4] + 2)
    kept = await db.fetch("SELECT card_id, record FROM offline_refusal WHERE terminal_id = $1 ORDER BY terminal_seq", t)
    assert [(r["card_id"], orjson.loads(r["record"])["card_sn"]) for r in kept] == [
        (None, stranger.card_sn), (None, no_purse["card_sn"])
    ]  # fmt: skip


async def test_malformed_records_are_refused(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    now = int(time.time())
    recs = [
        debit(chip, t, txn_time=now + 3600),
        debit(chip, t, txn_time=now - limits.UPLOAD_AGE_S_MAX - 3600),
        debit(chip, t, place={"line_id": "bus-999"}),
        debit(chip, t, place={"line_id": "L1", "station_id": "l1-nowhere", "direction": "out"}),
    ]
    answers = await upload(svc, recs)
    assert [(a["result"], a["reason"]) for a in answers] == [
        ("malformed", "txn_time_in_future"),
        ("malformed", "txn_time_too_old"),
        ("malformed", "unknown_line"),
        ("malformed", "unknown_station"),
    ]
    assert await svc.balance(c["card_no"]) == 1000


# ------------------------------------------------------------------ refused uploads


async def test_a_full_batch_is_accepted_and_one_record_more_is_refused(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    recs = [debit(chip, t, 1) for _ in range(transit.OFFLINE_BATCH_RECORDS_MAX + 1)]
    body = transit.batch_to_dict(OfflineBatch(t, next(_batch), recs[:-1]))
    body["records"].append(transit.record_to_dict(recs[-1]))
    before = await money_state(db)
    r = await svc.post("/v1/transit/offline-batches", body, as_="transit_validator")
    assert r.status == 400 and r.body["code"] == "invalid_field" and r.body["field"] == "records", r.body
    assert await money_state(db) == before
    answers = await upload(svc, recs[:-1])
    assert len(answers) == 500 and set(results(answers)) == {"accepted"}
    assert await svc.balance(c["card_no"]) == 500
    r = await svc.request("POST", "/v1/transit/offline-batches", raw=b" " * (limits.UPLOAD_BODY_BYTES_MAX + 1),
                          as_="transit_validator")  # fmt: skip
    assert r.status == 413 and r.body["code"] == "body_too_large", r.body


async def test_records_of_another_terminal_or_without_the_operation_are_forbidden(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    _, chip = await funded(svc, 1000)
    other = tid(svc, OTHER)
    body = transit.batch_to_dict(OfflineBatch(other, 1, [debit(chip, other)]))
    before = await money_state(db)
    counted = (await auth_failures(svc)).get("forbidden", 0)
    r = await svc.post("/v1/transit/offline-batches", body, as_="transit_validator")
    assert r.status == 403 and r.body["code"] == "forbidden_operation" and r.body["field"] == "terminal_id", r.body
    r = await svc.post("/v1/transit/offline-batches", body, as_="merchant_pos")
    assert r.status == 403 and r.body["code"] == "forbidden_operation", r.body
    assert await money_state(db) == before
    # Both refusals are counted (docs/security.md), the other terminal's records as well as the operation.
    assert (await auth_failures(svc)).get("forbidden", 0) == counted + 2


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b["records"][0].update(tac="zz"), "records[0].tac"),
        (lambda b: b["records"][0].pop("purse_seq"), "records[0].purse_seq"),
        (lambda b: b.update(batch_id=0), "batch_id"),
        (lambda b: b.update(records=[]), "records"),
    ],
)
async def test_a_malformed_upload_is_refused_whole(
    svc: ServiceHarness, db: asyncpg.Connection, mutate: Any, field: str
) -> None:
    _, chip = await funded(svc, 1000)
    t = tid(svc)
    body = orjson.loads(orjson.dumps(transit.batch_to_dict(OfflineBatch(t, 1, [debit(chip, t), debit(chip, t)]))))
    mutate(body)
    before = await money_state(db)
    r = await svc.post("/v1/transit/offline-batches", body, as_="transit_validator")
    assert r.status == 400 and r.body["code"] == "invalid_field" and r.body["field"] == field, r.body
    assert await money_state(db) == before
