"""A journey charged the maximum fare for a half that had not come (an exit without entry: `missing_tap_in`;
an entry without exit: `missing_tap_out`, by the sweep or the card's next tap) gets that charge back when
a gate uploads the missing half at last, within the journey timeout: the purse is credited the penalty
through a fare correction (reason late_entry or late_exit, the card office's ledger), and the ride is
charged its distance fare. Once only, whatever the retries, never more than what the card office left of
the penalty, and cleared as a correction line that debits the operator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cardsvc.config import Settings
from cardsvc.transit import clearing, fares
from cardsvc.transit.taps import KIND_CORRECTION, KIND_FARE, KIND_PENALTY, KIND_TRANSFER, SOURCE_RIDECODE
from protocols import clearing as wire
from tests.helpers import ServiceHarness, replacement_body
from tests.transit.test_corrections import audit, fix_body
from tests.transit.test_rides import (
    GATE_2,
    _sweep_after_timeout,
    _sweep_at,
    backdated_phone,
    gate_lets_through,
    gate_record,
    ledger_holds,  # noqa: F401 (fixture)
    rider,
    upload,
)

TABLE = fares.load_demo_table()
ENTRY, EXIT = "l1-chaotianmen", "l1-daping"
RIDE = fares.card_price_fen(fares.metro_fare_fen(TABLE, ENTRY, EXIT), TABLE.rules.card_discount_percent)


async def refunds_counted(svc: ServiceHarness) -> dict[str, float]:
    """The late refund counters as /metrics shows them: name[:reason] -> value."""
    r = await svc.request("GET", "/metrics", sign=False)
    assert r.status == 200
    return {
        s.name.removeprefix("cardsvc_transit_late_refunds_")
        + (":" + s.labels["reason"] if "reason" in s.labels else ""): s.value
        for family in text_string_to_metric_families(r.body)
        for s in family.samples
        if s.name.startswith("cardsvc_transit_late_refunds") and s.name.endswith("_total")
    }


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def entry_record(svc: ServiceHarness, phone: Any, at: int) -> Any:
    return gate_record(svc, phone.next_code(at), at, line_id="L1", station_id=ENTRY, direction="in")


def exit_record(svc: ServiceHarness, phone: Any, at: int) -> Any:
    return gate_record(
        svc, phone.next_code(at), at, gate=GATE_2, line_id="L1", station_id=EXIT, direction="out"
    )


async def charged_exit(svc: ServiceHarness) -> tuple[dict[str, Any], Any, int]:
    """A rider whose ride-code exit (at EXIT, 10 minutes ago) was uploaded without its entry and charged
    the maximum fare by the sweep; returns the card, its phone and the time of the exit."""
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 3600)
    exit_ = exit_record(svc, phone, now - 600)
    gate_lets_through(exit_.code_text, issuer, exit_.time)
    [out] = await upload(svc, [exit_], as_=GATE_2)
    assert out["rules"] == ["exit_held"], out
    assert (await _sweep_after_timeout(svc)).held_exits == 1
    assert await svc.balance(c["card_no"]) == 1000 - TABLE.cap_fen
    return c, phone, now - 600


async def test_the_entry_of_an_exit_charged_the_maximum_fare_gives_it_back_once(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    c, phone, exit_at = await charged_exit(svc)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    penalty = await db.fetchrow(
        # its clearing day is that of greatest(at, posted_at): the sweep dates it when it fell due, which
        # may be after local midnight
        "SELECT txn_id, greatest(at, posted_at) AS cleared_at FROM txn_journal WHERE card_id = $1 AND kind = $2",
        card_id, KIND_PENALTY,
    )  # fmt: skip
    seen = await refunds_counted(svc)
    entry = entry_record(svc, phone, exit_at - 1200)
    [in_] = await upload(svc, [entry], batch_id=2)
    assert in_["result"] == "approved" and in_["fare_fen"] == RIDE, in_
    assert in_["rules"][-2:] == ["late_upload", "entry_of_charged_exit"], in_
    assert in_["refund"] == {
        "amount_fen": TABLE.cap_fen,
        "reason": "late_entry",
        "corrects_txn_id": penalty["txn_id"],
    }
    # The rider pays the ride, not the maximum fare.
    assert in_["balance_fen"] == 1000 - RIDE == await svc.balance(c["card_no"])

    rows = await db.fetch(
        """SELECT kind, amount_fen, counterparty, line_id, station_id, source FROM txn_journal
           WHERE card_id = $1 AND kind = ANY($2::smallint[]) AND amount_fen <> 0 ORDER BY kind""",
        card_id, [KIND_FARE, KIND_CORRECTION],
    )  # fmt: skip
    assert [tuple(r) for r in rows] == [
        (KIND_FARE, -RIDE, "cq-metro", "L1", ENTRY, SOURCE_RIDECODE),
        (KIND_CORRECTION, TABLE.cap_fen, "cq-metro", "L1", EXIT, SOURCE_RIDECODE),
    ]
    fix = await db.fetchrow("SELECT * FROM fare_correction WHERE card_id = $1", card_id)
    assert (fix["corrects_txn_id"], fix["amount_fen"], fix["reason"], fix["staff"], fix["fare_ridecode"]) == (
        penalty["txn_id"], TABLE.cap_fen, "late_entry", "", False,
    )  # fmt: skip
    assert (fix["terminal_id"], fix["terminal_seq"]) == (entry.gate_id, entry.gate_seq)
    now_seen = await refunds_counted(svc)
    assert moved(seen, now_seen) == {"total:late_entry": 1, "fen_total:late_entry": TABLE.cap_fen}

    # A re-upload gets the same answer and gives nothing back again; nor can the card office.
    [again] = await upload(svc, [entry], batch_id=3)
    assert again == {**in_, "replayed_answer": True}
    assert await db.fetchval("SELECT count(*) FROM fare_correction WHERE card_id = $1", card_id) == 1
    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(penalty["txn_id"], 1))
    assert r.status == 409 and r.body["left_fen"] == 0, r.body
    assert await svc.balance(c["card_no"]) == 1000 - RIDE
    assert (await refunds_counted(svc)) == now_seen

    # The purse history shows the correction; the audit passes; the operator's file debits it.
    history = (await svc.get(f"/v1/purses/{c['card_no']}", as_="ops")).body["history"]
    assert [h["amount_fen"] for h in history if h["kind"] == KIND_CORRECTION] == [TABLE.cap_fen]
    checks = await audit(db, settings)
    assert all(ch.ok for ch in checks.values()), [ch.line() for ch in checks.values() if not ch.ok]
    assert checks["fare_corrections"].counts["corrections"] == 1
    written = await db.fetchval("SELECT posted_at FROM txn_journal WHERE card_id = $1 AND kind = $2", card_id,
                                KIND_CORRECTION)  # fmt: skip
    day = fares.local_day(TABLE, int(written.timestamp()))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    [result] = await clearing.clear_day(db, TABLE, day, tmp_path, operator_id="cq-metro", now=later)
    assert result.path is not None
    header, lines = clearing.read_back(result.path)
    [fixed] = [ln for ln in lines if isinstance(ln, wire.ClearingCorrection)]
    assert (fixed.corrects_txn_id, fixed.amount_fen, fixed.reason, fixed.station_id) == (
        penalty["txn_id"], TABLE.cap_fen, wire.CorrectionReason.LATE_ENTRY, EXIT,
    )  # fmt: skip
    ride = [ln for ln in lines if not isinstance(ln, wire.ClearingCorrection) and ln.card_id == card_id]
    assert sorted(ln.amount_fen for ln in ride if ln.amount_fen) == sorted(
        [RIDE]
        + ([TABLE.cap_fen] if fares.local_day(TABLE, int(penalty["cleared_at"].timestamp())) == day else [])
    )
    assert header.version == 2 and header.correction_fen >= TABLE.cap_fen


async def test_the_card_office_giving_part_back_first_leaves_only_the_rest(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    """The clerk gave 300 of the 700 back before the entry came: the entry gives back the 400 left, so the
    rider has paid exactly the ride."""
    c, phone, exit_at = await charged_exit(svc)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    penalty = await db.fetchval(
        "SELECT txn_id FROM txn_journal WHERE card_id = $1 AND kind = $2", card_id, KIND_PENALTY
    )
    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(penalty, 300))
    assert r.status == 200, r.body
    [in_] = await upload(svc, [entry_record(svc, phone, exit_at - 1200)], batch_id=2)
    assert in_["refund"]["amount_fen"] == TABLE.cap_fen - 300 and in_["fare_fen"] == RIDE, in_
    assert await svc.balance(c["card_no"]) == 1000 - RIDE
    given = await db.fetch(
        "SELECT amount_fen, staff FROM fare_correction WHERE card_id = $1 ORDER BY txn_id", card_id
    )
    assert [tuple(g) for g in given] == [(300, "clerk-7"), (TABLE.cap_fen - 300, "")]
    assert (await audit(db, settings))["fare_corrections"].ok


async def test_a_charge_the_cards_journal_does_not_show_is_not_given_back(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    """A card whose state remembers a charged exit the card's own journal does not show (charged to a card
    it replaced): its entry costs nothing more and gets nothing back, as before refunds existed."""
    c, phone, exit_at = await charged_exit(svc)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    # The penalty's station, as the state remembers it, becomes one the journal never charged here.
    raw = await db.fetchval("SELECT journey FROM purse WHERE card_id = $1", card_id)
    state = fares.JourneyState.from_dict(orjson.loads(raw) if isinstance(raw, str | bytes) else raw)
    [charged] = [u for u in state.unpaired if u.charged_fen]
    elsewhere = dataclasses.replace(state, unpaired=(dataclasses.replace(charged, station="l1-xiaoshizi"),))
    await db.execute("UPDATE purse SET journey = $2::jsonb WHERE card_id = $1", card_id, elsewhere.to_json())
    seen = await refunds_counted(svc)
    [in_] = await upload(svc, [entry_record(svc, phone, exit_at - 1200)], batch_id=2)
    assert (in_["result"], in_["fare_fen"], in_["rules"]) == ("approved", 0, ["entry_of_charged_exit"]), in_
    assert "refund" not in in_ and await svc.balance(c["card_no"]) == 1000 - TABLE.cap_fen
    assert await db.fetchval("SELECT count(*) FROM fare_correction") == 0
    assert moved(seen, await refunds_counted(svc)) == {"unmatched_total": 1}
    assert (await audit(db, settings))["fare_corrections"].ok


async def given_back_once(
    svc: ServiceHarness,
    db: asyncpg.Connection,
    card_no: str,
    card_id: int,
    out: dict[str, Any],
    penalty: int,
    seen: dict[str, float],
) -> asyncpg.Record:
    """The exit's answer `out` gave the whole `penalty` back (late_exit), the rider of a 1,000 fen purse paid
    only the ride, the counters moved by that one refund, and one fare_correction row of the card links them:
    that row."""
    assert out["refund"] == {"amount_fen": TABLE.cap_fen, "reason": "late_exit", "corrects_txn_id": penalty}
    assert out["balance_fen"] == 1000 - RIDE == await svc.balance(card_no)
    assert moved(seen, await refunds_counted(svc)) == {
        "total:late_exit": 1,
        "fen_total:late_exit": TABLE.cap_fen,
    }
    fix = await db.fetchrow(
        "SELECT corrects_txn_id, amount_fen, reason, terminal_seq FROM fare_correction WHERE card_id = $1", card_id
    )
    assert (fix["corrects_txn_id"], fix["amount_fen"], fix["reason"]) == (penalty, TABLE.cap_fen, "late_exit")
    return fix


async def test_the_exit_of_a_journey_the_sweep_charged_gives_it_back(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    """The exit gate was offline for longer than the journey timeout: the sweep charged the journey the
    maximum fare (missing_tap_out). The exit, uploaded at last with its ride time 20 minutes after the
    entry, gives that back (reason late_exit) and charges the ride."""
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 3600)
    entry = entry_record(svc, phone, now - 1800)
    exit_ = exit_record(svc, phone, now - 600)
    for rec in (entry, exit_):
        gate_lets_through(rec.code_text, issuer, rec.time)
    [in_] = await upload(svc, [entry])
    assert in_["rules"] == ["metro_entry"], in_
    swept = await _sweep_after_timeout(svc)
    assert (swept.closed, swept.charged_fen) == (1, TABLE.cap_fen)
    assert await svc.balance(c["card_no"]) == 1000 - TABLE.cap_fen
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    penalty = await db.fetchval(
        "SELECT txn_id FROM txn_journal WHERE card_id = $1 AND kind = $2", card_id, KIND_PENALTY
    )
    seen = await refunds_counted(svc)

    [out] = await upload(svc, [exit_], batch_id=2, as_=GATE_2)
    assert (out["result"], out["fare_fen"], out["rules"][-1]) == (
        "approved",
        RIDE,
        "exit_of_swept_journey",
    ), out
    await given_back_once(svc, db, c["card_no"], card_id, out, penalty, seen)
    row = await db.fetchrow("SELECT counterparty, station_id FROM txn_journal WHERE card_id = $1 AND kind = $2",
                            card_id, KIND_CORRECTION)  # fmt: skip
    assert tuple(row) == ("cq-metro", ENTRY)  # the penalty's: the journey's entry station
    # Nothing to sweep any more, and a duplicate of the exit from another upload costs nothing more.
    assert (await _sweep_after_timeout(svc)).charged_fen == 0
    [again] = await upload(svc, [exit_], batch_id=3, as_=GATE_2)
    assert again == {**out, "replayed_answer": True}
    checks = await audit(db, settings)
    assert all(ch.ok for ch in checks.values()), [ch.line() for ch in checks.values() if not ch.ok]


async def test_a_penalty_charged_earlier_in_the_same_batch_is_given_back(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    """A gate back online uploads its backlog in one batch: a rider's entry, their next entry 50 minutes
    later (which charges the first journey the maximum fare for want of its exit), then that journey's exit
    (a bidirectional gate). The penalty written by this very batch is given back, as it would be were the
    exit uploaded in a later batch, and the stored answer names the penalty's row."""
    c, _, issuer = await rider(svc)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 7200)
    first, second = entry_record(svc, phone, now - 5400), entry_record(svc, phone, now - 2400)
    exit_at = now - 4800
    exit_ = gate_record(svc, phone.next_code(exit_at), exit_at, line_id="L1", station_id=EXIT, direction="out")
    for rec in (first, second, exit_):
        gate_lets_through(rec.code_text, issuer, rec.time)
    seen = await refunds_counted(svc)

    answers = await upload(svc, [first, second, exit_])
    in1, in2, out = answers
    assert in1["rules"] == ["metro_entry"] and in1["fare_fen"] == 0, in1
    assert in2["penalty"] == {"amount_fen": TABLE.cap_fen, "reason": "missing_tap_out"}, in2
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    penalty = await db.fetchval(
        "SELECT txn_id FROM txn_journal WHERE card_id = $1 AND kind = $2", card_id, KIND_PENALTY
    )
    assert (out["result"], out["fare_fen"]) == ("approved", RIDE), out
    # The rider paid the first ride; the second journey is still open.
    fix = await given_back_once(svc, db, c["card_no"], card_id, out, penalty, seen)
    assert fix["terminal_seq"] == exit_.gate_seq
    # The re-upload gets the stored answers, the penalty's id included; nothing is given back again.
    again = await upload(svc, [first, second, exit_], batch_id=2)
    assert again == [{**a, "replayed_answer": True} for a in answers]
    assert await db.fetchval("SELECT count(*) FROM fare_correction WHERE card_id = $1", card_id) == 1
    checks = await audit(db, settings)
    assert all(ch.ok for ch in checks.values()), [ch.line() for ch in checks.values() if not ch.ok]


