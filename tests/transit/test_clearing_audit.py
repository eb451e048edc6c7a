"""Daily clearing and `cardsvc audit` on a database that went through taps, top-ups, a replacement and
hotlist changes: the audit passes; each invariant broken on purpose makes its check fail and the command
exit non-zero; clearing files round-trip through protocols.clearing and their totals equal the journal.

The CLI runs in-process (cardsvc.cli.main in a worker thread, with its own event loop) against the test
database through CARDSVC_DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardsvc import cli, limits
from cardsvc.config import Settings
from cardsvc.http.keys import CLEARING_GAUGE_READ
from cardsvc.transit import clearing, fares
from protocols import clearing as wire
from protocols.transit import PurseCard
from tests.helpers import ServiceHarness, replacement_body
from tests.transit.test_offline import BUS, upload
from tests.transit.test_rides import gate_record as ride_record
from tests.transit.test_rides import rider
from tests.transit.test_rides import upload as upload_rides
from tests.transit.test_taps import funded_card, metro, tap, tap_body

TABLE = fares.load_demo_table()
KINDS = list(clearing.CLEARING_KINDS)


@dataclasses.dataclass
class Cli:
    status: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return orjson.loads(self.out)


@pytest.fixture
def run_cli(db_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.setenv("CARDSVC_DATABASE_URL", db_dsn)
    monkeypatch.setenv("CARDSVC_DATA_DIR", str(tmp_path / "cli-data"))
    monkeypatch.setenv("CARDSVC_KEY_FILE", str(tmp_path / "cli-keys.json"))

    async def run(*argv: str) -> Cli:
        capsys.readouterr()
        status = await asyncio.to_thread(cli.main, list(argv))
        captured = capsys.readouterr()
        return Cli(status, captured.out, captured.err)

    return run


async def scenario(svc: ServiceHarness) -> dict[str, Any]:
    """Taps of every kind, top-ups, a loss with a lift, and a replacement that moves a purse."""
    a = await funded_card(svc, 2000)
    b = await funded_card(svc, 1000)
    now = int(time.time())
    await tap(svc, tap_body(svc, a["card_sn"], at=now - 200))
    await tap(svc, tap_body(svc, a["card_sn"], at=now - 100, **metro("l1-chaotianmen", "in")))
    await tap(svc, tap_body(svc, a["card_sn"], at=now - 50, **metro("l1-shapingba", "out")))
    await tap(svc, tap_body(svc, a["card_sn"], at=now - 40, **metro("l1-shapingba", "in")))
    await tap(svc, tap_body(svc, a["card_sn"], at=now - 30, **metro("l2-daping", "in")))  # missing tap-out
    await tap(svc, tap_body(svc, b["card_sn"], line="bus-261"))
    await tap(svc, tap_body(svc, b["card_sn"], at=now - 5, line="bus-261"))
    assert (await tap(svc, tap_body(svc, b["card_sn"])))["result"] == "approved"
    for op in ("temporary-loss", "lift-loss", "temporary-loss", "formal-loss"):
        r = await svc.post(f"/v1/cards/{b['card_no']}/{op}", {"operator": "staff-1"})
        assert r.status == 200, r.body
    body = replacement_body()
    r = await svc.post(f"/v1/cards/{b['card_no']}/replace", {**body, "operator": "staff-1"})
    assert r.status == 200, r.body
    return {"a": a, "b": b, "new_card_no": body["new_card_no"]}


def by_name(report: Any) -> dict[str, Any]:
    return {c["name"]: c for c in report["checks"]}


# ------------------------------------------------------------------ audit


async def test_audit_passes_after_a_scenario(svc: ServiceHarness, run_cli: Any, db: asyncpg.Connection) -> None:
    s = await scenario(svc)
    assert await db.fetchval("SELECT count(*) FROM txn_journal WHERE counterparty = 'replacement'") == 2
    assert (await svc.get(f"/v1/purses/{s['new_card_no']}", as_="ops")).body["balance_fen"] == 1000 - 90 - 0 - 180
    res = await run_cli("audit", "--chunk-cards", "2")
    assert res.status == 0, res.out + res.err
    assert "purse_balances: card ids" in res.err  # the progress line of a chunked walk
    lines = res.out.splitlines()
    assert sum(line.startswith("PASS ") for line in lines) == 10 and not any(line.startswith("FAIL") for line in lines)
    assert "audit PASSED" in lines[-1]
    res = await run_cli("audit", "--json")
    assert res.status == 0
    checks = by_name(res.json)
    assert res.json["ok"] is True and all(c["ok"] for c in checks.values())
    assert checks["purse_balances"]["counts"]["purses"] == 3
    assert checks["replacement_transfers"]["counts"] == {"transfer_rows": 2, "net_fen": 0, "unpaired": 0}
    assert checks["hotlist_versions"]["counts"]["head"] == 3  # block, unblock, block (formal loss: still blocked)
    # a, b (lost, then replaced: listed) and b's replacement
    assert checks["hotlist_card_status"]["counts"] == {"cards": 3, "listed": 1, "unusable_not_blocked": 0, "usable_blocked": 0}
    assert checks["hotlist_card_status"]["samples"] == []
    assert checks["terminal_txn_journal"]["counts"]["approved_without_journal"] == 0
    assert checks["terminal_txn_journal"]["counts"]["online_journal_rows"] >= 8


async def _any_card(db: asyncpg.Connection) -> int:
    card_id: int = await db.fetchval("SELECT min(card_id) FROM purse WHERE balance_fen > 0")
    return card_id


async def _post(db: asyncpg.Connection, card_id: int, kind: int, amount: int, counterparty: str, seq: int = 1) -> None:
    """A journal transfer with its purse update: the balance invariant keeps holding."""
    await db.execute(
        """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty,
                                    line_id, source)
           VALUES ($1, $2, 'test', $3, $4, 1, now(), $5, 'bus-105', 4)""",
        card_id, kind, seq, amount, counterparty,
    )
    await db.execute("UPDATE purse SET balance_fen = balance_fen + $2 WHERE card_id = $1", card_id, amount)


async def break_balance(db: asyncpg.Connection) -> None:
    await db.execute("UPDATE purse SET balance_fen = balance_fen + 1 WHERE card_id = $1", await _any_card(db))


async def break_journal_without_purse(db: asyncpg.Connection) -> None:
    await db.execute(
        """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty)
           VALUES (987654321, 3, 'test', 1, 500, 1, now(), 'topup:cash')"""
    )


async def break_overdraft(db: asyncpg.Connection) -> None:
    card_id = await _any_card(db)
    balance = await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id)
    await _post(db, card_id, 3, -balance - 50, "topup:refund")  # an online movement below zero


async def break_overdraft_after_offline(db: asyncpg.Connection) -> None:
    """Offline debits the purse paid from a positive balance, then an online movement below zero: the
    offline debits do not explain it (they were counted as explaining it, whatever their order)."""
    card_id = await _any_card(db)
    for seq in range(1, 6):
        await _post(db, card_id, 5, -100, "cq-bus", seq=seq)
    balance = await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id)
    assert balance > 0
    await _post(db, card_id, 3, -balance - 50, "topup:refund", seq=99)


async def _a_bus_fare(db: asyncpg.Connection) -> int:
    txn_id: int = await db.fetchval(
        "SELECT min(txn_id) FROM txn_journal WHERE counterparty = 'cq-bus' AND kind = 1 AND amount_fen < 0"
    )
    return txn_id


async def break_fare_result(db: asyncpg.Connection) -> None:
    """A fare no longer 'approved': clearing skips it, the purse still paid it."""
    await db.execute("UPDATE txn_journal SET result = 0 WHERE txn_id = $1", await _a_bus_fare(db))


async def break_fare_kind(db: asyncpg.Connection) -> None:
    """A fare relabelled as a top-up movement: clearing skips it, the purse still paid it."""
    await db.execute("UPDATE txn_journal SET kind = 3 WHERE txn_id = $1", await _a_bus_fare(db))


async def break_fare_counterparty(db: asyncpg.Connection) -> None:
    """A fare credited to an operator no clearing run knows."""
    await db.execute("UPDATE txn_journal SET counterparty = 'cq-gone' WHERE txn_id = $1", await _a_bus_fare(db))


async def break_replacement(db: asyncpg.Connection) -> None:
    await _post(db, await _any_card(db), 7, 300, "replacement", seq=424242)


async def break_txn_without_journal(db: asyncpg.Connection) -> None:
    await db.execute(
        """UPDATE terminal_txn SET txn_id = NULL
           WHERE (terminal_id, terminal_seq) = (SELECT terminal_id, terminal_seq FROM terminal_txn
                                                WHERE result = 'approved' AND amount_fen > 0 LIMIT 1)"""
    )


async def break_journal_without_txn(db: asyncpg.Connection) -> None:
    await db.execute(
        """DELETE FROM terminal_txn
           WHERE (terminal_id, terminal_seq) = (SELECT t.terminal_id, t.terminal_seq FROM terminal_txn t
                                                JOIN txn_journal j ON j.txn_id = t.txn_id
                                                WHERE j.kind = 1 LIMIT 1)"""
    )


async def break_hotlist(db: asyncpg.Connection) -> None:
    await db.execute("DELETE FROM hotlist_entry WHERE version = 2")


async def break_hotlist_head(db: asyncpg.Connection) -> None:
    await db.execute("UPDATE hotlist_head SET version = version + 1")


async def break_status_by_hand(db: asyncpg.Connection) -> None:
    """An active card set lost by hand: no hotlist entry blocks it, so validators offline still take it."""
    await db.execute("UPDATE card SET status = 4 WHERE card_id = (SELECT min(card_id) FROM card WHERE status = 2)")


async def _append_hotlist(db: asyncpg.Connection, card_sql: str, action: int, reason: int) -> None:
    """A hotlist entry written as the next version (head moved with it), for the card `card_sql` selects."""
    await db.execute(
        f"""WITH c AS ({card_sql}),
                 h AS (UPDATE hotlist_head SET version = version + 1 RETURNING version)
            INSERT INTO hotlist_entry (version, card_id, card_sn, action, reason)
            SELECT h.version, c.card_id, c.card_sn, $1, $2 FROM c, h""",
        action, reason,
    )  # fmt: skip


async def break_hotlist_unblocks_replaced_card(db: asyncpg.Connection) -> None:
    """The lost and replaced card's newest entry unblocks it: validators offline would take it again."""
    await _append_hotlist(db, "SELECT card_id, card_sn FROM card WHERE status = 5", 2, 6)


