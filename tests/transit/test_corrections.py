"""Fare corrections (POST /v1/purses/{card_no}/fare-corrections): a fare given back credits the purse and
debits the operator through clearing file version 2; the corrections of one fare never exceed it, even
sent concurrently; a retry never gives back twice; a refused request changes nothing; `cardsvc audit`
checks the correction ledger and fails when it is broken.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cardsvc.audit import run_audit
from cardsvc.config import Settings
from cardsvc.transit import clearing, fares
from cardsvc.transit.taps import KIND_CORRECTION
from protocols import clearing as wire
from protocols.card import CardStatus
from tests.helpers import ServiceHarness, replacement_body
from tests.transit.test_rides import gate_record as ride_record
from tests.transit.test_rides import rider
from tests.transit.test_rides import upload as upload_rides
from tests.transit.test_taps import funded_card, ledger_holds, metro, tap, tap_body  # noqa: F401 (fixture)

TABLE = fares.load_demo_table()
_seq = iter(range(5_000_000, 6_000_000))


def fix_body(
    txn_id: int, amount: int, *, seq: int | None = None, reason: str = "late_entry"
) -> dict[str, Any]:
    return {"terminal_seq": next(_seq) if seq is None else seq, "txn_id": txn_id, "amount_fen": amount,
            "reason": reason, "operator": "clerk-7"}  # fmt: skip


async def metro_fare(svc: ServiceHarness, card_sn: str) -> dict[str, Any]:
    """A metro journey Chaotianmen → Shapingba: its exit's answer (fare and txn_id)."""
    now = int(time.time())
    entry = await tap(svc, tap_body(svc, card_sn, at=now - 120, **metro("l1-chaotianmen", "in")))
    assert entry["result"] == "approved" and entry["fare_fen"] == 0, entry
    out = await tap(svc, tap_body(svc, card_sn, at=now - 30, **metro("l1-shapingba", "out")))
    assert out["result"] == "approved" and out["fare_fen"] > 100 and not out.get("penalty"), out
    return out


async def balance(db: asyncpg.Connection, card_id: int) -> int:
    value: int = await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id)
    return value


async def audit(db: asyncpg.Connection, settings: Settings) -> dict[str, Any]:
    _, checks = await run_audit(db, settings, TABLE)
    return {c.name: c for c in checks}


async def counted(svc: ServiceHarness) -> dict[tuple[str, str], float]:
    """The fare-correction counters as /metrics shows them: (sample name, reason) -> value."""
    r = await svc.request("GET", "/metrics", sign=False)
    assert r.status == 200
    return {
        (s.name, s.labels["reason"]): s.value
        for family in text_string_to_metric_families(r.body)
        for s in family.samples
        if s.name.startswith("cardsvc_transit_fare_corrections_") and s.name.endswith("_total")
    }


# ------------------------------------------------------------------ the money