async def charged_then_replaced(
    svc: ServiceHarness, db: asyncpg.Connection
) -> tuple[dict[str, Any], Any, int, int, dict[str, str]]:
    """`charged_exit`, then the card lost and replaced: the old card, its phone, the exit's time, the
    penalty's txn_id (on the old card) and the replacement's numbers (its purse now holds the balance)."""
    c, phone, exit_at = await charged_exit(svc)
    old_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    penalty: int = await db.fetchval(
        "SELECT txn_id FROM txn_journal WHERE card_id = $1 AND kind = $2", old_id, KIND_PENALTY
    )
    for op in ("temporary-loss", "formal-loss"):
        assert (await svc.post(f"/v1/cards/{c['card_no']}/{op}", {"operator": "s-1"})).status == 200
    body = replacement_body()
    assert (await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "s-1"})).status == 200
    assert await svc.balance(body["new_card_no"]) == 1000 - TABLE.cap_fen
    return c, phone, exit_at, penalty, body


async def test_a_penalty_charged_to_the_card_this_one_replaced_is_given_back_on_the_new_card(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    """The exit was charged the maximum fare on the old card, which the holder then lost and had replaced
    (the purse and the journey state moved to the new card). The entry, uploaded at last, gives the penalty
    back: booked on the old card, whose journal holds the penalty, and carried to the new card's purse
    through the replacement account, as the card office's corrections are."""
    c, phone, exit_at, penalty, body = await charged_then_replaced(svc, db)
    old_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    new_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", body["new_card_no"])
    seen = await refunds_counted(svc)

    entry = entry_record(svc, phone, exit_at - 1200)
    [in_] = await upload(svc, [entry], batch_id=2)
    assert (in_["result"], in_["fare_fen"]) == ("approved", RIDE), in_
    assert in_["refund"] == {"amount_fen": TABLE.cap_fen, "reason": "late_entry", "corrects_txn_id": penalty}
    assert in_["balance_fen"] == 1000 - RIDE == await svc.balance(body["new_card_no"])
    assert await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", old_id) == 0
    rows = await db.fetch(
        """SELECT card_id, kind, amount_fen, counterparty, terminal_seq FROM txn_journal
           WHERE card_id = ANY($1::bigint[]) AND kind = ANY($2::smallint[]) AND terminal_id = $3
           ORDER BY txn_id""",
        [old_id, new_id], [KIND_CORRECTION, KIND_TRANSFER], entry.gate_id,
    )  # fmt: skip
    assert [tuple(r) for r in rows] == [
        (old_id, KIND_CORRECTION, TABLE.cap_fen, "cq-metro", entry.gate_seq),
        (old_id, KIND_TRANSFER, -TABLE.cap_fen, "replacement", new_id),
        (new_id, KIND_TRANSFER, TABLE.cap_fen, "replacement", old_id),
    ]
    fix = await db.fetchrow("SELECT card_id, corrects_txn_id, amount_fen, reason FROM fare_correction")
    assert tuple(fix) == (old_id, penalty, TABLE.cap_fen, "late_entry")
    assert moved(seen, await refunds_counted(svc)) == {
        "total:late_entry": 1,
        "fen_total:late_entry": TABLE.cap_fen,
    }
    [again] = await upload(svc, [entry], batch_id=3)
    assert again == {**in_, "replayed_answer": True}
    assert await db.fetchval("SELECT count(*) FROM fare_correction") == 1
    # The card office finds nothing left of it, on either card's number.
    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(penalty, 1))
    assert r.status == 409 and r.body["left_fen"] == 0, r.body
    checks = await audit(db, settings)
    assert all(ch.ok for ch in checks.values()), [ch.line() for ch in checks.values() if not ch.ok]
    assert checks["replacement_transfers"].counts["unpaired"] == 0