async def break_hotlist_blocks_active_card(db: asyncpg.Connection) -> None:
    """An active, usable card blocked: validators refuse it."""
    await _append_hotlist(db, "SELECT card_id, card_sn FROM card WHERE status = 2 ORDER BY card_id LIMIT 1", 1, 2)


async def break_report(db: asyncpg.Connection) -> None:
    await db.execute(
        """INSERT INTO clearing_report (operator_id, business_date, txn_count, total_fen, digest)
           VALUES ('cq-bus', current_date - 3, 1, 180, repeat('0', 64))"""
    )


async def break_quota_return(db: asyncpg.Connection) -> None:
    """An elderly ride given back for a paid bus fare, which used no quota ride."""
    row = await db.fetchrow(
        """SELECT j.card_id, j.txn_id, k.holder_id FROM txn_journal j JOIN card k USING (card_id)
           WHERE j.txn_id = $1""",
        await _a_bus_fare(db),
    )
    await db.execute(
        """INSERT INTO quota_ride_return (card_id, fare_txn_id, holder_id, quota_year, rides_left, reason,
                                          terminal_id, terminal_seq, staff)
           VALUES ($1, $2, $3, 2026, 1, 'goodwill', 'office-x', 1, 'x')""",
        row["card_id"], row["txn_id"], row["holder_id"],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("breaker", "check", "count"),
    [
        (break_balance, "purse_balances", "mismatched"),
        (break_journal_without_purse, "purse_balances", "journal_without_purse"),
        (break_overdraft, "purse_overdraft", "below_limit"),
        (break_overdraft_after_offline, "purse_overdraft", "below_limit"),
        (break_fare_result, "journal_postings", "stray_rows"),
        (break_fare_kind, "journal_postings", "stray_rows"),
        (break_fare_counterparty, "journal_postings", "stray_rows"),
        (break_replacement, "replacement_transfers", "unpaired"),
        (break_txn_without_journal, "terminal_txn_journal", "approved_without_journal"),
        (break_journal_without_txn, "terminal_txn_journal", "journal_without_txn"),
        (break_hotlist, "hotlist_versions", "missing"),
        (break_hotlist_head, "hotlist_versions", "missing"),
        (break_status_by_hand, "hotlist_card_status", "unusable_not_blocked"),
        (break_hotlist_unblocks_replaced_card, "hotlist_card_status", "unusable_not_blocked"),
        (break_hotlist_blocks_active_card, "hotlist_card_status", "usable_blocked"),
        (break_report, "clearing_reports", "mismatched"),
        (break_quota_return, "quota_ride_returns", "without_ride"),
    ],
)
async def test_each_broken_invariant_fails_its_check(
    svc: ServiceHarness, db: asyncpg.Connection, run_cli: Any, breaker: Any, check: str, count: str
) -> None:
    await scenario(svc)
    assert (await run_cli("audit")).status == 0
    await breaker(db)
    res = await run_cli("audit", "--json")
    assert res.status == 1
    checks = by_name(res.json)
    assert res.json["ok"] is False
    assert checks[check]["ok"] is False and checks[check]["counts"][count] >= 1, checks[check]
    assert [n for n, c in checks.items() if not c["ok"]] == [check]  # the others still pass
    if check == "hotlist_card_status":  # the one card broken, by card_id
        assert len(checks[check]["samples"]) == 1, checks[check]
    text = await run_cli("audit")
    assert text.status == 1 and f"FAIL {check}:" in text.out and "audit FAILED" in text.out


async def test_offline_shadow_overdraft_is_reported_not_failed(
    svc: ServiceHarness, db: asyncpg.Connection, run_cli: Any
) -> None:
    await scenario(svc)
    card_id = await _any_card(db)
    balance = await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card_id)
    await _post(db, card_id, 5, -balance - 260, "cq-bus")  # an accepted offline debit the purse did not cover
    res = await run_cli("audit", "--json")
    assert res.status == 0, res.out
    counts = by_name(res.json)["purse_overdraft"]["counts"]
    assert counts["below_limit"] == 0 and counts["offline_shadow"] == 1 and counts["offline_shadow_fen"] == 260


async def _audit_overdraft(run_cli: Any) -> tuple[int, dict[str, Any]]:
    res = await run_cli("audit", "--json")
    return res.status, by_name(res.json)["purse_overdraft"]


