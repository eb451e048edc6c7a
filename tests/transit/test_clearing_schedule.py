"""The nightly clearing run (`cardsvc clearing run` without --date, docs/operations.md "Daily clearing") and
its gauge at the edges: an operator never cleared, a first day refused, days owed before the first run
that worked, a day finished one operator at a time, the gauge going back with several workers, a day
failing on a write error."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from cardsvc import limits
from cardsvc.transit import clearing
from tests.helpers import ServiceHarness
from tests.transit.test_clearing_audit import (  # noqa: F401
    TABLE,
    _reversal,
    cleared_through,
    days_from,
    days_over_since,
    local_today,
    run_cli,
)

ROOT = Path(__file__).resolve().parents[2]


def _end(day: dt.date) -> float:
    return clearing.business_day_bounds(TABLE, day)[1].timestamp()


async def _fare(db: asyncpg.Connection, day: dt.date, counterparty: str, seq: int, amount: int = -180) -> None:
    """An approved offline bus fare written in `day` (its clearing day)."""
    at = clearing.business_day_bounds(TABLE, day)[0] + dt.timedelta(hours=9, seconds=seq)
    await db.execute(
        """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                    counterparty, line_id, source, posted_at)
           VALUES (1, 5, 'rv', $1, $2, 1, $3, $4, 'bus-105', 2, $3)""",
        seq, amount, at, counterparty,
    )  # fmt: skip


async def _last(db: asyncpg.Connection) -> dt.date:
    return clearing.last_day_over(TABLE, await db.fetchval("SELECT clock_timestamp()"))


async def _report_days(db: asyncpg.Connection, op: str) -> set[dt.date]:
    return {r[0] for r in await db.fetch("SELECT business_date FROM clearing_report WHERE operator_id = $1", op)}


# ------------------------------------------------------------------ 1. an operator never cleared


async def test_a_refused_first_day_of_an_operator_never_cleared_is_tried_again(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A new operator's first day refused (a reversal row) is tried again once the row is handled: an
    operator never cleared starts with the day of its first fare, not with yesterday."""
    day = local_today() - dt.timedelta(days=10)
    at = clearing.business_day_bounds(TABLE, day)[1] + dt.timedelta(seconds=limits.CLEARING_MARGIN_S)
    await _fare(db, day, "cq-bus", 10)
    await _reversal(db, day)
    assert (await clearing.days_to_clear(db, TABLE, now=at)).todo == [(day, ["cq-bus"])]  # cq-metro: no fare yet
    got = {r.operator_id: r.status for r in await clearing.clear_day(db, TABLE, day, tmp_path, now=at)}
    assert got == {"cq-bus": "refused", "cq-metro": "created"}
    await db.execute("DELETE FROM txn_journal WHERE amount_fen > 0")  # the reversal handled by hand
    todo = (await clearing.days_to_clear(db, TABLE, now=at + dt.timedelta(days=1))).todo
    assert (day, ["cq-bus"]) in todo, f"the refused day {day} of cq-bus is never cleared again: {todo}"


async def test_days_owed_before_the_first_successful_run_are_cleared_or_keep_the_alert(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, run_cli: Any  # noqa: F811
) -> None:
    """A new deployment whose first nights failed (a role without pg_read_all_stats): the gauge shows the
    operator behind since its first fare's day, and the next run that works clears every day since, so the
    alert resolves only when nothing owed is left."""
    last = await _last(db)
    days = [last - dt.timedelta(days=k) for k in (2, 1, 0)]
    for k, d in enumerate(days):
        await _fare(db, d, "cq-bus", 20 + k)
    assert (await cleared_through(svc))["cq-bus"] == clearing.business_day_bounds(TABLE, days[0])[0].timestamp()
    res = await run_cli("clearing", "run", "--out", str(tmp_path / "out"), "--json")
    assert res.status == 0, res.err
    # Every day owed through the last day over by the run's own clock read: `last`, or the next day too
    # should the clearing cut-off have passed since `last` was read (read again now).
    owed = [set(days_from(days[0], ran_to)) for ran_to in await days_over_since(db, last)]
    gauge = (await cleared_through(svc))["cq-bus"]
    cleared = await _report_days(db, "cq-bus")
    assert cleared in owed or gauge <= clearing.business_day_bounds(TABLE, days[0])[0].timestamp(), (
        f"cq-bus cleared {sorted(cleared)} only (fares on {days}); the gauge says cleared through "
        f"{dt.datetime.fromtimestamp(gauge, dt.UTC)}: the alert resolved"
    )