@pytest.mark.parametrize("office_delay_s", [0.0, 0.03, 0.1])
async def test_an_upload_racing_the_card_office_never_gives_the_penalty_back_twice(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings, office_delay_s: float
) -> None:
    """The clerk books the whole penalty back while the entry is being uploaded: whichever commits first
    gives it back, and the other gives nothing (both hold the purse's lock while they read what is left).
    The clerk's request starts a little later in some runs, so that each side wins in some."""
    c, phone, exit_at = await charged_exit(svc)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    penalty = await db.fetchval(
        "SELECT txn_id FROM txn_journal WHERE card_id = $1 AND kind = $2", card_id, KIND_PENALTY
    )

    async def clerk() -> Any:
        await asyncio.sleep(office_delay_s)
        return await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(penalty, TABLE.cap_fen))

    office, [in_] = await asyncio.gather(
        clerk(), upload(svc, [entry_record(svc, phone, exit_at - 1200)], batch_id=2)
    )
    given = await db.fetchval(
        "SELECT sum(amount_fen) FROM fare_correction WHERE corrects_txn_id = $1", penalty
    )
    assert given == TABLE.cap_fen
    if office.status == 200:  # the clerk first: the entry costs nothing more, gets nothing back
        assert "refund" not in in_ and in_["fare_fen"] == 0, in_
        assert await svc.balance(c["card_no"]) == 1000
    else:  # the upload first: the clerk is told nothing is left
        assert office.status == 409 and office.body["left_fen"] == 0, office.body
        assert in_["refund"]["amount_fen"] == TABLE.cap_fen and in_["fare_fen"] == RIDE, in_
        assert await svc.balance(c["card_no"]) == 1000 - RIDE
    assert (await audit(db, settings))["fare_corrections"].ok


