"""Edges of the transit write paths (offline verdicts, replaced cards, idempotency keys, locks, the
journey sweep, the audit) that the other tests let a one-token change of the code pass unnoticed: each
test names the change it catches ("Mutant: ...") and pins what docs/transit.md and docs/api.md describe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from cardsvc import limits
from cardsvc.http.keys import SERVICES
from protocols.transit import PurseCard
from tests.helpers import (
    ServiceHarness,
    new_card_numbers,
    purse_vs_journal,
    replacement_body,
    until_lock_waits,
)
from tests.transit.test_offline import BUS, OTHER, debit, funded, refusals, tid, upload


@pytest.fixture(autouse=True)
async def ledger_holds(db_dsn: str) -> AsyncIterator[None]:
    yield
    for r in await purse_vs_journal(db_dsn):
        assert r["balance_fen"] == r["journal"], dict(r)


def pairs(answers: list[dict]) -> list[tuple[str, str | None]]:
    return [(a["result"], a["reason"]) for a in answers]


# ------------------------------------------------------------------ offline verdicts


async def test_a_record_with_purse_seq_0_is_before_issuance_and_never_posted(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/transit.md: "the unwrapped purse_seq is < 1" is malformed / purse_seq_before_issuance; the
    first debit of a card is purse_seq 1. (Mutant `ext < 1` -> `ext < 0` posts it as a late gap fill.)"""
    c, _ = await funded(svc, 1000)
    chip = PurseCard(c["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=1000, purse_seq=65535)
    rec = debit(chip, tid(svc), 180)
    assert rec.purse_seq == 0
    assert pairs(await upload(svc, [rec])) == [("malformed", "purse_seq_before_issuance")]
    assert await svc.balance(c["card_no"]) == 1000
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE kind = 5") == 0
    row = await db.fetchrow("SELECT purse_seq, posted, result FROM offline_record")
    assert (row["purse_seq"], row["posted"], row["result"]) == (0, False, "malformed")


async def test_a_record_older_than_the_window_but_within_the_clock_skew_is_malformed(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """`txn_time_too_old` is "older than UPLOAD_AGE_S_MAX" by the server clock: the clock skew widens the
    future side only. (Mutant: `< now - MAX - skew` posts a record up to a skew older.)"""
    c, chip = await funded(svc, 1000)
    half_skew = svc.settings.clock_skew_s // 2
    assert half_skew >= 60
    rec = debit(chip, tid(svc), 180, txn_time=int(time.time()) - limits.UPLOAD_AGE_S_MAX - half_skew)
    assert pairs(await upload(svc, [rec])) == [("malformed", "txn_time_too_old")]
    assert await svc.balance(c["card_no"]) == 1000


async def test_an_unknown_cards_record_at_an_unknown_line_is_malformed_first(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Verdict precedence: malformed (unknown_line) comes before card_unknown, also for a card that is not
    ours; the refusal is kept with that verdict. (Mutant: the card looked up before the place.)"""
    t = tid(svc)
    stranger = PurseCard(new_card_numbers()[1], master_key=svc.keys.card_tac_master, balance_fen=500)
    rec = debit(stranger, t, 120, place={"line_id": "bus-999"})
    assert pairs(await upload(svc, [rec])) == [("malformed", "unknown_line")]
    assert await refusals(db, t) == [(rec.terminal_seq, None, "malformed", "unknown_line", 120)]


# ------------------------------------------------------------------ replaced cards


async def test_two_records_of_a_replaced_card_in_one_batch_see_what_the_first_carried_over(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Two debits of the old chip, made before the replacement, uploaded together after it: the second is
    judged against what the chip holds after the first (the old purse plus the moved money, less the
    first debit carried over), so both are accepted. (Mutant: `moved_fen += amount` flags the second
    balance_mismatch, and its answer row shows a wrong chip balance.)"""
    c, chip = await funded(svc, 1000)
    t = tid(svc)
    before = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    recs = [debit(chip, t, 180, hotlist_version=before), debit(chip, t, 200, hotlist_version=before)]
    body = replacement_body()
    assert (await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})).status == 200
    assert pairs(await upload(svc, recs)) == [("accepted", None), ("accepted", None)]
    assert (await svc.balance(c["card_no"]), await svc.balance(body["new_card_no"])) == (0, 620)
    chip_balances = await db.fetch(
        "SELECT balance_fen FROM terminal_txn WHERE terminal_id = $1 ORDER BY terminal_seq", t
    )
    assert [r["balance_fen"] for r in chip_balances] == [820, 620]


# ------------------------------------------------------------------ idempotency keys are per terminal


async def test_the_same_terminal_seq_at_another_terminal_is_another_record(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The key is (terminal_id, terminal_seq): another terminal's answer, ledger row or refusal under the
    same terminal_seq is no answer for this one. (Mutants: terminal_id dropped from the terminal_txn, the
    card-ledger or the refusal lookup: the genuine records are refused `terminal_seq_reused`, never
    posted, and the operator is not paid for debits the chip made.)"""
    c, chip = await funded(svc, 1000)
    t, other = tid(svc), tid(svc, OTHER)
    n = 7_000_000 + int(time.time()) % 100_000
    now = int(time.time())
    first = chip.debit(100, other, n, now - 300, **BUS)
    assert pairs(await upload(svc, [first], as_=OTHER)) == [("accepted", None)]
    stranger = PurseCard(new_card_numbers()[1], master_key=svc.keys.card_tac_master, balance_fen=500)
    assert pairs(await upload(svc, [stranger.debit(50, other, n + 1, now - 290, **BUS)], as_=OTHER)) == [
        ("card_unknown", "card_not_known")
    ]
    mine = [chip.debit(180, t, n, now - 200, **BUS), chip.debit(200, t, n + 1, now - 100, **BUS)]
    assert pairs(await upload(svc, mine)) == [("accepted", None), ("accepted", None)]
    assert await svc.balance(c["card_no"]) == 1000 - 100 - 180 - 200
    # and after the terminals' answers are pruned, the ledgers still tell the keys apart
    await db.execute("DELETE FROM terminal_txn")
    assert [(a["result"], a["replayed_answer"]) for a in await upload(svc, mine)] == [("accepted", True)] * 2


# ------------------------------------------------------------------ locking


async def test_a_top_up_committed_while_an_upload_waits_for_the_purse_is_not_lost(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The upload locks the purses before it reads them (docs/transit.md "Storage and idempotency"): a
    top-up holding the purse lock commits first, and the upload judges and writes on the new balance.
    (Mutant: no FOR UPDATE: the upload reads the old balance, answers `accepted` and its write overwrites
    the top-up: the purse no longer equals its journal.)"""
    c, chip = await funded(svc, 1000)
    rec = debit(chip, tid(svc), 180)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    async with svc.app[SERVICES].pool.acquire() as office, office.transaction():
        await office.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card_id)
        pending = asyncio.create_task(upload(svc, [rec]))
        await until_lock_waits(db)
        await office.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, source)
               VALUES ($1, 3, 'office-test', 1, 500, 1, now(), 'topup:cash', 4)""",
            card_id,
        )
        await office.execute("UPDATE purse SET balance_fen = balance_fen + 500 WHERE card_id = $1", card_id)
    [answer] = await pending
    # The chip did not see the top-up: its balance_before (1000) differs from the shadow (1500): flagged.
    assert (answer["result"], answer["reason"]) == ("balance_mismatch", "balance_before_differs"), answer
    assert await svc.balance(c["card_no"]) == 1500 - 180


async def test_a_posted_record_names_its_journal_transfer_in_the_ledger_and_the_answer(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """offline_record keeps "the journal `txn_id`" of each posted record (docs/transit.md), the link from
    the card's ledger to the money; a 0-fen record has none. (Mutant: the ledger's join to the journal rows
    lost: every posted record's txn_id is NULL.)"""
    _c, chip = await funded(svc, 1000)
    t = tid(svc)
    recs = [
        debit(chip, t, 180),
        debit(chip, t, 0, place={"line_id": "L1", "station_id": "l1-chaotianmen", "direction": "in"}),
    ]
    assert pairs(await upload(svc, recs)) == [("accepted", None)] * 2
    rows = await db.fetch(
        """SELECT o.terminal_seq, o.txn_id AS ledger_txn, t.txn_id AS answer_txn, j.txn_id AS journal_txn
           FROM offline_record o
           JOIN terminal_txn t ON t.terminal_id = o.terminal_id AND t.terminal_seq = o.terminal_seq
           LEFT JOIN txn_journal j ON j.terminal_id = o.terminal_id AND j.terminal_seq = o.terminal_seq AND j.kind = 5
           ORDER BY o.terminal_seq"""
    )
    assert rows[0]["journal_txn"] is not None
    assert [(r["ledger_txn"], r["answer_txn"]) for r in rows] == [
        (rows[0]["journal_txn"], rows[0]["journal_txn"]), (None, None)
    ]


async def test_a_clones_record_in_the_same_batch_is_a_conflict(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """Two records of one card under the same purse_seq in one batch (a cloned chip at the same validator):
    the batch sees its own first posting, the second is `conflict` / purse_seq_posted_differently.
    (Mutant: the in-memory `posted` not updated: the second is judged a late gap fill and the write
    meets the (card, purse_seq) unique index: the upload fails with 503 every time.)"""
    c, chip = await funded(svc, 1000)
    clone = PurseCard(c["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=1000)
    t = tid(svc)
    original, cloned = debit(chip, t, 180), debit(clone, t, 200)
    assert original.purse_seq == cloned.purse_seq == 1
    assert pairs(await upload(svc, [original, cloned])) == [("accepted", None), ("conflict", "purse_seq_posted_differently")]
    assert await svc.balance(c["card_no"]) == 820


# ------------------------------------------------------------------ online taps


async def test_two_taps_under_one_key_with_different_payloads_in_one_batch(svc: ServiceHarness) -> None:
    """Within a batch the second item with an already-seen key is a retry only if its request hash is the
    same; another payload (here another card) is `conflict` / idempotency_conflict. (Mutant: every repeat
    is a replay: card B's tap is answered `approved` with card A's fare and balance, and never charged.)"""
    from cardsvc.transit import fares
    from cardsvc.transit.taps import TapItem, process_taps
    from tests.transit.test_taps import funded_card

    a, b = await funded_card(svc, 1000), await funded_card(svc, 1000)
    services = svc.app[SERVICES]
    now = int(time.time())
    key = (tid(svc), 8_000_000 + now % 100_000)
    items = [
        TapItem(*key, bytes([1]) * 32, fares.Tap(now, "bus", "bus-105"), card_sn=a["card_sn"]),
        TapItem(*key, bytes([2]) * 32, fares.Tap(now, "bus", "bus-105"), card_sn=b["card_sn"]),
    ]
    first, second = await process_taps(services.pool, services.transit.table, items)
    assert first.result == "approved" and not first.replayed_answer
    assert (second.result, second.reason, second.fare_fen, second.replayed_answer) == (
        "conflict", "idempotency_conflict", 0, False
    )  # its own first answer, not a stored one
    assert (await svc.balance(a["card_no"]), await svc.balance(b["card_no"])) == (1000 - first.fare_fen, 1000)


async def test_a_card_expiring_today_is_still_charged(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """A card is valid through its expiry date (local time). (Mutant `expires_on > today`: declined
    card_unusable on its last day.)"""
    from cardsvc import localtime
    from tests.transit.test_taps import funded_card, tap, tap_body

    c = await funded_card(svc, 1000)
    today = localtime.local_date(dt.datetime.now(dt.UTC))
    await db.execute("UPDATE card SET expires_on = $2 WHERE card_no = $1", c["card_no"], today)
    ans = await tap(svc, tap_body(svc, c["card_sn"]))
    # The tap engine reads its own clock: it may find the card expired only if local midnight passed after
    # `today` was read (read again once answered).
    if ans["result"] == "approved" or localtime.local_date(dt.datetime.now(dt.UTC)) == today:
        assert (ans["result"], ans["reason"]) == ("approved", None), ans
        assert await svc.balance(c["card_no"]) == 1000 - ans["fare_fen"]
    else:
        assert (ans["result"], ans["reason"]) == ("declined", "card_unusable"), ans
        assert await svc.balance(c["card_no"]) == 1000


async def test_a_card_with_its_application_locked_is_not_charged(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """docs/api.md: `lock-app` — "a locked card is not usable": its tap is declined card_unusable, nothing
    moves. (Mutant: `app_locked` left out of `usable`: the tap is approved and charged.)"""
    from tests.transit.test_taps import funded_card, tap, tap_body

    c = await funded_card(svc, 1000)
    r = await svc.post(f"/v1/cards/{c['card_no']}/lock-app", {"operator": "staff-1"})
    assert r.status == 200, r.body
    ans = await tap(svc, tap_body(svc, c["card_sn"]))
    assert (ans["result"], ans["reason"]) == ("declined", "card_unusable"), ans
    assert await svc.balance(c["card_no"]) == 1000


async def test_the_answer_of_a_tap_with_a_penalty_names_the_fare_row(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """A tap-in after a missing tap-out writes a penalty row and a fare row under one key; its answer's
    txn_id (and terminal_txn.txn_id) is the fare row's (kind 1). (Mutant: the join's `kind = 1` dropped:
    the answer may name the penalty row.)"""
    from tests.transit.test_taps import funded_card, metro, tap, tap_body

    c = await funded_card(svc, 2000)
    await tap(svc, tap_body(svc, c["card_sn"], **metro("l1-chaotianmen", "in")))
    ans = await tap(svc, tap_body(svc, c["card_sn"], **metro("l1-daping", "in")))
    assert ans["result"] == "approved" and "penalty" in ans, ans
    rows = await db.fetch(
        "SELECT kind, txn_id FROM txn_journal WHERE card_id = $1 AND terminal_seq = $2 ORDER BY kind",
        c["card_id"], await db.fetchval("SELECT max(terminal_seq) FROM terminal_txn WHERE card_id = $1", c["card_id"]),
    )
    assert sorted(r["kind"] for r in rows) == [1, 2]
    fare_txn = next(r["txn_id"] for r in rows if r["kind"] == 1)
    assert ans["txn_id"] == fare_txn
    assert await db.fetchval("SELECT txn_id FROM terminal_txn WHERE txn_id IS NOT NULL ORDER BY txn_id DESC LIMIT 1") == fare_txn


# ------------------------------------------------------------------ the journey sweep


async def _entered(svc: ServiceHarness, db: asyncpg.Connection, amount_fen: int) -> tuple[dict, int]:
    from tests.transit.test_taps import funded_card, metro, tap, tap_body

    c = await funded_card(svc, amount_fen)
    ans = await tap(svc, tap_body(svc, c["card_sn"], **metro("l1-chaotianmen", "in")))
    assert ans["result"] == "approved", ans
    at = await db.fetchval("SELECT at FROM txn_journal WHERE card_id = $1 AND kind = 1 AND amount_fen = 0", c["card_id"])
    return c, int(at.timestamp())


async def test_an_entry_exactly_at_the_watermark_is_swept(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """The sweep reads the entries from the last watermark on (`j.at >= swept_to`): an entry at that very
    instant is in the next window. (Mutant `j.at > $2`: it falls between two windows and is never swept.)"""
    from cardsvc.transit.sweep import sweep_timed_out_journeys

    table = svc.app[SERVICES].transit.table
    c, entered = await _entered(svc, db, 2000)
    await db.execute(
        "INSERT INTO journey_sweep (swept_to) VALUES (to_timestamp($1)) ON CONFLICT (one) DO UPDATE SET swept_to = EXCLUDED.swept_to",
        float(entered),
    )
    now = dt.datetime.fromtimestamp(entered + table.rules.journey_timeout_s + 60, dt.UTC)
    done = await sweep_timed_out_journeys(svc.app[SERVICES].pool, table, 0, now=now)
    assert (done.closed, done.charged_fen) == (1, table.cap_fen), done
    assert await svc.balance(c["card_no"]) == 2000 - table.cap_fen


async def test_a_purse_that_can_pay_exactly_the_maximum_fare_is_swept(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """A purse is left unpaid only when the charge would take it below the overdraft (0 by default):
    one holding exactly the maximum fare pays it and ends at 0. (Mutant `<=`: counted unpaid, left open.)"""
    from cardsvc.transit.sweep import sweep_timed_out_journeys

    table = svc.app[SERVICES].transit.table
    c, entered = await _entered(svc, db, table.cap_fen)
    now = dt.datetime.fromtimestamp(entered + table.rules.journey_timeout_s + 60, dt.UTC)
    done = await sweep_timed_out_journeys(svc.app[SERVICES].pool, table, svc.settings.purse_overdraft_fen, now=now)
    assert (done.closed, done.unpaid) == (1, 0), done
    assert await svc.balance(c["card_no"]) == 0


async def test_a_replacement_swept_after_the_sweep_fell_behind(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """The sweep looks at the new cards of the replacements made since its window began (`status_changed_at
    >= swept_to`). A sweep behind by hours whose first window holds a replacement charges the journey the
    new card took over. (Mutant: compared with the window's end: the replacement is missed for good.)"""
    from cardsvc.transit.sweep import sweep_timed_out_journeys

    table = svc.app[SERVICES].transit.table
    c, entered = await _entered(svc, db, 2000)
    body = replacement_body()
    assert (await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})).status == 200
    replaced_at = await db.fetchval("SELECT status_changed_at FROM card WHERE card_no = $1", c["card_no"])
    await db.execute(
        "INSERT INTO journey_sweep (swept_to) VALUES ($1) ON CONFLICT (one) DO UPDATE SET swept_to = EXCLUDED.swept_to",
        replaced_at - dt.timedelta(minutes=1),
    )
    now = dt.datetime.fromtimestamp(entered + table.rules.journey_timeout_s + 3600, dt.UTC)
    done = await sweep_timed_out_journeys(svc.app[SERVICES].pool, table, 0, now=now)
    assert (done.closed, done.charged_fen) == (1, table.cap_fen), done
    assert await svc.balance(body["new_card_no"]) == 2000 - table.cap_fen


# ------------------------------------------------------------------ the audit


async def _audit(svc: ServiceHarness, db: asyncpg.Connection) -> dict[str, object]:
    from cardsvc import audit

    _, checks = await audit.run_audit(db, svc.settings, svc.app[SERVICES].transit.table)
    return {ch.name: ch for ch in checks}


async def test_the_audit_pairs_replacement_transfers_by_amount(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """replacement_transfers: "each with its pair" — the pair moves the same amount the other way. Three
    transfers that net to zero but whose pairs disagree on amounts moved money between purses wrongly.
    (Mutant: the amount left out of the pairing: the audit passes.)"""
    from tests.transit.test_taps import funded_card

    a, b, c = [await funded_card(svc, 1000) for _ in range(3)]

    async def post(card: int, other: int, amount: int) -> None:
        await db.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty, source)
               VALUES ($1, 7, 'test', $2, $3, 1, now(), 'replacement', 4)""",
            card, other, amount,
        )
        await db.execute("UPDATE purse SET balance_fen = balance_fen + $2 WHERE card_id = $1", card, amount)

    assert (await _audit(svc, db))["replacement_transfers"].ok
    await post(a["card_id"], b["card_id"], -300)
    await post(b["card_id"], a["card_id"], 200)  # B got 200 of A's 300
    await post(a["card_id"], c["card_id"], -100)
    await post(c["card_id"], a["card_id"], 200)  # and C 200 of A's 100: nets to zero
    check = (await _audit(svc, db))["replacement_transfers"]
    assert not check.ok and check.counts["unpaired"] >= 1, check


async def test_the_audit_finds_a_tap_without_its_terminal_answer_when_another_terminal_used_its_seq(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """terminal_txn_journal: a fare row of the tap engine must have the answer of its own terminal and key.
    (Mutant: matched on terminal_seq alone: another terminal's answer under the same seq hides the loss.)"""
    from tests.transit.test_taps import funded_card, tap, tap_body

    a, b = await funded_card(svc, 1000), await funded_card(svc, 1000)
    seq = 9_000_000 + int(time.time()) % 100_000
    assert (await tap(svc, tap_body(svc, a["card_sn"], seq=seq)))["result"] == "approved"
    assert (await tap(svc, tap_body(svc, b["card_sn"], seq=seq), as_=OTHER))["result"] == "approved"
    assert (await _audit(svc, db))["terminal_txn_journal"].ok
    await db.execute("DELETE FROM terminal_txn WHERE terminal_id = $1 AND terminal_seq = $2", tid(svc), seq)
    check = (await _audit(svc, db))["terminal_txn_journal"]
    assert not check.ok and check.counts["journal_without_txn"] == 1, check


async def test_the_sweep_rereads_the_journey_under_the_purse_lock(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """docs/transit.md: the journey is "re-read under the lock and closed only if it is still open". A
    writer holding the purse lock that ends the journey (as a tap-out does) and commits while the sweep
    waits leaves the sweep nothing to charge. (Mutant: the sweep's purse read without FOR UPDATE: it
    charges the maximum fare on a stale read and writes the stale journey back.)"""
    from cardsvc.transit import fares
    from cardsvc.transit.sweep import sweep_timed_out_journeys

    table = svc.app[SERVICES].transit.table
    c, entered = await _entered(svc, db, 2000)
    now = dt.datetime.fromtimestamp(entered + table.rules.journey_timeout_s + 60, dt.UTC)
    async with svc.app[SERVICES].pool.acquire() as rider, rider.transaction():
        raw = await rider.fetchval("SELECT journey FROM purse WHERE card_id = $1 FOR UPDATE", c["card_id"])
        state = fares.JourneyState.from_dict(raw)
        assert state.journey is not None
        sweeping = asyncio.create_task(sweep_timed_out_journeys(svc.app[SERVICES].pool, table, 0, now=now))
        await until_lock_waits(db)
        ended = dataclasses.replace(state, journey=None).to_dict()
        await rider.execute("UPDATE purse SET journey = $2 WHERE card_id = $1", c["card_id"], ended)
    done = await sweeping
    assert (done.closed, done.charged_fen) == (0, 0), done
    assert await svc.balance(c["card_no"]) == 2000
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE card_id = $1 AND source = 5", c["card_id"]) == 0


async def test_the_audit_finds_a_hotlist_version_moved_past_the_head(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """hotlist_versions: entries are versions 1..head with no gap. An entry moved past the head keeps the
    count equal to the head but leaves a gap validators (and the offline verdicts) read across.
    (Mutant: only the count compared: the audit passes.)"""
    from tests.transit.test_taps import funded_card

    for _ in range(2):
        c = await funded_card(svc, 0)
        assert (await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {"operator": "staff-1"})).status == 200
    assert (await _audit(svc, db))["hotlist_versions"].ok
    head = await db.fetchval("SELECT version FROM hotlist_head")
    await db.execute("UPDATE hotlist_entry SET version = $1 + 1 WHERE version = 1", head)
    assert not (await _audit(svc, db))["hotlist_versions"].ok


async def test_a_key_reused_by_another_card_after_its_answer_is_pruned_is_judged_on_that_cards_ledger(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/transit.md "Storage and idempotency": `terminal_seq_reused` lasts as long as the terminal's
    answers (within them the record is refused: test_offline). After they are pruned, another card's record
    under the key is posted when its card's ledger accepts it (the chip paid it), and both records keep
    their own verdicts when uploaded again."""
    (cx, chip_x), (cy, chip_y) = await funded(svc, 1000), await funded(svc, 1000)
    t = tid(svc)
    x = debit(chip_x, t, 180)
    assert pairs(await upload(svc, [x])) == [("accepted", None)]
    await db.execute("DELETE FROM terminal_txn WHERE terminal_id = $1", t)  # the 7-day pruning
    y = chip_y.debit(200, t, x.terminal_seq, int(time.time()) - 30, **BUS)  # a validator reset reused the key
    assert pairs(await upload(svc, [y])) == [("accepted", None)]
    again = [*await upload(svc, [x]), *await upload(svc, [y])]  # one key: not in one batch
    assert [(a["result"], a["replayed_answer"]) for a in again] == [("accepted", True), ("accepted", True)]
    assert (await svc.balance(cx["card_no"]), await svc.balance(cy["card_no"])) == (820, 800)
    assert await refusals(db, t) == []
    assert all(check.ok for check in (await _audit(svc, db)).values())  # type: ignore[attr-defined]