async def test_offline_debits_excuse_only_the_overdraft_they_explain(
    svc: ServiceHarness, db: asyncpg.Connection, run_cli: Any
) -> None:
    """A purse is excused as offline shadow overdraft only if it would be within its limit without its
    offline debits: one small offline debit last month does not hide an online debit below zero today."""
    shadow, online = await funded_card(svc, 1000), await funded_card(svc, 1000)
    await _post(db, shadow["card_id"], 5, -1260, "cq-bus", seq=1)  # the chip paid; the shadow falls behind
    await _post(db, online["card_id"], 5, -1, "cq-bus", seq=2)  # covered by the balance
    status, check = await _audit_overdraft(run_cli)
    assert status == 0 and check["ok"], check
    assert (check["counts"]["offline_shadow"], check["counts"]["offline_shadow_fen"]) == (1, 260)
    assert "owe 260 fen beyond their limit" in check["detail"]
    await _post(db, online["card_id"], 3, -999 - 5000, "topup:refund", seq=3)  # online, 50 yuan below zero
    status, check = await _audit_overdraft(run_cli)
    assert status == 1 and not check["ok"], check
    assert check["counts"]["below_limit"] == 1 and check["samples"] == [online["card_id"]]
    assert check["counts"]["offline_shadow"] == 1  # the other purse is still excused, and counted


async def test_offline_shadow_debt_moves_with_the_purse_at_a_replacement(
    svc: ServiceHarness, db: asyncpg.Connection, run_cli: Any
) -> None:
    """The replacement transfer carries the old card's offline debt to the new card, whose own journal has
    no offline row: still excused. The old purse answers only for what was posted to it afterwards."""
    c = await funded_card(svc, 1000)
    await _post(db, c["card_id"], 5, -1260, "cq-bus")
    body = replacement_body()
    r = await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})
    assert r.status == 200, r.body
    new_no = body["new_card_no"]
    assert (await svc.balance(c["card_no"]), await svc.balance(new_no)) == (0, -260)
    status, check = await _audit_overdraft(run_cli)
    assert status == 0 and (check["counts"]["offline_shadow"], check["counts"]["offline_shadow_fen"]) == (1, 260)
    # A debit written on the old purse after the replacement (uploads carry theirs to the new card since
    # docs/transit.md "A replaced card's records"; before that, they stayed here): excused.
    await _post(db, c["card_id"], 5, -180, "cq-bus", seq=2)
    status, check = await _audit_overdraft(run_cli)
    assert status == 0 and (check["counts"]["offline_shadow"], check["counts"]["offline_shadow_fen"]) == (2, 440)
    # The debits it passed on to the new card do not excuse an online debit on the dead card.
    await _post(db, c["card_id"], 3, -50, "topup:refund", seq=3)
    status, check = await _audit_overdraft(run_cli)
    assert status == 1 and check["samples"] == [c["card_id"]], check


async def test_a_ride_before_a_replacement_is_charged_on_ride_credit_to_the_new_card(
    svc: ServiceHarness, db: asyncpg.Connection, run_cli: Any
) -> None:
    """A ride-code ride taken before the card was replaced is charged post-paid to the new card, which has
    no certificate (docs/transit.md): ride credit, through any number of replacements, within the
    certificate's credit and no further."""
    c, phone, _ = await rider(svc, 100)
    at = int(time.time()) - 30
    ride = ride_record(svc, phone.next_code(at), at)
    chain = [c["card_no"]]
    for _ in range(2):  # the debt moves on with the purse at a second replacement
        body = replacement_body()
        r = await svc.post(f"/v1/cards/{chain[-1]}/replace", {**body, "operator": "staff-1"})
        assert r.status == 200, r.body
        new_no = body["new_card_no"]
        chain.append(new_no)
        if len(chain) == 2:
            [answer] = await upload_rides(svc, [ride])
            assert answer["result"] == "approved", answer
            assert await svc.balance(new_no) == 100 - answer["fare_fen"] < 0
        status, check = await _audit_overdraft(run_cli)
        assert status == 0 and check["counts"]["on_ride_credit"] == 1 and check["counts"]["below_limit"] == 0, check
    last = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", chain[-1])
    assert not await db.fetchval("SELECT count(*) FROM ride_cert WHERE card_id = $1", last)
    balance = await svc.balance(chain[-1])
    await _post(db, last, 3, -limits.RIDE_CREDIT_LIMIT_FEN - balance - 1, "topup:refund")  # one fen beyond
    status, check = await _audit_overdraft(run_cli)
    assert status == 1 and check["samples"] == [last], check


# ------------------------------------------------------------------ clearing


def local_today() -> dt.date:
    return fares.local_day(TABLE, int(time.time()))


async def last_day_over(db: asyncpg.Connection) -> dt.date:
    """The latest day that can be cleared now, by the database's clock (the one clearing reads)."""
    return clearing.last_day_over(TABLE, await db.fetchval("SELECT clock_timestamp()"))


def days_from(first: dt.date, last: dt.date) -> list[dt.date]:
    """Every day from `first` through `last` (none if `last` is earlier)."""
    return [first + dt.timedelta(days=k) for k in range((last - first).days + 1)]


async def days_over_since(db: asyncpg.Connection, last: dt.date) -> list[dt.date]:
    """The last day over that a scheduled run begun after `last` was read may have seen by its own clock
    read: `last`, or a later day if a clearing cut-off has passed since (read again now, after the run)."""
    return days_from(last, await last_day_over(db))


async def scenario_of(svc: ServiceHarness, db: asyncpg.Connection, day: dt.date) -> dt.datetime:
    """The scenario's rides, taken and written in the local day `day` from noon on, in txn order; returns
    the day's start."""
    await scenario(svc)
    start, _ = clearing.business_day_bounds(TABLE, day)
    await db.execute(
        """UPDATE txn_journal SET at = $1::timestamptz + make_interval(secs => txn_id),
                                  posted_at = $1::timestamptz + make_interval(secs => txn_id)
           WHERE kind = ANY($2::smallint[])""",
        start + dt.timedelta(hours=12), KINDS,
    )
    return start


async def written_day(db: asyncpg.Connection) -> dt.date:
    """The clearing day of the fares the scenario wrote, from the clearing instants the database recorded
    (a second clock read could fall after local midnight). Should midnight have passed while they were
    written, those written before it are moved to its first instant, so that one day holds them all."""
    latest = await db.fetchval(
        "SELECT max(greatest(at, posted_at)) FROM txn_journal WHERE kind = ANY($1::smallint[])", KINDS
    )
    day = fares.local_day(TABLE, int(latest.timestamp()))
    start, _ = clearing.business_day_bounds(TABLE, day)
    await db.execute(
        "UPDATE txn_journal SET posted_at = $1 WHERE kind = ANY($2::smallint[]) AND greatest(at, posted_at) < $1",
        start, KINDS,
    )  # fmt: skip
    return day