# ------------------------------------------------------------------ 2. per-operator days lose NOT_CLEARED


async def test_a_day_finished_per_operator_still_shows_its_not_cleared_counterparties(
    db: asyncpg.Connection, tmp_path: Path, run_cli: Any  # noqa: F811
) -> None:
    """A day finished one operator at a time (cq-metro by hand, cq-bus by the nightly run) still shows the
    debits of hotlisted:cq-bus as not cleared, as a run for every operator does."""
    last = await _last(db)
    await _fare(db, last, "hotlisted:cq-bus", 30)
    await _fare(db, last, "cq-bus", 31)
    out = str(tmp_path / "out")
    by_hand = await run_cli("clearing", "run", "--date", last.isoformat(), "--operator", "cq-metro", "--out", out, "--json")
    assert by_hand.status == 0 and "hotlisted" not in by_hand.out
    nightly = await run_cli("clearing", "run", "--out", out, "--json")
    assert nightly.status == 0, nightly.err
    got = {(r["operator_id"], r["status"]) for r in nightly.json}
    assert ("hotlisted:cq-bus", "not_cleared") in got, f"no run showed the hotlisted debits: {got}"


# ------------------------------------------------------------------ 3. the gauge across workers

_WORKER = """
import asyncio, sys
import asyncpg
from cardsvc import metrics
from cardsvc.transit import clearing, fares

async def main():
    conn = await asyncpg.connect(sys.argv[1])
    try:
        await clearing.refresh_cleared_through(conn, fares.load_demo_table())
    finally:
        await conn.close()

asyncio.run(main())
sys.stdout.write(metrics.render().decode())
"""


async def _scrape_in_a_worker(dsn: str, prom_dir: Path) -> dict[str, float]:
    """One `serve --workers N` worker answering a scrape: refresh, then render what every worker wrote."""
    from prometheus_client.parser import text_string_to_metric_families

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir), "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER, dsn, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return {
        s.labels["operator"]: s.value
        for f in text_string_to_metric_families(out.decode())
        for s in f.samples
        if s.name == "cardsvc_transit_clearing_cleared_through_timestamp_seconds"
    }