async def test_a_fare_given_back_in_parts_credits_the_purse_and_debits_the_operator(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    c = await funded_card(svc, 2000)
    fare = await metro_fare(svc, c["card_sn"])
    fee, path = fare["fare_fen"], f"/v1/purses/{c['card_no']}/fare-corrections"
    before = await balance(db, c["card_id"])
    seen = await counted(svc)

    first = await svc.post(path, fix_body(fare["txn_id"], 100))
    assert first.status == 200, first.body
    assert first.body["balance_fen"] == before + 100 == await balance(db, c["card_id"])
    assert (first.body["corrects_txn_id"], first.body["amount_fen"], first.body["reason"]) == (
        fare["txn_id"], 100, "late_entry",
    )  # fmt: skip
    rest = await svc.post(path, fix_body(fare["txn_id"], fee - 100, reason="fare_error"))
    assert rest.status == 200 and rest.body["balance_fen"] == before + fee, rest.body
    over = await svc.post(path, fix_body(fare["txn_id"], 1))
    assert over.status == 409 and over.body["code"] == "correction_exceeds_fare", over.body
    assert (over.body["fare_fen"], over.body["given_back_fen"], over.body["left_fen"]) == (fee, fee, 0)
    now_seen = await counted(svc)
    for name, reason, step in (("cardsvc_transit_fare_corrections_total", "late_entry", 1),
                               ("cardsvc_transit_fare_corrections_fen_total", "late_entry", 100),
                               ("cardsvc_transit_fare_corrections_fen_total", "fare_error", fee - 100)):  # fmt: skip
        assert now_seen[(name, reason)] == seen.get((name, reason), 0) + step, (name, reason)

    rows = await db.fetch(
        "SELECT kind, amount_fen, counterparty, line_id, station_id FROM txn_journal WHERE card_id = $1 AND kind = $2",
        c["card_id"], KIND_CORRECTION,
    )  # fmt: skip
    exit_row = await db.fetchrow(
        "SELECT counterparty, line_id, station_id FROM txn_journal WHERE txn_id = $1", fare["txn_id"]
    )
    assert sorted(r["amount_fen"] for r in rows) == sorted([100, fee - 100])
    assert {(r["counterparty"], r["line_id"], r["station_id"]) for r in rows} == {tuple(exit_row)}
    assert exit_row["counterparty"] == "cq-metro"
    staff = await db.fetch(
        "SELECT staff, reason FROM fare_correction WHERE card_id = $1 ORDER BY txn_id", c["card_id"]
    )
    assert [tuple(r) for r in staff] == [("clerk-7", "late_entry"), ("clerk-7", "fare_error")]
    history = (await svc.get(f"/v1/purses/{c['card_no']}", as_="ops")).body["history"]
    assert [h["amount_fen"] for h in history if h["kind"] == KIND_CORRECTION] == [fee - 100, 100]

    checks = await audit(db, settings)
    assert all(ch.ok for ch in checks.values()), [ch.line() for ch in checks.values() if not ch.ok]
    assert checks["fare_corrections"].counts["corrections"] == 2
    assert checks["fare_corrections"].counts["journal_fen"] == fee


async def test_concurrent_corrections_of_one_fare_never_exceed_it(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Eight clerks give back 60 fen of one fare at once: exactly floor(fare / 60) are approved."""
    c = await funded_card(svc, 2000)
    fare = await metro_fare(svc, c["card_sn"])
    before = await balance(db, c["card_id"])
    path = f"/v1/purses/{c['card_no']}/fare-corrections"
    answers = await asyncio.gather(*(svc.post(path, fix_body(fare["txn_id"], 60)) for _ in range(8)))
    approved = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status != 200]
    assert len(approved) == min(8, fare["fare_fen"] // 60), [a.body for a in answers]
    assert all(a.body["code"] == "correction_exceeds_fare" for a in refused)
    assert await balance(db, c["card_id"]) == before + 60 * len(approved)
    given = await db.fetchval(
        "SELECT sum(amount_fen) FROM fare_correction WHERE corrects_txn_id = $1", fare["txn_id"]
    )
    assert given == 60 * len(approved) <= fare["fare_fen"]


async def test_a_retried_correction_gives_back_once(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await funded_card(svc, 2000)
    fare = await metro_fare(svc, c["card_sn"])
    before = await balance(db, c["card_id"])
    path = f"/v1/purses/{c['card_no']}/fare-corrections"
    body = fix_body(fare["txn_id"], 50, reason="terminal_fault")
    answers = await asyncio.gather(*(svc.post(path, body) for _ in range(5)))
    assert all(a.status == 200 for a in answers), [a.body for a in answers]
    assert sorted(a.body["replayed_answer"] for a in answers) == [False, True, True, True, True]
    assert len({a.body["txn_id"] for a in answers}) == 1
    assert {a.body["balance_fen"] for a in answers} == {before + 50} and await balance(
        db, c["card_id"]
    ) == before + 50
    # The key is the card office's: a top-up or another correction under it is a conflict, not a credit.
    other = await svc.post(path, body | {"amount_fen": 51})
    topup = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": body["terminal_seq"], "amount_fen": 50, "channel": "cash"},
    )
    assert other.body["code"] == topup.body["code"] == "idempotency_conflict"
    # Answered from the permanent key store once terminal_txn's copy is pruned.
    await db.execute("DELETE FROM terminal_txn WHERE terminal_seq = $1", body["terminal_seq"])
    late = await svc.post(path, body)
    assert late.status == 200 and late.body == answers[0].body | {"replayed_answer": True}
    assert await balance(db, c["card_id"]) == before + 50


async def test_what_cannot_be_given_back_is_refused_and_changes_nothing(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 2000)
    other = await funded_card(svc, 2000)
    fare = await metro_fare(svc, c["card_sn"])
    theirs = await metro_fare(svc, other["card_sn"])
    path = f"/v1/purses/{c['card_no']}/fare-corrections"
    ok = await svc.post(path, fix_body(fare["txn_id"], 10))
    assert ok.status == 200
    topup_txn = await db.fetchval(
        "SELECT min(txn_id) FROM txn_journal WHERE card_id = $1 AND kind = 3", c["card_id"]
    )
    entry_txn = await db.fetchval(  # the metro entry: a journal row that moved no money
        "SELECT min(txn_id) FROM txn_journal WHERE card_id = $1 AND kind = 1 AND amount_fen = 0", c["card_id"]
    )
    state = (await balance(db, c["card_id"]), await db.fetchval("SELECT count(*) FROM fare_correction"),
             await db.fetchval("SELECT count(*) FROM txn_journal"))  # fmt: skip
    cases: list[tuple[str, dict[str, Any], str, int]] = [
        ("card_office", fix_body(topup_txn, 10), "fare_not_correctable", 409),
        ("card_office", fix_body(ok.body["txn_id"], 10), "fare_not_correctable", 409),  # a correction
        ("card_office", fix_body(theirs["txn_id"], 10), "not_found", 404),  # another card's fare
        ("card_office", fix_body(2**62, 10), "not_found", 404),
        ("card_office", fix_body(fare["txn_id"], 0), "invalid_field", 400),
        ("card_office", fix_body(fare["txn_id"], 10, reason="refund"), "invalid_field", 400),
        ("card_office", {k: v for k, v in fix_body(fare["txn_id"], 10).items() if k != "operator"},
         "missing_field", 400),
        ("bank_channel", fix_body(fare["txn_id"], 10), "forbidden_operation", 403),
        ("transit_validator", fix_body(fare["txn_id"], 10), "forbidden_operation", 403),
    ]  # fmt: skip
    assert entry_txn is not None
    cases.append(("card_office", fix_body(entry_txn, 10), "fare_not_correctable", 409))
    for as_, body, code, status in cases:
        r = await svc.post(path, body, as_=as_)
        assert (r.status, r.body["code"]) == (status, code), (body, r.body)
    assert (
        await svc.post("/v1/purses/ZZZZZZZZ9/fare-corrections", fix_body(fare["txn_id"], 10))
    ).status == 404
    after = (await balance(db, c["card_id"]), await db.fetchval("SELECT count(*) FROM fare_correction"),
             await db.fetchval("SELECT count(*) FROM txn_journal"))  # fmt: skip
    assert after == state


async def fare_then_replaced(
    svc: ServiceHarness, db: asyncpg.Connection
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """A funded card's metro fare, then the card lost and replaced: the card, the fare's answer and the
    replacement's card_id (which now holds the purse)."""
    c = await funded_card(svc, 2000)
    fare = await metro_fare(svc, c["card_sn"])
    for op in ("temporary-loss", "formal-loss"):
        assert (await svc.post(f"/v1/cards/{c['card_no']}/{op}", {"operator": "s-1"})).status == 200
    body = replacement_body()
    assert (await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "s-1"})).status == 200
    new_id: int = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", body["new_card_no"])
    return c, fare, new_id