async def journal_totals(db: asyncpg.Connection, day: dt.date) -> dict[str, tuple[int, int]]:
    """The expected clearing totals, computed independently in Python from the raw journal rows: a row
    belongs to the day it was posted, or to its ride time's day if that is later."""
    start, end = clearing.business_day_bounds(TABLE, day)
    out: dict[str, tuple[int, int]] = {}
    for r in await db.fetch(
        """SELECT counterparty, kind, amount_fen, at, posted_at, posted_at = '-infinity' AS legacy, result
           FROM txn_journal"""
    ):
        cleared_at = r["at"] if r["legacy"] else max(r["at"], r["posted_at"])  # legacy: written before 0007
        if r["kind"] in KINDS and r["result"] == 1 and start <= cleared_at < end and r["amount_fen"] < 0:
            n, t = out.get(r["counterparty"], (0, 0))
            out[r["counterparty"]] = (n + 1, t - r["amount_fen"])
    return out


async def test_clearing_files_round_trip_and_match_the_journal(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, run_cli: Any
) -> None:
    await scenario(svc)
    day = await written_day(db)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    results = await clearing.clear_day(db, TABLE, day, tmp_path, now=later)
    assert {r.operator_id: r.status for r in results} == {"cq-bus": "created", "cq-metro": "created"}
    expected = await journal_totals(db, day)
    assert expected["cq-bus"][0] == 3 and expected["cq-metro"][0] == 2  # 180, 90, 180; 360, penalty 700
    for r in results:
        assert r.path is not None
        data = r.path.read_bytes()
        header, lines = wire.read_clearing_file(data)
        assert (header.operator_id, header.business_date) == (r.operator_id, day)
        assert (header.record_count, header.total_fen) == expected[r.operator_id] == (r.txn_count, r.total_fen)
        assert sum(ln.amount_fen for ln in lines) == header.total_fen
        assert all(ln.source == wire.ClearingSource.PURSE for ln in lines)
        # The streamed file is byte for byte what the protocol's own writer makes of the same lines.
        assert wire.write_clearing_file(header, lines) == data
        assert data.rstrip(b"\n").rsplit(b"|", 1)[1].decode() == r.digest
        stored = await db.fetchrow("SELECT * FROM clearing_report WHERE operator_id = $1", r.operator_id)
        assert (stored["txn_count"], stored["total_fen"], stored["digest"]) == (r.txn_count, r.total_fen, r.digest)
        assert int(stored["created_at"].timestamp()) == header.created_at
    assert (await run_cli("audit")).status == 0

    # Re-running the day rewrites identical files and leaves the reports alone.
    files = {r.operator_id: r.path.read_bytes() for r in results if r.path}
    again = await clearing.clear_day(db, TABLE, day, tmp_path, now=later)
    assert {r.operator_id: r.status for r in again} == {"cq-bus": "unchanged", "cq-metro": "unchanged"}
    assert {r.operator_id: r.path.read_bytes() for r in again if r.path} == files

    # A cleared row is changed by hand (its amount corrected, and its purse with it): no silent
    # overwrite, and the audit fails on the report alone.
    card_id = await db.fetchval(
        """UPDATE txn_journal SET amount_fen = amount_fen - 50
           WHERE txn_id = (SELECT min(txn_id) FROM txn_journal WHERE counterparty = 'cq-bus' AND amount_fen < 0)
           RETURNING card_id"""
    )
    await db.execute("UPDATE purse SET balance_fen = balance_fen - 50 WHERE card_id = $1", card_id)
    third = await clearing.clear_day(db, TABLE, day, tmp_path, now=later)
    bus = next(r for r in third if r.operator_id == "cq-bus")
    assert bus.status == "mismatch" and not bus.ok and "journal changed" in bus.detail
    assert (tmp_path / clearing.clearing_file_name("cq-bus", day)).read_bytes() == files["cq-bus"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    res = await run_cli("audit", "--json")
    assert res.status == 1 and by_name(res.json)["clearing_reports"]["counts"]["mismatched"] == 1
    assert [n for n, c in by_name(res.json).items() if not c["ok"]] == ["clearing_reports"]


async def test_a_change_that_keeps_count_and_total_is_found_by_the_clearing_run_not_the_audit(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, run_cli: Any
) -> None:
    """docs/operations.md: the audit compares a report's count and total with the journal, not its digest
    (that would stream every cleared row through the audit); running the clearing for the day again does.
    Two cleared fares of one card swap their amounts: count, total and the purse are unchanged."""
    await scenario(svc)
    day = await written_day(db)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert {r.status for r in await clearing.clear_day(db, TABLE, day, tmp_path, now=later)} == {"created"}
    rows = await db.fetch(
        "SELECT txn_id, card_id, amount_fen FROM txn_journal WHERE counterparty = 'cq-bus' AND amount_fen < 0"
    )
    x, y = next((a, b) for a in rows for b in rows if a["card_id"] == b["card_id"] and a["amount_fen"] != b["amount_fen"])
    async with db.transaction():
        for a, b in ((x, y), (y, x)):
            await db.execute("UPDATE txn_journal SET amount_fen = $2 WHERE txn_id = $1", a["txn_id"], b["amount_fen"])
    res = await run_cli("audit", "--json")
    assert res.status == 0 and by_name(res.json)["clearing_reports"]["counts"]["mismatched"] == 0, res.out
    bus = next(r for r in await clearing.clear_day(db, TABLE, day, tmp_path, now=later) if r.operator_id == "cq-bus")
    assert bus.status == "mismatch" and not bus.ok, bus


async def test_a_late_upload_is_cleared_on_the_day_it_arrives_and_a_cleared_day_stays_as_paid(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, run_cli: Any
) -> None:
    past = local_today() - dt.timedelta(days=2)
    start = await scenario_of(svc, db, past)
    first = {r.operator_id: r for r in await clearing.clear_day(db, TABLE, past, tmp_path / "past")}
    assert {op: (r.status, r.txn_count) for op, r in first.items()} == {"cq-bus": ("created", 3),
                                                                        "cq-metro": ("created", 2)}
    files = {op: r.path.read_bytes() for op, r in first.items() if r.path}

    # A bus validator that was offline uploads a ride of that day only now.
    c = await funded_card(svc, 500)
    chip = PurseCard(c["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=500)
    ridden = int((start + dt.timedelta(hours=13)).timestamp())
    record = chip.debit(180, svc.terminals["transit_validator"].terminal_id, 900_001, ridden, **BUS)
    uploaded_from = local_today()
    assert [a["result"] for a in await upload(svc, [record])] == ["accepted"]
    row = await db.fetchrow("SELECT at, posted_at FROM txn_journal WHERE kind = 5")
    assert int(row["at"].timestamp()) == ridden and row["posted_at"] > row["at"] + dt.timedelta(days=1)
    # The day it arrived, as the database wrote it (local midnight may pass between the upload and a later
    # clock read): the day of the upload.
    today = fares.local_day(TABLE, int(row["posted_at"].timestamp()))
    assert uploaded_from <= today <= local_today()

    # The cleared day is what the operator was paid for, and stays so: same files, reports, audit green.
    again = {r.operator_id: r for r in await clearing.clear_day(db, TABLE, past, tmp_path / "past")}
    assert {op: r.status for op, r in again.items()} == {"cq-bus": "unchanged", "cq-metro": "unchanged"}
    assert {op: r.path.read_bytes() for op, r in again.items() if r.path} == files
    res = await run_cli("audit", "--json")
    assert res.status == 0, res.out

    # The ride is paid with the day it arrived, under its own ride time.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    bus = next(r for r in await clearing.clear_day(db, TABLE, today, tmp_path / "today", now=later)
               if r.operator_id == "cq-bus")
    assert (bus.status, bus.txn_count, bus.total_fen) == ("created", 1, 180)
    assert (await journal_totals(db, today))["cq-bus"] == (1, 180)
    assert bus.path is not None
    header, [line] = wire.read_clearing_file(bus.path.read_bytes())
    assert header.business_date == today and (line.txn_time, line.amount_fen, line.line_id) == (ridden, 180, "bus-105")
    assert (await run_cli("audit")).status == 0


async def test_a_row_is_cleared_on_its_writing_day_or_its_ride_day_if_later(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    day = local_today() - dt.timedelta(days=3)
    start, end = clearing.business_day_bounds(TABLE, day)
    rows = [  # (at, posted_at, amount): the day each belongs to
        (start + dt.timedelta(hours=9), start + dt.timedelta(hours=9, seconds=1), -100),  # written that day
        (start - dt.timedelta(days=5), start + dt.timedelta(hours=10), -200),  # uploaded late: this day
        (start + dt.timedelta(hours=11), start + dt.timedelta(days=1, hours=1), -400),  # uploaded the next day
        (end + dt.timedelta(minutes=5), end - dt.timedelta(minutes=5), -800),  # a validator clock ahead: next day
        (start + dt.timedelta(hours=12), None, -1600),  # written before migration 0007: its ride day
    ]
    for seq, (at, posted_at, amount) in enumerate(rows, 1):
        await db.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, line_id, source, posted_at)
               VALUES (1, 5, 'v1', $1, $2, 1, $3, 'cq-bus', 'bus-105', 2, coalesce($4::timestamptz, '-infinity'::timestamptz))""",
            seq, amount, at, posted_at,
        )
    cleared = {}
    for d in (day, day + dt.timedelta(days=1)):
        bus = next(r for r in await clearing.clear_day(db, TABLE, d, tmp_path) if r.operator_id == "cq-bus")
        cleared[d] = (bus.txn_count, bus.total_fen)
    assert cleared == {day: (3, 100 + 200 + 1600), day + dt.timedelta(days=1): (2, 400 + 800)}
    assert (await journal_totals(db, day))["cq-bus"] == cleared[day]


_journal_rows = st.lists(
    st.tuples(
        st.integers(0, 3 * 86400 - 1),  # ride time, seconds after the first day began
        st.integers(-600, 2 * 86400),  # written this long after the ride (negative: a validator clock ahead)
        st.integers(1, 5000),  # fen
        st.sampled_from(["cq-bus", "cq-metro"]),
        st.booleans(),  # written before migration 0007 (no writing time)
    ),
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_journal_rows)
async def test_every_row_is_cleared_exactly_once_on_its_day(
    db: asyncpg.Connection, tmp_path: Path, rows: list[tuple[int, int, int, str, bool]]
) -> None:
    """Whatever the ride and writing times, each approved fare is in exactly one day's file: the local day
    of greatest(ride, written), or of the ride for a row written before migration 0007."""
    first = local_today() - dt.timedelta(days=10)
    start, _ = clearing.business_day_bounds(TABLE, first)
    await db.execute("DELETE FROM clearing_report")
    await db.execute("DELETE FROM txn_journal WHERE terminal_id = 'prop'")
    expected: dict[int, tuple[dt.date, str, int]] = {}
    for seq, (ride, delay, amount, operator, legacy) in enumerate(rows, 1):
        at = start + dt.timedelta(seconds=ride)
        posted = None if legacy else at + dt.timedelta(seconds=delay)
        txn_id = await db.fetchval(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, line_id, source, posted_at)
               VALUES (1, 5, 'prop', $1, $2, 1, $3, $4, 'bus-105', 2,
                       coalesce($5::timestamptz, '-infinity'::timestamptz))
               RETURNING txn_id""",
            seq, -amount, at, operator, posted,
        )
        cleared_at = at if posted is None else max(at, posted)
        expected[txn_id] = (fares.local_day(TABLE, int(cleared_at.timestamp())), operator, amount)
    seen: dict[int, tuple[dt.date, str, int]] = {}
    for k in range(6):  # rides span 3 days, writes 2 more
        day = first + dt.timedelta(days=k)
        for r in await clearing.clear_day(db, TABLE, day, tmp_path / str(k)):
            assert r.status == "created" and r.path is not None, r
            header, lines = clearing.read_back(r.path)
            assert header.business_date == day and header.record_count == len(lines)
            for ln in lines:
                assert ln.txn_id not in seen, f"txn {ln.txn_id} cleared twice"
                seen[ln.txn_id] = (day, r.operator_id, ln.amount_fen)
    assert seen == expected


async def test_clearing_refuses_a_role_that_cannot_see_every_session(
    db: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    role = f"clearing_probe_{os.getpid()}"
    await db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        probe = await asyncpg.connect(db_dsn, user=role)
        try:
            with pytest.raises(clearing.ClearingError, match="pg_read_all_stats"):
                await clearing.clear_day(probe, TABLE, local_today() - dt.timedelta(days=2), tmp_path)
        finally:
            await probe.close()
        await db.execute(f"GRANT pg_read_all_stats TO {role}")
        probe = await asyncpg.connect(db_dsn, user=role)
        try:  # past the check: it stops at the first table it may not read
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await clearing.clear_day(probe, TABLE, local_today() - dt.timedelta(days=2), tmp_path)
        finally:
            await probe.close()
    finally:
        await db.execute(f"DROP OWNED BY {role}")
        await db.execute(f"DROP ROLE {role}")


async def test_clearing_waits_for_a_transaction_that_began_before_the_day_ended(
    db: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    writer = await asyncpg.connect(db_dsn)
    try:
        # A tap batch that began before the day ended and has not committed yet: its rows are the day's.
        tx = writer.transaction()
        await tx.start()
        await writer.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, line_id, source)
               VALUES (1, 1, 'v1', 1, -180, 1, now(), 'cq-bus', 'bus-105', 1)"""
        )
        # The day its transaction began in (its rows' time and posted_at), by the same clock reading.
        day = fares.local_day(TABLE, int((await writer.fetchval("SELECT now()")).timestamp()))
        with pytest.raises(clearing.ClearingError, match="still open"):
            await clearing.clear_day(db, TABLE, day, tmp_path, now=later, settle_s=0.3)
        assert await db.fetchval("SELECT count(*) FROM clearing_report") == 0

        # It commits while the run waits: the run goes on, and the row is in the file.
        run = asyncio.create_task(clearing.clear_day(db, TABLE, day, tmp_path, now=later, settle_s=30))
        await asyncio.sleep(0.5)
        assert not run.done()
        await tx.commit()
        bus = next(r for r in await run if r.operator_id == "cq-bus")
        assert (bus.status, bus.txn_count, bus.total_fen) == ("created", 1, 180)
    finally:
        await writer.close()


async def test_clearing_cli_for_a_past_day_and_the_ops_route(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, run_cli: Any
) -> None:
    # Yesterday, or the day before it in the first minute after midnight: a day the command finds over.
    day = await last_day_over(db)
    await scenario_of(svc, db, day)
    out = tmp_path / "out"
    res = await run_cli("clearing", "run", "--date", day.isoformat(), "--out", str(out))
    assert res.status == 0, res.out + res.err
    assert "CREATED   cq-bus" in res.out and "CREATED   cq-metro" in res.out
    header, lines = wire.read_clearing_file((out / clearing.clearing_file_name("cq-metro", day)).read_bytes())
    assert (header.record_count, header.total_fen) == (await journal_totals(db, day))["cq-metro"]
    assert [ln.txn_time for ln in lines] == sorted(ln.txn_time for ln in lines)

    res = await run_cli("clearing", "run", "--date", day.isoformat(), "--out", str(out), "--operator", "cq-bus", "--json")
    assert res.status == 0 and [r["status"] for r in res.json] == ["unchanged"]

    r = await svc.get(f"/v1/clearing/cq-metro/{day.isoformat()}", as_="ops")
    assert r.status == 200, r.body
    assert (r.body["txn_count"], r.body["total_fen"]) == (header.record_count, header.total_fen)
    assert r.body["file"] == clearing.clearing_file_name("cq-metro", day)
    r = await svc.get(f"/v1/clearing/cq-metro/{(day - dt.timedelta(days=1)).isoformat()}", as_="ops")
    assert r.status == 404 and r.body["code"] == "not_found"
    r = await svc.get("/v1/clearing/cq-metro/2026-13-01", as_="ops")
    assert r.status == 400 and r.body["field"] == "date"
    r = await svc.get(f"/v1/clearing/cq%20metro/{day.isoformat()}", as_="ops")
    assert r.status == 400 and r.body["field"] == "operator_id"
    r = await svc.get(f"/v1/clearing/cq-metro/{day.isoformat()}", as_="transit_validator")
    assert r.status == 403 and r.body["code"] == "forbidden_operation"


async def test_clearing_refuses_a_day_that_is_not_over(run_cli: Any, tmp_path: Path) -> None:
    res = await run_cli("clearing", "run", "--date", local_today().isoformat(), "--out", str(tmp_path))
    assert res.status == 1 and "not over yet" in res.err
    res = await run_cli("clearing", "run", "--date", "yesterday", "--out", str(tmp_path))
    assert res.status == 2
    # Other ISO forms of a day are refused too (the file names the day as given), and a day the calendar
    # does not have is said to be one, not a format error.
    for other in ("20261130", "2026-W48-1"):
        res = await run_cli("clearing", "run", "--date", other, "--out", str(tmp_path))
        assert res.status == 2 and "YYYY-MM-DD" in res.err, (other, res.err)
    res = await run_cli("clearing", "run", "--date", "2026-11-31", "--out", str(tmp_path))
    assert res.status == 2 and "not a day of the calendar" in res.err, res.err
    assert os.listdir(tmp_path) == []


async def test_a_day_can_be_cleared_from_one_minute_after_its_end(db: asyncpg.Connection, tmp_path: Path) -> None:
    day = local_today() - dt.timedelta(days=2)
    _, end = clearing.business_day_bounds(TABLE, day)
    with pytest.raises(clearing.ClearingError, match="can be cleared from"):
        await clearing.clear_day(db, TABLE, day, tmp_path, now=end + dt.timedelta(seconds=59))
    assert await db.fetchval("SELECT count(*) FROM clearing_report") == 0
    results = await clearing.clear_day(db, TABLE, day, tmp_path, now=end + dt.timedelta(seconds=60))
    assert {r.status for r in results} == {"created"}


async def test_an_empty_day_gives_empty_files(db: asyncpg.Connection, tmp_path: Path, settings: Settings) -> None:
    day = local_today() - dt.timedelta(days=2)
    results = await clearing.clear_day(db, TABLE, day, tmp_path)
    assert [(r.operator_id, r.status, r.txn_count) for r in results] == [("cq-bus", "created", 0),
                                                                         ("cq-metro", "created", 0)]
    for r in results:
        assert r.path is not None
        header, lines = wire.read_clearing_file(r.path.read_bytes())
        assert header.record_count == 0 and lines == []


async def test_hotlisted_counterparties_are_not_cleared(db: asyncpg.Connection, tmp_path: Path) -> None:
    day = local_today() - dt.timedelta(days=2)
    start, _ = clearing.business_day_bounds(TABLE, day)
    await db.execute(
        """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty,
                                    line_id, source, posted_at)
           VALUES (1, 5, 'v1', 1, -180, 1, $1, 'hotlisted:cq-bus', 'bus-105', 2, $1),
                  (1, 5, 'v1', 2, -180, 1, $1, 'cq-bus', 'bus-105', 2, $1)""",
        start + dt.timedelta(hours=9),
    )
    results = {r.operator_id: r for r in await clearing.clear_day(db, TABLE, day, tmp_path)}
    assert results["hotlisted:cq-bus"].status == "not_cleared" and results["hotlisted:cq-bus"].path is None
    assert (results["cq-bus"].txn_count, results["cq-bus"].total_fen) == (1, 180)


async def test_a_refused_operator_day_leaves_no_half_written_file(db: asyncpg.Connection, tmp_path: Path) -> None:
    """Files are written to *.tmp and renamed. A day refused while its file was being written (here a cleared
    row without line_id) left `<operator>_<date>.clr.tmp` behind, its header announcing lines and a total
    that were not all there."""
    day = fares.local_day(TABLE, int(time.time())) - dt.timedelta(days=3)
    start, _ = clearing.business_day_bounds(TABLE, day)
    for seq, line in ((1, "bus-105"), (2, None)):
        await db.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, line_id, source, posted_at)
               VALUES (1, 5, 'v1', $1, -180, 1, $2, 'cq-bus', $3, 2, $2)""",
            seq,
            start + dt.timedelta(hours=9, seconds=seq),
            line,
        )
    results = {r.operator_id: r for r in await clearing.clear_day(db, TABLE, day, tmp_path)}
    assert results["cq-bus"].status == "refused" and "line_id" in (results["cq-bus"].detail or ""), results
    assert not [n for n in os.listdir(tmp_path) if n.startswith("cq-bus")], "a refused day leaves no file"