@pytest.mark.parametrize("office_delay_s", [0.0, 0.03, 0.1])
async def test_an_upload_racing_the_card_office_on_a_replaced_card_never_gives_the_penalty_back_twice(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings, office_delay_s: float
) -> None:
    """As above, with the penalty on the card the new one replaced: the clerk's correction locks the old
    card's purse and then the new one's, the upload the new one's and then the old one's without waiting. No
    deadlock, and the penalty is given back once, by whichever gets the old card's purse first."""
    c, phone, exit_at, penalty, body = await charged_then_replaced(svc, db)

    async def clerk() -> Any:
        await asyncio.sleep(office_delay_s)
        return await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(penalty, TABLE.cap_fen))

    office, [in_] = await asyncio.gather(
        clerk(), upload(svc, [entry_record(svc, phone, exit_at - 1200)], batch_id=2)
    )
    given = await db.fetchval("SELECT sum(amount_fen) FROM fare_correction WHERE corrects_txn_id = $1", penalty)
    assert given == TABLE.cap_fen
    if office.status == 200:  # the clerk first (or holding the old purse): nothing more, nothing back
        assert "refund" not in in_ and in_["fare_fen"] == 0, in_
        assert await svc.balance(body["new_card_no"]) == 1000
    else:
        assert office.status == 409 and office.body["left_fen"] == 0, office.body
        assert in_["refund"]["amount_fen"] == TABLE.cap_fen and in_["fare_fen"] == RIDE, in_
        assert await svc.balance(body["new_card_no"]) == 1000 - RIDE
    checks = await audit(db, settings)
    assert all(ch.ok for ch in checks.values()), [ch.line() for ch in checks.values() if not ch.ok]