async def test_a_replaced_cards_fare_is_given_back_on_the_card_that_replaced_it(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    c, fare, new_id = await fare_then_replaced(svc, db)
    moved = await balance(db, new_id)
    assert moved == 2000 - fare["fare_fen"] and await balance(db, c["card_id"]) == 0

    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(fare["txn_id"], 120))
    assert r.status == 200, r.body
    assert r.body["balance_fen"] == moved + 120 == await balance(db, new_id)
    assert await balance(db, c["card_id"]) == 0
    checks = await audit(db, settings)
    assert all(ch.ok for ch in checks.values()), [ch.line() for ch in checks.values() if not ch.ok]
    assert checks["replacement_transfers"].counts["transfer_rows"] == 4


async def test_a_replacement_cancelled_since_takes_no_correction_beyond_its_debt(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A's fare, A replaced by B, B cancelled since: the credit would land on a dead card and is refused;
    nothing moves."""
    c, fare, new_id = await fare_then_replaced(svc, db)
    await db.execute("UPDATE card SET status = $2 WHERE card_id = $1", new_id, int(CardStatus.CANCELLED))
    state = (
        await balance(db, c["card_id"]),
        await balance(db, new_id),
        await db.fetchval("SELECT count(*) FROM txn_journal"),
    )
    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(fare["txn_id"], 10))
    assert r.status == 422 and r.body["code"] == "card_unusable" and r.body["card_status"] == "cancelled", (
        r.body
    )
    after = (
        await balance(db, c["card_id"]),
        await balance(db, new_id),
        await db.fetchval("SELECT count(*) FROM txn_journal"),
    )
    assert after == state


async def test_a_cancelled_card_takes_a_correction_only_to_settle_its_debt(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await funded_card(svc, 500)
    fare = await metro_fare(svc, c["card_sn"])
    # Cancelled at the desk with its balance left on it (a cancel normally pays it out first).
    await db.execute(
        "UPDATE card SET status = $2 WHERE card_id = $1", c["card_id"], int(CardStatus.CANCELLED)
    )
    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(fare["txn_id"], 10))
    assert r.status == 422 and r.body["code"] == "card_unusable" and r.body["card_status"] == "cancelled"


# ------------------------------------------------------------------ clearing


async def test_clearing_lists_a_correction_in_the_day_it_was_made_as_file_version_2(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    """Yesterday's fare is in yesterday's file (version 1); today's correction of it in today's
    (version 2), which debits the operator; re-running either day changes nothing."""
    c = await funded_card(svc, 2000)
    fare = await metro_fare(svc, c["card_sn"])
    # The fare becomes yesterday's (as if ridden and written then): moved a day back, ride and posting.
    await db.execute(
        "UPDATE txn_journal SET at = at - interval '1 day', posted_at = posted_at - interval '1 day' WHERE card_id = $1",
        c["card_id"],
    )
    posted = await db.fetchval("SELECT posted_at FROM txn_journal WHERE txn_id = $1", fare["txn_id"])
    yesterday = fares.local_day(TABLE, int(posted.timestamp()))
    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(fare["txn_id"], 150))
    assert r.status == 200, r.body
    written = await db.fetchval("SELECT posted_at FROM txn_journal WHERE txn_id = $1", r.body["txn_id"])
    today = fares.local_day(TABLE, int(written.timestamp()))
    assert today == yesterday + dt.timedelta(days=1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)

    [old] = await clearing.clear_day(db, TABLE, yesterday, tmp_path, operator_id="cq-metro", now=later)
    [new] = await clearing.clear_day(db, TABLE, today, tmp_path, operator_id="cq-metro", now=later)
    assert old.status == new.status == "created"
    assert old.path is not None and new.path is not None
    h1, lines1 = clearing.read_back(old.path)
    h2, lines2 = clearing.read_back(new.path)
    assert h1.version == 1 and [ln.txn_id for ln in lines1] == [fare["txn_id"]]
    assert (h2.version, h2.record_count, h2.correction_count, h2.correction_fen) == (2, 0, 1, 150)
    assert h2.net_fen == -150 and (new.correction_count, new.correction_fen) == (1, 150)
    [line] = lines2
    assert isinstance(line, wire.ClearingCorrection)
    assert (line.txn_id, line.corrects_txn_id, line.amount_fen, line.reason, line.source, line.card_id) == (
        r.body["txn_id"], fare["txn_id"], 150, wire.CorrectionReason.LATE_ENTRY, wire.ClearingSource.PURSE,
        c["card_id"],
    )  # fmt: skip
    assert (
        (line.line_id, line.station_id) == (lines1[0].line_id, lines1[0].station_id) == ("L1", "l1-shapingba")
    )
    report = await svc.get(f"/v1/clearing/cq-metro/{today.isoformat()}", as_="ops")
    assert (report.body["correction_count"], report.body["correction_fen"], report.body["net_fen"]) == (
        1,
        150,
        -150,
    )

    data = new.path.read_bytes()
    assert wire.write_clearing_file(h2, lines2) == data  # streamed by the run = the protocol's writer
    [again] = await clearing.clear_day(db, TABLE, today, tmp_path, operator_id="cq-metro", now=later)
    assert again.status == "unchanged" and new.path.read_bytes() == data
    checks = await audit(db, settings)
    assert checks["clearing_reports"].ok and checks["fare_corrections"].ok
    # A report whose corrections no longer match the journal fails the audit.
    await db.execute("UPDATE clearing_report SET correction_fen = 149 WHERE business_date = $1", today)
    assert not (await audit(db, settings))["clearing_reports"].ok


# ------------------------------------------------------------------ the audit


@pytest.mark.parametrize(
    "breakage",
    ["amount_changed", "row_deleted", "journal_only", "over_the_fare", "another_operator", "source_flipped"],
)
async def test_the_audit_fails_when_the_correction_ledger_is_broken(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings, breakage: str
) -> None:
    c = await funded_card(svc, 2000)
    fare = await metro_fare(svc, c["card_sn"])
    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(fare["txn_id"], 100))
    assert r.status == 200
    assert (await audit(db, settings))["fare_corrections"].ok
    txn = r.body["txn_id"]
    # The table is append-only (migration 0023): an edit is refused, unless by the table's owner turning the
    # trigger off first, which the audit must then catch.
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute("UPDATE fare_correction SET amount_fen = 99 WHERE txn_id = $1", txn)
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute("DELETE FROM fare_correction WHERE txn_id = $1", txn)
    await db.execute("ALTER TABLE fare_correction DISABLE TRIGGER fare_correction_append_only")
    if breakage == "amount_changed":
        await db.execute("UPDATE fare_correction SET amount_fen = 99 WHERE txn_id = $1", txn)
    elif breakage == "row_deleted":
        await db.execute("DELETE FROM fare_correction WHERE txn_id = $1", txn)
    elif breakage == "journal_only":  # a credit booked as a correction in the journal alone
        await db.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, line_id, source)
               VALUES ($1, $2, 'office', 1, 5, 1, now(), 'cq-metro', 'L1', 4)""",
            c["card_id"], KIND_CORRECTION,
        )  # fmt: skip
        await db.execute("UPDATE purse SET balance_fen = balance_fen + 5 WHERE card_id = $1", c["card_id"])
    elif breakage == "over_the_fare":  # the journal and table agree, but together exceed the fare
        extra = fare["fare_fen"]
        txn2 = await db.fetchval(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, line_id, source)
               VALUES ($1, $2, 'office', 2, $3, 1, now(), 'cq-metro', 'L1', 4) RETURNING txn_id""",
            c["card_id"], KIND_CORRECTION, extra,
        )  # fmt: skip
        await db.execute(
            """INSERT INTO fare_correction (txn_id, card_id, corrects_txn_id, amount_fen, reason, fare_ridecode,
                                            terminal_id, terminal_seq, staff)
               VALUES ($1, $2, $3, $4, 'goodwill', false, 'office', 2, 'x')""",
            txn2, c["card_id"], fare["txn_id"], extra,
        )  # fmt: skip
        await db.execute(
            "UPDATE purse SET balance_fen = balance_fen + $2 WHERE card_id = $1", c["card_id"], extra
        )
    elif breakage == "source_flipped":  # its clearing line would say ridecode for a card tap's fare
        await db.execute("UPDATE fare_correction SET fare_ridecode = true WHERE txn_id = $1", txn)
    else:  # the correction debits an operator the fare did not pay
        await db.execute("UPDATE txn_journal SET counterparty = 'cq-bus' WHERE txn_id = $1", txn)
    check = (await audit(db, settings))["fare_corrections"]
    assert not check.ok and check.detail, check
    assert check.samples == (c["card_id"],) or breakage in ("journal_only", "row_deleted")


async def test_a_ride_code_charge_is_given_back_as_ridecode_and_a_dead_card_only_settles_its_debt(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, settings: Settings
) -> None:
    """A post-paid ride-code ride took the purse below zero; the card was cancelled since. A correction may
    pay the debt back (to 0), no further; its clearing line is labelled `ridecode` like the ride's."""
    c, phone, _ = await rider(svc, amount_fen=1)
    at = int(time.time()) - 30
    [ride] = await upload_rides(svc, [ride_record(svc, phone.next_code(at), at)])
    assert ride["result"] == "approved" and ride["balance_fen"] == 1 - ride["fare_fen"] < 0, ride
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    await db.execute("UPDATE card SET status = $2 WHERE card_id = $1", card_id, int(CardStatus.CANCELLED))
    path = f"/v1/purses/{c['card_no']}/fare-corrections"
    debt = -ride["balance_fen"]
    settle = await svc.post(path, fix_body(ride["txn_id"], debt, reason="terminal_fault"))
    assert settle.status == 200 and settle.body["balance_fen"] == 0, settle.body
    beyond = await svc.post(path, fix_body(ride["txn_id"], 1, reason="terminal_fault"))
    assert beyond.status == 422 and beyond.body["code"] == "card_unusable", beyond.body

    posted = await db.fetchval("SELECT posted_at FROM txn_journal WHERE txn_id = $1", settle.body["txn_id"])
    day = fares.local_day(TABLE, int(posted.timestamp()))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    [bus] = await clearing.clear_day(db, TABLE, day, tmp_path, operator_id="cq-bus", now=later)
    assert bus.path is not None and bus.status == "created"
    header, lines = clearing.read_back(bus.path)
    assert header.version == 2 and header.correction_fen == debt
    fix = next(ln for ln in lines if isinstance(ln, wire.ClearingCorrection))
    fare_line = next(ln for ln in lines if ln.txn_id == ride["txn_id"])
    assert fix.source == fare_line.source == wire.ClearingSource.RIDE_CODE
    assert (fix.corrects_txn_id, fix.amount_fen, fix.reason) == (
        ride["txn_id"],
        debt,
        wire.CorrectionReason.TERMINAL_FAULT,
    )
    assert (await audit(db, settings))["fare_corrections"].ok  # the ridecode label agrees with the ride