async def test_an_operator_gone_from_the_fare_table_is_registered_and_cleared(
    svc: ServiceHarness, db: asyncpg.Connection, run_cli: Any, tmp_path: Path
) -> None:
    """Fares credited to an operator the fare table no longer lists: the audit says clearing will not pay
    them, and `clearing run --operator` refuses it, until `clearing register` records it."""
    await scenario(svc)
    await db.execute("UPDATE txn_journal SET counterparty = 'cq-old' WHERE counterparty = 'cq-bus'")
    res = await run_cli("audit", "--json")
    assert res.status == 1 and by_name(res.json)["journal_postings"]["counts"]["stray_rows"] >= 3, res.out
    day = await last_day_over(db)  # over when the command reads the clock (yesterday but in its first minute)
    refused = await run_cli("clearing", "run", "--date", day.isoformat(), "--operator", "cq-old", "--out", str(tmp_path))
    assert refused.status == 1 and "no operator 'cq-old'" in refused.err, (refused.out, refused.err)
    assert (await run_cli("clearing", "register", "--operator", "cq.old", "--name", "x")).status == 2  # not an id
    done = await run_cli("clearing", "register", "--operator", "cq-old", "--name", "Old bus company")
    assert done.status == 0 and "cq-old registered" in done.out, (done.out, done.err)
    assert (await run_cli("audit")).status == 0
    ran = await run_cli("clearing", "run", "--date", day.isoformat(), "--operator", "cq-old", "--out", str(tmp_path))
    assert ran.status == 0 and "cq-old" in ran.out, (ran.out, ran.err)