# ------------------------------------------------------------------ the right penalty, exactly

TIMEOUT = TABLE.rules.journey_timeout_s


def ride_at(svc: ServiceHarness, phone: Any, issuer: bytes, at: int, station: str, direction: str) -> Any:
    rec = gate_record(svc, phone.next_code(at), at, line_id="L1", station_id=station, direction=direction)
    gate_lets_through(rec.code_text, issuer, rec.time)
    return rec


def price(a: str, b: str, limit: int | None = None) -> int:
    full = fares.card_price_fen(fares.metro_fare_fen(TABLE, a, b), TABLE.rules.card_discount_percent)
    return full if limit is None else min(full, limit)


async def sweep_at(svc: ServiceHarness, at: int) -> None:
    await _sweep_at(svc, dt.datetime.fromtimestamp(at, dt.UTC))


async def corrections(db: asyncpg.Connection, card_id: int) -> list[tuple[int, int, str]]:
    """(penalty txn, fen, reason) of the card's corrections, in the order they were made."""
    rows = await db.fetch(
        "SELECT corrects_txn_id, amount_fen, reason FROM fare_correction WHERE card_id = $1 ORDER BY txn_id",
        card_id,
    )
    return [tuple(r) for r in rows]


async def penalties(db: asyncpg.Connection, card_id: int) -> list[tuple[int, int, str]]:
    """(txn, fen, station) of the card's penalties, in the order they were written."""
    rows = await db.fetch(
        "SELECT txn_id, -amount_fen, station_id FROM txn_journal WHERE card_id = $1 AND kind = $2 ORDER BY txn_id",
        card_id,
        KIND_PENALTY,
    )
    return [tuple(r) for r in rows]