# ------------------------------------------------------------------ finding the fare


async def test_the_purse_history_pages_back_to_the_first_row(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The office finds an old fare by paging the purse's history: pages of `limit` rows, newest first,
    that together are the whole journal of the card in (ride time, txn_id) order, rows of the same
    instant included, each once; the last page says so."""
    c = await funded_card(svc, 2000)
    for i in range(12):
        await tap(svc, tap_body(svc, c["card_sn"], at=int(time.time()) - 200 + i))
    # Three rows written at one instant (a batch): the cursor's txn_id tie-break keeps them apart.
    at = await db.fetchval("SELECT max(at) FROM txn_journal WHERE card_id = $1", c["card_id"])
    for seq in (1, 2, 3):
        await db.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, source)
               VALUES ($1, 3, 'office', $2, 1, 1, $3::timestamptz - interval '1 second', 'topup:cash', 4)""",
            c["card_id"], 900 + seq, at,
        )  # fmt: skip
    await db.execute("UPDATE purse SET balance_fen = balance_fen + 3 WHERE card_id = $1", c["card_id"])
    want = [r["txn_id"] for r in await db.fetch(
        "SELECT txn_id FROM txn_journal WHERE card_id = $1 ORDER BY at DESC, txn_id DESC", c["card_id"]
    )]  # fmt: skip
    assert len(want) == 16
    got: list[int] = []
    pages = 0
    query = "?limit=5"
    while True:
        r = await svc.get(f"/v1/purses/{c['card_no']}{query}", as_="ops")
        assert r.status == 200, r.body
        pages += 1
        got += [h["txn_id"] for h in r.body["history"]]
        if r.body["next_before"] is None:
            break
        query = f"?limit=5&before={r.body['next_before']}"
    assert got == want and pages == 4
    first = await svc.get(f"/v1/purses/{c['card_no']}", as_="ops")
    assert [h["txn_id"] for h in first.body["history"]] == want[:16] and first.body["next_before"] is None
    # A txn id past the bigint range (19 digits can be) reached the query and was answered 500.
    assert (await svc.get(f"/v1/purses/{c['card_no']}?before=1.9223372036854775807", as_="ops")).status == 200
    for bad in ("?before=1", "?before=a.b", "?before=1.2.3", "?limit=0", "?limit=abc", "?before=1.9999999999999999999"):
        r = await svc.get(f"/v1/purses/{c['card_no']}{bad}", as_="ops")
        assert (r.status, r.body["code"]) == (400, "invalid_parameter"), (bad, r.body)