# ------------------------------------------------------------------ scheduled runs (no --date)


async def test_a_scheduled_run_clears_every_day_not_cleared_yet(db: asyncpg.Connection, tmp_path: Path) -> None:
    """`clearing run` without --date, from a nightly timer: the first run clears the last day that is over;
    a run after missed nights catches up every day since, however many; an operator behind the others
    (cleared alone with --operator) is caught up for its own days only."""
    day = local_today() - dt.timedelta(days=50)
    start, end = clearing.business_day_bounds(TABLE, day)
    at = end + dt.timedelta(seconds=limits.CLEARING_MARGIN_S)  # `day` is clearable from this instant
    assert clearing.last_day_over(TABLE, at) == day
    assert clearing.last_day_over(TABLE, at - dt.timedelta(microseconds=1)) == day - dt.timedelta(days=1)
    assert (await clearing.days_to_clear(db, TABLE, now=at)).todo == []  # no fare yet: nothing owed
    # 50 days back is two months back for most of each month: older than the migrated database's partitions.
    await db.execute("SELECT cardsvc_ensure_partitions($1::date, 1)", day)
    for seq, (operator, line) in enumerate((("cq-bus", "bus-105"), ("cq-metro", "L1")), 1):
        await db.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, line_id, source, posted_at)
               VALUES (1, 1, 'v1', $1, -180, 1, $2, $3, $4, 1, $2)""",
            seq, start + dt.timedelta(hours=9), operator, line,
        )  # fmt: skip

    first = await clearing.days_to_clear(db, TABLE, now=at)
    assert (first.todo, first.last_over) == ([(day, ["cq-bus", "cq-metro"])], day)
    await clearing.clear_day(db, TABLE, day, tmp_path, now=at)
    assert (await clearing.days_to_clear(db, TABLE, now=at)).todo == []

    # Three nights missed: the fourth run clears the three days and its own.
    later = at + dt.timedelta(days=4)
    assert (await clearing.days_to_clear(db, TABLE, now=later)).days == [day + dt.timedelta(days=k) for k in (1, 2, 3, 4)]
    # One operator cleared ahead of the other: that day is missing for the other one only.
    await clearing.clear_day(db, TABLE, day + dt.timedelta(days=1), tmp_path, now=later, operator_id="cq-metro")
    todo = (await clearing.days_to_clear(db, TABLE, now=later)).todo
    assert todo[0] == (day + dt.timedelta(days=1), ["cq-bus"]) and todo[1][1] == ["cq-bus", "cq-metro"]
    assert (await clearing.days_to_clear(db, TABLE, now=later, operator_id="cq-metro")).days[0] == (
        day + dt.timedelta(days=2)
    )
    # Forty days later: all forty, none dropped.
    due = await clearing.days_to_clear(db, TABLE, now=at + dt.timedelta(days=40))
    assert due.days == [day + dt.timedelta(days=k) for k in range(1, 41)]


async def cleared_through(svc: ServiceHarness) -> dict[str, float]:
    """`cardsvc_transit_clearing_cleared_through_timestamp_seconds` per operator, as a scrape shows it (a
    worker reads the reports at most every 5 minutes: the first scrape after this reads them)."""
    from prometheus_client.parser import text_string_to_metric_families

    svc.app[CLEARING_GAUGE_READ][0] = -math.inf
    text = await (await svc.client.get("/metrics")).text()
    return {
        s.labels["operator"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "cardsvc_transit_clearing_cleared_through_timestamp_seconds"
    }


async def _reversal(db: asyncpg.Connection, day: dt.date) -> None:
    """A row that credits a purse back, written in `day`: clearing file v1 cannot carry it, so the
    operator's day is REFUSED until it is handled by hand (docs/operations.md)."""
    at = clearing.business_day_bounds(TABLE, day)[0] + dt.timedelta(hours=10)
    await db.execute(
        """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                    counterparty, line_id, source, posted_at)
           VALUES (1, 5, 'v1', 1, 180, 1, $1, 'cq-bus', 'bus-105', 2, $1)""",
        at,
    )