async def test_a_displaced_exits_penalty_is_given_back_by_its_own_entry(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    """Journey 1 (A → C) was swept; the exit B of journey 2 (D → B) came first and was taken for journey 1's.
    Journey 1's real exit C, uploaded later, gives the sweep's penalty back and displaces B, charged the
    maximum fare at C's upload (dated hours before B); D, uploaded last, gives that back. Each journey costs
    its fare."""
    c, _, issuer = await rider(svc, 3000)
    e = int(time.time()) - 7 * 3600
    phone = await backdated_phone(svc, c["card_no"], e - 600)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    a, b, c_, d = "l1-chaotianmen", "l1-daping", "l1-xiaoshizi", "l1-shapingba"
    await upload(svc, [ride_at(svc, phone, issuer, e, a, "in")], batch_id=1)
    await sweep_at(svc, e + TIMEOUT + 60)
    [x_b] = await upload(svc, [ride_at(svc, phone, issuer, e + 5 * 3600, b, "out")], batch_id=2)
    assert (x_b["fare_fen"], x_b["rules"]) == (0, ["exit_of_swept_journey"]), x_b
    [x_c] = await upload(svc, [ride_at(svc, phone, issuer, e + 1800, c_, "out")], batch_id=3)
    assert x_c["refund"]["reason"] == "late_exit" and x_c["penalty"]["reason"] == "missing_tap_in", x_c
    [e_d] = await upload(svc, [ride_at(svc, phone, issuer, e + 4 * 3600 + 1800, d, "in")], batch_id=4)
    assert e_d["refund"]["reason"] == "late_entry", e_d
    swept, displaced = await penalties(db, card_id)
    assert (swept[2], displaced[2]) == (a, b)
    assert await corrections(db, card_id) == [(swept[0], 700, "late_exit"), (displaced[0], 700, "late_entry")]
    assert await svc.balance(c["card_no"]) == 3000 - price(a, c_) - price(d, b)
    assert (await audit(db, settings))["fare_corrections"].ok


async def test_a_penalty_the_office_gave_back_is_not_given_back_again_from_another(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    """Entry E1 at A is charged its missing exit by entry E2 at A an hour later; the office gives that
    back in full; the sweep charges E2's journey its own penalty at A. E1's exit, uploaded at last, finds
    its penalty given back already: nothing more, nothing back (not E2's penalty, which is E2's)."""
    c, _, issuer = await rider(svc, 3000)
    now = int(time.time())
    phone = await backdated_phone(svc, c["card_no"], now - 5 * 3600)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    e1, e2 = now - 3 * 3600, now - 2 * 3600
    await upload(svc, [ride_at(svc, phone, issuer, e1, ENTRY, "in")], batch_id=1)
    await upload(svc, [ride_at(svc, phone, issuer, e2, ENTRY, "in")], batch_id=2)
    [(p1, _, _)] = await penalties(db, card_id)
    r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(p1, 700, reason="late_exit"))
    assert r.status == 200, r.body
    await sweep_at(svc, e2 + TIMEOUT + 60)
    assert len(await penalties(db, card_id)) == 2
    before, seen = await svc.balance(c["card_no"]), await refunds_counted(svc)
    [x1] = await upload(svc, [ride_at(svc, phone, issuer, e1 + 1800, EXIT, "out")], batch_id=3)
    assert (x1["fare_fen"], x1["rules"], "refund" in x1) == (0, ["exit_of_charged_journey"], False), x1
    assert await svc.balance(c["card_no"]) == before
    assert moved(seen, await refunds_counted(svc)) == {"unmatched_total": 1}
    assert await corrections(db, card_id) == [(p1, 700, "late_exit")]
    # E2's exit still gets E2's penalty back.
    [x2] = await upload(svc, [ride_at(svc, phone, issuer, e2 + 1800, EXIT, "out")], batch_id=4)
    p2 = (await penalties(db, card_id))[1][0]
    assert x2["refund"] == {"amount_fen": 700, "reason": "late_exit", "corrects_txn_id": p2}, x2
    assert (await audit(db, settings))["fare_corrections"].ok


async def test_two_penalties_at_one_station_are_each_given_back_in_full(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings
) -> None:
    """Two journeys from A, each swept: the first on a ride code capped at 300 (its penalty 300), the second
    uncapped (700). Their exits, uploaded in the other order, each give back their own journey's penalty."""
    c, _, issuer = await rider(svc, 3000)
    e1 = int(time.time()) - 10 * 3600
    e2 = e1 + 5 * 3600
    capped = await backdated_phone(svc, c["card_no"], e1 - 600, max_fare_fen=300)
    phone = await backdated_phone(svc, c["card_no"], e1 - 600)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    await upload(svc, [ride_at(svc, capped, issuer, e1, ENTRY, "in")], batch_id=1)
    await sweep_at(svc, e1 + TIMEOUT + 60)
    await upload(svc, [ride_at(svc, phone, issuer, e2, ENTRY, "in")], batch_id=2)
    await sweep_at(svc, e2 + TIMEOUT + 60)
    (p1, fen1, _), (p2, fen2, _) = await penalties(db, card_id)
    assert (fen1, fen2) == (300, 700)
    [x2] = await upload(svc, [ride_at(svc, phone, issuer, e2 + 1800, EXIT, "out")], batch_id=3)
    [x1] = await upload(svc, [ride_at(svc, capped, issuer, e1 + 1800, EXIT, "out")], batch_id=4)
    assert (x2["refund"]["corrects_txn_id"], x1["refund"]["corrects_txn_id"]) == (p2, p1), (x2, x1)
    assert await corrections(db, card_id) == [(p2, 700, "late_exit"), (p1, 300, "late_exit")]
    assert await svc.balance(c["card_no"]) == 3000 - price(ENTRY, EXIT) - price(ENTRY, EXIT, 300)
    assert (await audit(db, settings))["fare_corrections"].ok


@pytest.mark.parametrize("office_first", [False, True])
async def test_two_penalties_alike_are_given_back_as_a_pool(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings, office_first: bool
) -> None:
    """One upload charges two penalties alike (journey A entered at X left open, and a held exit at X now
    due: same station, time and amount). Each half arriving later gives one back; if the card office gave
    one row back first, neither half gives the other row back on top (the money already returned is one
    of them, whichever the clerk meant)."""
    c, _, issuer = await rider(svc, 3000)
    e = int(time.time()) - 6 * 3600
    phone = await backdated_phone(svc, c["card_no"], e - 1200)
    card_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    x, y = EXIT, "l1-shapingba"
    [held] = await upload(svc, [ride_at(svc, phone, issuer, e, x, "out")], batch_id=1)
    assert held["rules"] == ["exit_held"], held
    await upload(svc, [ride_at(svc, phone, issuer, e + 100, x, "in")], batch_id=2)
    [both] = await upload(svc, [ride_at(svc, phone, issuer, e + TIMEOUT + 10, ENTRY, "in")], batch_id=3)
    assert both["penalty"]["amount_fen"] == 700 and len(both["held_exits_charged"]) == 1, both
    (p1, _, _), (p2, _, _) = await penalties(db, card_id)
    if office_first:
        r = await svc.post(f"/v1/purses/{c['card_no']}/fare-corrections", fix_body(p1, 700))
        assert r.status == 200, r.body
    [a_out] = await upload(svc, [ride_at(svc, phone, issuer, e + 1000, y, "out")], batch_id=4)
    [x_in] = await upload(svc, [ride_at(svc, phone, issuer, e - 600, ENTRY, "in")], batch_id=5)
    given = await db.fetchval("SELECT sum(amount_fen) FROM fare_correction WHERE card_id = $1", card_id)
    if office_first:
        assert "refund" not in a_out and "refund" not in x_in, (a_out, x_in)
        assert given == 700
    else:
        assert {a_out["refund"]["corrects_txn_id"], x_in["refund"]["corrects_txn_id"]} == {p1, p2}
        assert given == 1400
    assert (await audit(db, settings))["fare_corrections"].ok