async def test_the_gauge_goes_back_when_a_day_is_no_longer_cleared_with_several_workers(
    db: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    """With several workers the gauge shows the latest read, not the highest: a report deleted to re-clear a
    day (docs/operations.md "A changed journal") takes the operator back, and the alert can fire."""
    last = await _last(db)
    d0, d1 = last - dt.timedelta(days=2), last - dt.timedelta(days=1)
    for d in (d0, d1, last):
        await clearing.clear_day(db, TABLE, d, tmp_path / "out")
    prom = tmp_path / "prom"
    prom.mkdir()
    assert (await _scrape_in_a_worker(db_dsn, prom))["cq-bus"] == _end(last)  # worker 1 answers a scrape
    await db.execute("DELETE FROM clearing_report WHERE operator_id = 'cq-bus' AND business_date = $1", d1)
    got = await _scrape_in_a_worker(db_dsn, prom)  # worker 2 answers the next one
    assert got["cq-bus"] == _end(d0), (
        f"cq-bus is cleared through {d0} only, /metrics says {dt.datetime.fromtimestamp(got['cq-bus'], dt.UTC)}"
    )


# ------------------------------------------------------------------ 4. read at most every 5 minutes


async def test_a_worker_reads_the_reports_for_the_gauge_at_most_every_five_minutes(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The query reads every report an operator has (years of them at a city): a scrape reads them when the
    worker's last read is older than CLEARED_THROUGH_MAX_AGE_S (reports change once a night)."""
    from prometheus_client.parser import text_string_to_metric_families

    last = await _last(db)
    await clearing.clear_day(db, TABLE, last - dt.timedelta(days=1), tmp_path)
    assert (await cleared_through(svc))["cq-bus"] == _end(last - dt.timedelta(days=1))  # read now
    await clearing.clear_day(db, TABLE, last, tmp_path)
    text = await (await svc.client.get("/metrics")).text()
    shown = {s.labels["operator"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "cardsvc_transit_clearing_cleared_through_timestamp_seconds"}  # fmt: skip
    assert shown["cq-bus"] == _end(last - dt.timedelta(days=1))  # not read again yet
    assert clearing.CLEARED_THROUGH_MAX_AGE_S == 300
    assert (await cleared_through(svc))["cq-bus"] == _end(last)


# ------------------------------------------------------------------ 5. a day failing otherwise


async def test_a_day_failing_on_a_write_error_fails_alone_and_json_stays_valid(
    db: asyncpg.Connection, tmp_path: Path, run_cli: Any  # noqa: F811
) -> None:
    """A day failing on a write error (here a directory where its .tmp file goes) fails alone, like a
    refused one: the days before it are cleared and printed, `--json` stays JSON, the run exits 1."""
    last = await _last(db)
    out = tmp_path / "out"
    await clearing.clear_day(db, TABLE, last - dt.timedelta(days=2), out)
    (out / (clearing.clearing_file_name("cq-bus", last) + ".tmp")).mkdir()
    res = await run_cli("clearing", "run", "--out", str(out), "--json")
    assert res.status == 1
    assert await db.fetchval("SELECT count(*) FROM clearing_report WHERE business_date = $1", last - dt.timedelta(days=1)) == 2
    try:
        printed = {(r["operator_id"], r["business_date"], r["status"]) for r in res.json}
    except orjson.JSONDecodeError:
        raise AssertionError(f"--json printed {res.out!r}; stderr {res.err!r}") from None
    prev = (last - dt.timedelta(days=1)).isoformat()
    assert {("cq-bus", prev, "created"), ("cq-metro", prev, "created")} <= printed


async def test_a_file_that_cannot_be_put_in_place_leaves_no_report_and_its_day_is_cleared_again(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A day's report is what says the day is cleared, so it must not exist without its file. When the
    file could not be put in place (here a directory where it goes; a full disk, a crash between the two),
    the report stayed committed: the nightly run never tried that day again and the operator never got
    the file. And the run left the other operators' half-done files behind."""
    day = await _last(db) - dt.timedelta(days=1)
    await _fare(db, day, "cq-bus", 30)
    out = tmp_path / "out"
    blocker = out / clearing.clearing_file_name("cq-bus", day)
    blocker.mkdir(parents=True)
    with pytest.raises(OSError):
        await clearing.clear_day(db, TABLE, day, out)
    assert day not in await _report_days(db, "cq-bus")
    assert not list(out.glob("*.tmp")), list(out.iterdir())

    blocker.rmdir()
    todo = (await clearing.days_to_clear(db, TABLE)).todo
    assert any(d == day and "cq-bus" in ops for d, ops in todo), todo
    got = {r.operator_id: r.status for r in await clearing.clear_day(db, TABLE, day, out)}
    assert got["cq-bus"] == "created", got
    header, lines = clearing.read_back(blocker)
    assert (header.record_count, header.total_fen, [ln.amount_fen for ln in lines]) == (1, 180, [180])


async def test_a_day_failing_while_its_files_are_written_leaves_no_temporary_file(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """One operator's file cannot be written (a directory where it goes): the operators written before
    it in the run leave no `.tmp` behind either, and no report."""
    day = await _last(db) - dt.timedelta(days=1)
    await _fare(db, day, "cq-bus", 40)
    await _fare(db, day, "cq-metro", 41)
    out = tmp_path / "out"
    (out / (clearing.clearing_file_name("cq-metro", day) + ".tmp")).mkdir(parents=True)
    with pytest.raises(OSError):
        await clearing.clear_day(db, TABLE, day, out)
    assert [p.name for p in out.iterdir()] == [clearing.clearing_file_name("cq-metro", day) + ".tmp"]
    assert not await db.fetchval("SELECT count(*) FROM clearing_report WHERE business_date = $1", day)


async def _file_in_place_without_report(
    db: asyncpg.Connection, day: dt.date, out: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Clear `day` so that cq-bus's file is renamed into place and its report's commit fails (here the
    directory sync; a lost connection, a crash)."""
    real_sync = clearing._sync_dir

    def failing_sync(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(clearing, "_sync_dir", failing_sync)
    with pytest.raises(OSError):
        await clearing.clear_day(db, TABLE, day, out)
    monkeypatch.setattr(clearing, "_sync_dir", real_sync)
    assert day not in await _report_days(db, "cq-bus")
    return out / clearing.clearing_file_name("cq-bus", day)


async def _cleared_again(db: asyncpg.Connection, day: dt.date, out: Path) -> None:
    await asyncio.sleep(1.1)  # a later second: a fresh creation time would differ
    got = {r.operator_id: r.status for r in await clearing.clear_day(db, TABLE, day, out)}
    assert got["cq-bus"] == "created", got


async def test_a_file_in_place_whose_report_did_not_commit_is_written_again_with_the_same_bytes(
    db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file was renamed into place, then its report's commit failed. The operator may have taken that
    file already: the next run writes the same bytes, not a second version of the day with another
    creation time and digest."""
    day = await _last(db) - dt.timedelta(days=1)
    await _fare(db, day, "cq-bus", 50)
    path = await _file_in_place_without_report(db, day, tmp_path / "out", monkeypatch)
    first = path.read_bytes()
    await _cleared_again(db, day, tmp_path / "out")
    assert path.read_bytes() == first


async def test_a_file_taken_before_its_report_failed_to_commit_is_sent_again_with_the_same_bytes(
    db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, and the operator's transfer job moved the file away before the next run: nothing is left
    in place to take the creation time from, yet the operator must not get a second version of the day
    with the same lines."""
    day = await _last(db) - dt.timedelta(days=1)
    await _fare(db, day, "cq-bus", 55)
    path = await _file_in_place_without_report(db, day, tmp_path / "out", monkeypatch)
    taken = path.rename(tmp_path / "taken")
    await _cleared_again(db, day, tmp_path / "out")
    assert path.read_bytes() == taken.read_bytes()
    assert not await db.fetchval("SELECT count(*) FROM clearing_pending")  # gone with the report's commit


async def test_a_file_in_place_that_the_journal_no_longer_says_becomes_a_new_version(
    db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same situation, and the journal was corrected before the next run with the count and total
    unchanged (a row's line rewritten): different lines must not go out under the first file's header
    and creation time, as if they were the same file."""
    day = await _last(db) - dt.timedelta(days=1)
    await _fare(db, day, "cq-bus", 60)
    await _fare(db, day, "cq-bus", 61, amount=-200)
    path = await _file_in_place_without_report(db, day, tmp_path / "out", monkeypatch)
    first = path.read_bytes()
    await db.execute("UPDATE txn_journal SET line_id = 'bus-111' WHERE terminal_id = 'rv' AND terminal_seq = 61")
    await _cleared_again(db, day, tmp_path / "out")
    second = path.read_bytes()
    assert second != first and second.split(b"\n")[0] != first.split(b"\n")[0]
    header, _ = clearing.read_back(path)
    assert header.created_at > int(first.split(b"\n")[0].split(b"|")[-1])


@pytest.mark.parametrize("created_at", [99_999_999_999, 2**32 - 1, 2**32 - 2, "in ten days"])
async def test_a_foreign_file_in_place_does_not_block_its_day(
    db: asyncpg.Connection, tmp_path: Path, created_at: int | str
) -> None:
    """A file where the day's file goes that no run of ours made (a header edited or made elsewhere, with a
    creation time out of range, at its end, or in the future) does not decide anything: the day is cleared
    with a valid file made now, not refused every night on that header nor dated after it."""
    day = await _last(db) - dt.timedelta(days=1)
    await _fare(db, day, "cq-bus", 80)
    path = tmp_path / "out" / clearing.clearing_file_name("cq-bus", day)
    path.parent.mkdir()
    when = int(time.time()) + 10 * 86400 if created_at == "in ten days" else created_at
    path.write_bytes(f"H|CARDSVC-CLEARING|1|cq-bus|{day:%Y%m%d}|1|180|{when}\nT|1|180|{'0' * 64}\n".encode())
    before = time.time()
    got = {r.operator_id: r.status for r in await clearing.clear_day(db, TABLE, day, tmp_path / "out")}
    assert got["cq-bus"] == "created", got
    header, lines = clearing.read_back(path)  # a valid file again
    assert int(before) <= header.created_at <= time.time() and [ln.amount_fen for ln in lines] == [180]