async def test_a_refused_day_is_tried_again_every_night_and_holds_the_gauge_back(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, run_cli: Any
) -> None:
    """A catch-up goes on past a refused day, and the next nights try it again (exit 1 each time) instead of
    starting after the later days; the other operator's files are not written again; the cleared-through
    gauge stays at the day before the refused one, so CardsvcClearingBehind fires until it is handled."""
    last = await last_day_over(db)
    d0, d1, d2 = last - dt.timedelta(days=2), last - dt.timedelta(days=1), last
    out = tmp_path / "out"
    await clearing.clear_day(db, TABLE, d0, out)
    await _reversal(db, d1)

    def created(first: dt.date, last: dt.date) -> list[tuple[str, str, str]]:
        return [(op, d.isoformat(), "created") for d in days_from(first, last) for op in ("cq-bus", "cq-metro")]

    # A run clears through the last day over by its own clock read: `last`, or the next day too should the
    # clearing cut-off have passed since `last` was read (before each run, again after it).
    first = await run_cli("clearing", "run", "--out", str(out), "--json")
    got = [(r["operator_id"], r["business_date"], r["status"]) for r in first.json]
    assert first.status == 1 and got in [
        [("cq-bus", d1.isoformat(), "refused"), ("cq-metro", d1.isoformat(), "created"), *created(d2, ran_to)]
        for ran_to in await days_over_since(db, last)
    ], (first.out, first.err)  # fmt: skip
    ran_to = dt.date.fromisoformat(got[-1][1])
    metro_file = out / clearing.clearing_file_name("cq-metro", d1)
    metro_file.unlink()  # picked up by the operator's transfer job
    again = await run_cli("clearing", "run", "--out", str(out), "--json")
    got = [(r["operator_id"], r["business_date"], r["status"]) for r in again.json]
    assert again.status == 1 and got in [
        [("cq-bus", d1.isoformat(), "refused"), *created(ran_to + dt.timedelta(days=1), later)]
        for later in await days_over_since(db, ran_to)
    ], again.out
    assert not metro_file.exists()  # not made again
    assert (await cleared_through(svc))["cq-bus"] == clearing.business_day_bounds(TABLE, d0)[1].timestamp()


