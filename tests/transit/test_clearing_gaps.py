"""Clearing and its audit at the edges: days owed before one cleared by hand, a purse credited in a cleared
day, and the command's refusals of a bad --date or --operator."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import asyncpg

from cardsvc.transit import clearing
from tests.transit.test_clearing_audit import TABLE, run_cli  # noqa: F401
from tests.transit.test_clearing_schedule import _fare


async def test_days_with_fares_before_the_first_day_cleared_by_hand_are_still_cleared(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An operator's first fares three days before yesterday, never cleared (the first nights failed), then
    yesterday cleared by hand (`clearing run --date`): the nightly run clears the days in between, and the
    cleared-through gauge (CardsvcClearingBehind) stays at the first of them until they are cleared."""
    now = await db.fetchval("SELECT clock_timestamp()")
    last = clearing.last_day_over(TABLE, now)
    owed = [last - dt.timedelta(days=3 - k) for k in range(3)]
    for k, day in enumerate(owed):
        await _fare(db, day, "cq-bus", 10 + k)
    await clearing.clear_day(db, TABLE, last, tmp_path, operator_id="cq-bus")  # by hand
    due = await clearing.days_to_clear(db, TABLE, operator_id="cq-bus", now=now)
    assert due.todo == [(day, ["cq-bus"]) for day in owed]
    assert (await clearing._first_days_owed(db, TABLE, ["cq-bus"]))["cq-bus"] == owed[0]
    for day in due.days:
        [result] = await clearing.clear_day(db, TABLE, day, tmp_path, operator_id="cq-bus")
        assert (result.status, result.txn_count, result.total_fen) == ("created", 1, 180)
    assert (await clearing.days_to_clear(db, TABLE, operator_id="cq-bus", now=now)).todo == []
    assert (await clearing._first_days_owed(db, TABLE, ["cq-bus"]))["cq-bus"] == last + dt.timedelta(days=1)


async def test_a_purse_credit_written_into_a_cleared_day_fails_the_audit(
    svc: Any, db: asyncpg.Connection, tmp_path: Path, settings: Any
) -> None:
    """A fare row crediting a purse under an operator (a refund written as a fare, by hand or by a bug), in
    a day already cleared and paid: the purse got the money and the operator's file never takes it back.
    The clearing run refuses such a day when it is run again; the audit fails `clearing_reports` too,
    though the report's counts and totals still match the journal's fares."""
    from cardsvc import audit
    from tests.transit.test_clearing_audit import last_day_over, scenario_of

    day = await last_day_over(db)
    await scenario_of(svc, db, day)
    results = await clearing.clear_day(db, TABLE, day, tmp_path)
    assert {r.status for r in results} == {"created"}
    _, checks = await audit.run_audit(db, settings, TABLE)
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    # The purse and its journal stay equal: a credit booked as an offline fare (kind 5, +500) on a cleared day.
    row = await db.fetchrow(
        "SELECT card_id, posted_at FROM txn_journal WHERE kind = 1 AND counterparty = 'cq-bus' LIMIT 1"
    )
    async with db.transaction():
        await db.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, line_id, source, posted_at)
               VALUES ($1, 5, 'office-x', 1, 500, 1, $2, 'cq-bus', 'bus-105', 2, $2)""",
            row["card_id"], row["posted_at"],
        )  # fmt: skip
        await db.execute(
            "UPDATE purse SET balance_fen = balance_fen + 500 WHERE card_id = $1", row["card_id"]
        )
    again = {r.operator_id: r.status for r in await clearing.clear_day(db, TABLE, day, tmp_path)}
    assert again["cq-bus"] == "refused"  # the clearing run, re-run for that day, sees it
    _, checks = await audit.run_audit(db, settings, TABLE)
    failed = [c for c in checks if not c.ok]
    assert [c.name for c in failed] == ["clearing_reports"], [c.line() for c in checks]
    assert "1 row(s) crediting a purse" in failed[0].detail


async def test_clearing_run_with_an_out_of_range_date_exits_2_not_a_traceback(
    run_cli: Any,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """`cardsvc clearing run --date 0001-01-01` (a mistyped year) is a bad --date (exit 2), not an
    OverflowError; a far future day is a day not over yet (exit 1), like tomorrow."""
    res = await run_cli("clearing", "run", "--date", "0001-01-01", "--out", str(tmp_path / "out"))
    assert (res.status, res.err.strip()) == (2, "error: --date 0001-01-01 is out of range")
    res = await run_cli("clearing", "run", "--date", "9999-12-31", "--out", str(tmp_path / "out"))
    assert res.status == 1 and "is not over yet" in res.err, res


async def test_a_scheduled_run_for_an_unknown_operator_is_an_error_not_nothing_to_clear(
    db: asyncpg.Connection,
    run_cli: Any,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """`clearing run --operator cq-buss` (a typo) is refused ('no operator', exit 1) with --date and
    without it, where it used to say 'nothing to clear' and exit 0 while cq-bus had a day owed."""
    now = await db.fetchval("SELECT clock_timestamp()")
    last = clearing.last_day_over(TABLE, now)
    await _fare(db, last, "cq-bus", 1)
    with_date = await run_cli("clearing", "run", "--date", last.isoformat(), "--operator", "cq-buss",
                              "--out", str(tmp_path / "o1"))  # fmt: skip
    assert with_date.status == 1 and "no operator" in with_date.err
    nightly = await run_cli("clearing", "run", "--operator", "cq-buss", "--out", str(tmp_path / "o2"))
    assert nightly.status == 1, f"exit {nightly.status}: {nightly.err.strip()!r}"
    assert "no operator 'cq-buss'" in nightly.err and "nothing to clear" not in nightly.err