async def test_days_left_before_a_day_cleared_by_hand_are_cleared_by_the_next_run(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Two nights missed, then yesterday cleared by hand (`clearing run --date`): the next nightly run
    clears the two days in between."""
    now = await db.fetchval("SELECT clock_timestamp()")  # one instant for the test and the run it asks
    last = clearing.last_day_over(TABLE, now)
    await clearing.clear_day(db, TABLE, last - dt.timedelta(days=3), tmp_path)
    await clearing.clear_day(db, TABLE, last, tmp_path)
    due = await clearing.days_to_clear(db, TABLE, now=now)
    assert due.days == [last - dt.timedelta(days=2), last - dt.timedelta(days=1)]


async def test_a_catch_up_reports_the_days_it_cleared_when_another_day_fails(
    db: asyncpg.Connection, tmp_path: Path, run_cli: Any
) -> None:
    """A day held by another run (or a transaction older than its end) fails that day only: the command
    still prints the days it cleared, says which day failed, and exits 1; the next run clears it."""
    last = await last_day_over(db)
    await clearing.clear_day(db, TABLE, last - dt.timedelta(days=2), tmp_path / "out")
    assert await db.fetchval("SELECT pg_try_advisory_lock($1, $2)", clearing._LOCK_NAMESPACE, last.toordinal())
    # A run clears through the last day over by its own clock read: `last`, or the next day too should the
    # clearing cut-off have passed since `last` was read (before each run, again after it).
    res = await run_cli("clearing", "run", "--out", str(tmp_path / "out"), "--json")
    assert res.status == 1 and f"error: {last}: another clearing run for {last} is in progress" in res.err
    got = {(r["business_date"], r["status"]) for r in res.json}
    before_last, after_last = last - dt.timedelta(days=1), last + dt.timedelta(days=1)
    assert got in [
        {(d.isoformat(), "created") for d in [before_last, *days_from(after_last, ran_to)]}
        for ran_to in await days_over_since(db, last)
    ], res.out
    ran_to = max(last, *(dt.date.fromisoformat(d) for d, _ in got))
    await db.execute("SELECT pg_advisory_unlock($1, $2)", clearing._LOCK_NAMESPACE, last.toordinal())
    res = await run_cli("clearing", "run", "--out", str(tmp_path / "out"), "--json")
    assert res.status == 0 and {r["business_date"] for r in res.json} in [
        {d.isoformat() for d in [last, *days_from(ran_to + dt.timedelta(days=1), later)]}
        for later in await days_over_since(db, ran_to)
    ], res.out


async def test_the_cleared_through_gauge_covers_every_operator_clearing_clears_and_no_other(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """An operator never cleared, with fares, counts as cleared through the day before its first one (so the
    alert fires when its clearing never works, e.g. a role without pg_read_all_stats); one with nothing in
    the journal has no series; an operator clearing no longer clears (gone from the fare table, not
    registered) has none either, whatever reports it left."""
    await db.execute("INSERT INTO transit_operator (operator_id, name) VALUES ('cq-new', 'New'), ('cq-idle', 'Idle')")
    at = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    await db.execute(
        """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                    counterparty, line_id, source)
           VALUES (1, 1, 'v1', 1, -180, 1, $1, 'cq-new', 'bus-105', 1)""",
        at,
    )
    await db.execute(
        """INSERT INTO clearing_report (operator_id, business_date, txn_count, total_fen, digest)
           VALUES ('cq-gone', $1, 0, 0, repeat('0', 64))""",
        local_today() - dt.timedelta(days=5),
    )
    got = await cleared_through(svc)
    first_day = fares.local_day(TABLE, int(at.timestamp()))
    assert got["cq-new"] == clearing.business_day_bounds(TABLE, first_day)[0].timestamp()
    assert "cq-idle" not in got and "cq-gone" not in got


async def test_the_nightly_command_clears_yesterday_once(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, run_cli: Any
) -> None:
    # Yesterday, or the day before it in the first minute after midnight: the last day over by the
    # database's clock, the one the command reads.
    day = await last_day_over(db)
    await scenario_of(svc, db, day)
    out = tmp_path / "out"
    res = await run_cli("clearing", "run", "--out", str(out), "--json")
    assert res.status == 0, res.out + res.err
    # The command read the clock again: should the clearing cut-off have passed since `day` was read, it
    # cleared the next day (no fares) as well.
    ran = {r["business_date"] for r in res.json}
    assert ran in [{d.isoformat() for d in days_from(day, last)} for last in await days_over_since(db, day)], ran
    assert {r["operator_id"]: r["status"] for r in res.json if r["business_date"] == day.isoformat()} == {
        "cq-bus": "created", "cq-metro": "created"
    }  # fmt: skip
    assert {r["status"] for r in res.json} == {"created"}
    metro = next(r for r in res.json if r["operator_id"] == "cq-metro" and r["business_date"] == day.isoformat())
    assert (metro["txn_count"], metro["total_fen"]) == (await journal_totals(db, day))["cq-metro"]
    files = set(os.listdir(out))
    ran_to = max(dt.date.fromisoformat(d) for d in ran)
    again = await run_cli("clearing", "run", "--out", str(out))
    assert again.status == 0, (again.out, again.err)
    # Nothing cleared twice and no file made again; only a day whose cut-off passed since the first run is new.
    made = set(os.listdir(out)) - files
    assert files <= set(os.listdir(out)) and any(
        made == {clearing.clearing_file_name(op, d) for d in days_from(ran_to + dt.timedelta(days=1), last)
                 for op in ("cq-bus", "cq-metro")}
        and (last > ran_to or ("nothing to clear" in again.err and again.out == ""))
        for last in await days_over_since(db, ran_to)
    ), (made, again.out, again.err)  # fmt: skip


async def test_metrics_show_how_far_each_operator_is_cleared(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The CardsvcClearingBehind alert reads this gauge: the end of the last cleared day per operator."""
    day = local_today() - dt.timedelta(days=3)
    await clearing.clear_day(db, TABLE, day, tmp_path)
    await clearing.clear_day(db, TABLE, day + dt.timedelta(days=1), tmp_path, operator_id="cq-metro")

    ends = {d: clearing.business_day_bounds(TABLE, d)[1].timestamp() for d in (day, day + dt.timedelta(days=1))}
    got = await cleared_through(svc)
    assert (got["cq-bus"], got["cq-metro"]) == (ends[day], ends[day + dt.timedelta(days=1)])
    assert ends[day] % 86400 == 16 * 3600  # a local midnight (UTC+8) is 16:00 UTC
    await clearing.clear_day(db, TABLE, day + dt.timedelta(days=1), tmp_path)
    assert (await cleared_through(svc))["cq-bus"] == ends[day + dt.timedelta(days=1)]


async def test_a_recorded_audit_is_kept_and_shown_on_metrics(
    svc: ServiceHarness, db: asyncpg.Connection, run_cli: Any
) -> None:
    """`audit --record` (the nightly timer) keeps each outcome in audit_run, and /metrics shows when the last
    run and the last passing run finished: CardsvcAuditFailed compares the two."""
    from prometheus_client.parser import text_string_to_metric_families

    await scenario(svc)

    async def scraped() -> dict[str, float]:
        text = await (await svc.client.get("/metrics")).text()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("cardsvc_audit_")}  # fmt: skip

    plain = await run_cli("audit")
    assert plain.status == 0 and await db.fetchval("SELECT count(*) FROM audit_run") == 0  # not recorded
    passed = await run_cli("audit", "--record", "--json")
    assert passed.status == 0 and passed.json["ok"], passed.out
    first = await db.fetchrow("SELECT * FROM audit_run")
    assert f"recorded as audit run {first['run_id']}" in passed.err
    assert first["ok"] and first["failed"] == [] and first["snapshot_at"] <= first["finished_at"]
    assert [c["name"] for c in orjson.loads(first["checks"])] == [c["name"] for c in passed.json["checks"]]
    got = await scraped()
    assert got["cardsvc_audit_last_run_timestamp_seconds"] == first["finished_at"].timestamp()
    assert got["cardsvc_audit_last_success_timestamp_seconds"] == first["finished_at"].timestamp()

    card_id = await db.fetchval("SELECT min(card_id) FROM purse")
    await db.execute("UPDATE purse SET balance_fen = balance_fen + 1 WHERE card_id = $1", card_id)
    failed = await run_cli("audit", "--record")
    assert failed.status == 1
    last = await db.fetchrow("SELECT * FROM audit_run ORDER BY run_id DESC LIMIT 1")
    assert not last["ok"] and last["failed"] == ["purse_balances"]
    got = await scraped()
    assert got["cardsvc_audit_last_run_timestamp_seconds"] == last["finished_at"].timestamp()
    assert got["cardsvc_audit_last_success_timestamp_seconds"] == first["finished_at"].timestamp()
