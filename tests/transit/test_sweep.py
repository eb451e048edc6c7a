"""The sweep of timed-out metro journeys: a tap-in never followed by a tap-out is charged the maximum fare
once the journey timeout has passed, at the moment it timed out, exactly once, never when the rider left
or entered again, never beyond what the purse may pay; clearing and the audit count it like any penalty.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import pytest

from cardsvc import metrics
from cardsvc.app import MaintenanceFailed, maintenance_once
from cardsvc.audit import run_audit
from cardsvc.store.pool import create_pool
from cardsvc.transit import clearing, fares, sweep
from cardsvc.transit.sweep import SWEEP_TERMINAL, sweep_timed_out_journeys
from cardsvc.transit.taps import KIND_PENALTY, SOURCE_SWEEP
from tests.helpers import ServiceHarness, purse_vs_journal, replacement_body

TABLE = fares.load_demo_table()
TIMEOUT = TABLE.rules.journey_timeout_s
A, B = sorted(TABLE.stations)[:2]
_seq = itertools.count(1)


@pytest.fixture(autouse=True)
async def ledger_holds(db_dsn: str) -> AsyncIterator[None]:
    yield
    for r in await purse_vs_journal(db_dsn):
        assert r["balance_fen"] == r["journal"], dict(r)
        assert r["balance_fen"] >= 0, dict(r)


@pytest.fixture
async def pool(svc: ServiceHarness) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(svc.dsn, svc.settings)
    yield p
    await p.close()


async def card_with(svc: ServiceHarness, db: asyncpg.Connection, amount_fen: int) -> dict[str, Any]:
    c = await svc.new_card(has_purse=True)
    c["card_id"] = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": next(_seq), "amount_fen": amount_fen, "channel": "cash"},
    )
    assert r.status == 200, r.body
    return c


async def metro(svc: ServiceHarness, c: dict[str, Any], station: str, direction: str) -> dict[str, Any]:
    body = {
        "terminal_seq": next(_seq),
        "time": int(time.time()),
        "mode": "metro",
        "line_id": TABLE.stations[station].line,
        "station_id": station,
        "direction": direction,
        "credential": "card",
        **svc.card_auth_body(c["card_sn"]),
    }
    r = await svc.post("/v1/transit/taps", body, as_="transit_validator")
    assert r.status == 200 and r.body["result"] == "approved", r.body
    return dict(r.body)


def later(seconds: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


async def sweep_rows(db: asyncpg.Connection, card_id: int) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT kind, amount_fen, at, counterparty, line_id, station_id, terminal_id FROM txn_journal "
        "WHERE card_id = $1 AND source = $2",
        card_id,
        SOURCE_SWEEP,
    )


async def test_a_journey_left_open_is_charged_the_maximum_fare_once_when_it_times_out(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    c = await card_with(svc, db, 2000)
    entered = int(time.time())
    await metro(svc, c, A, "in")
    early = await sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT - 120))
    assert (early.closed, early.unpaid) == (0, 0) and await sweep_rows(db, c["card_id"]) == []

    done = await sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT + 60))
    assert (done.candidates, done.closed, done.charged_fen, done.unpaid) == (1, 1, TABLE.cap_fen, 0)
    [row] = await sweep_rows(db, c["card_id"])
    assert row["kind"] == KIND_PENALTY and row["amount_fen"] == -TABLE.cap_fen
    assert row["counterparty"] == TABLE.station_operator[A] and row["station_id"] == A
    assert row["line_id"] == TABLE.stations[A].line  # a clearing line needs it
    assert row["terminal_id"] == SWEEP_TERMINAL
    assert abs(row["at"].timestamp() - (entered + TIMEOUT)) <= 5  # when it timed out, not when swept
    assert await svc.balance(c["card_no"]) == 2000 - TABLE.cap_fen

    again = await sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT + 600))
    assert again.closed == 0 and len(await sweep_rows(db, c["card_id"])) == 1
    # The next tap-in finds no open journey: no second charge for the same journey.
    nxt = await metro(svc, c, B, "in")
    assert "penalty" not in nxt and "missing_tap_out" not in nxt["rules"], nxt

    # Clearing counts it for the operator (on its ride day: the sweep ran on a clock hours ahead of the
    # database's, so the ride time is the later of the two); the audit passes.
    day = fares.local_day(TABLE, int(row["at"].timestamp()))
    results = await clearing.clear_day(db, TABLE, day, tmp_path, now=later(3 * 86400))
    [metro_op] = [r for r in results if r.operator_id == TABLE.station_operator[A]]
    assert metro_op.status == "created", metro_op  # a file the operator is paid from, not a refusal
    assert metro_op.total_fen >= TABLE.cap_fen
    _, checks = await run_audit(db, svc.settings, TABLE)
    assert all(ch.ok for ch in checks), [ch for ch in checks if not ch.ok]


async def test_the_late_exit_of_a_swept_journey_is_not_charged_again(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    c = await card_with(svc, db, 2000)
    await metro(svc, c, A, "in")
    done = await sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT + 60))
    assert done.closed == 1
    out = await metro(svc, c, B, "out")  # the rider finally taps out of the journey the sweep charged
    assert (out["fare_fen"], out["rules"]) == (0, ["exit_of_swept_journey"]) and "penalty" not in out, out
    assert await svc.balance(c["card_no"]) == 2000 - TABLE.cap_fen


async def test_a_rider_who_left_owes_nothing_and_a_reentry_is_charged_per_journey(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    left = await card_with(svc, db, 2000)
    await metro(svc, left, A, "in")
    await metro(svc, left, B, "out")
    paid = await svc.balance(left["card_no"])
    reentered = await card_with(svc, db, 2000)
    await metro(svc, reentered, A, "in")
    second = await metro(svc, reentered, B, "in")  # the first journey is charged now (missing tap-out)
    assert second["penalty"]["amount_fen"] == TABLE.cap_fen, second
    r = await sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT + 1))
    # Both cards entered in the window; only the re-entered card's second journey is still open.
    assert (r.candidates, r.closed) == (1, 1), r
    assert await svc.balance(left["card_no"]) == paid and await sweep_rows(db, left["card_id"]) == []
    [row] = await sweep_rows(db, reentered["card_id"])
    assert row["station_id"] == B  # the sweep charged the journey entered at B, the tap the one at A
    assert await svc.balance(reentered["card_no"]) == 2000 - 2 * TABLE.cap_fen


async def test_a_purse_that_cannot_pay_is_left_for_its_next_tap(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    c = await card_with(svc, db, TABLE.cap_fen - 1)
    await metro(svc, c, A, "in")
    r = await sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT + 60))
    assert (r.closed, r.unpaid) == (0, 1), r
    assert await sweep_rows(db, c["card_id"]) == []
    journey = await db.fetchval("SELECT journey::text FROM purse WHERE card_id = $1", c["card_id"])
    assert fares.JourneyState.from_dict(orjson.loads(journey)).journey is not None  # open, for the next tap


async def test_a_sweep_racing_the_riders_exit_never_charges_both(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    cards = [await card_with(svc, db, 3000) for _ in range(6)]
    for c in cards:
        await metro(svc, c, A, "in")
    await asyncio.gather(
        sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT + 60)),
        *(metro(svc, c, B, "out") for c in cards),
    )
    for c in cards:
        swept = await sweep_rows(db, c["card_id"])
        fare = await db.fetchval(
            "SELECT count(*) FROM txn_journal WHERE card_id = $1 AND kind = 1 AND amount_fen < 0", c["card_id"]
        )
        assert len(swept) + fare == 1, (c["card_no"], swept, fare)  # the exit fare or the sweep, never both


async def test_a_journey_open_when_its_card_was_replaced_is_swept_on_the_new_card(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """The replacement took the purse's fare state along: the sweep finds the journey through the old
    card's entry row and charges the new card's purse, once."""
    c = await card_with(svc, db, 2000)
    await metro(svc, c, A, "in")
    body = replacement_body()
    r = await svc.post(f"/v1/cards/{c['card_no']}/replace", {**body, "operator": "staff-1"})
    assert r.status == 200, r.body
    new_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", body["new_card_no"])
    done = await sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT + 60))
    assert (done.closed, done.charged_fen) == (1, TABLE.cap_fen)
    assert [r["amount_fen"] for r in await sweep_rows(db, new_id)] == [-TABLE.cap_fen]
    assert await sweep_rows(db, c["card_id"]) == []
    assert await svc.balance(body["new_card_no"]) == 2000 - TABLE.cap_fen
    assert (await sweep_timed_out_journeys(pool, TABLE, 0, now=later(TIMEOUT + 600))).closed == 0


async def test_a_sweep_behind_by_hours_goes_through_them_window_by_window(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """After the service was stopped for hours, one run charges every journey that timed out meanwhile,
    reading the journal a bounded window at a time (one unbounded read at 40M cards outlasts the
    command timeout, and the window would only grow)."""
    c = await card_with(svc, db, 2000)
    await metro(svc, c, A, "in")
    now = later(TIMEOUT + 60)
    due = now - dt.timedelta(seconds=TIMEOUT)
    behind = due - 5 * sweep.WINDOW_MAX - dt.timedelta(minutes=7)
    await db.execute(
        "INSERT INTO journey_sweep (swept_to) VALUES ($1) ON CONFLICT (one) DO UPDATE SET swept_to = $1", behind
    )
    done = await sweep_timed_out_journeys(pool, TABLE, 0, now=now)
    assert (done.closed, done.charged_fen, done.swept_to) == (1, TABLE.cap_fen, due)
    assert await db.fetchval("SELECT swept_to FROM journey_sweep") == due
    assert await svc.balance(c["card_no"]) == 2000 - TABLE.cap_fen


async def test_a_rush_hour_window_is_looked_at_a_bounded_number_of_purses_at_a_time(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 40M cards, the purses of a rush-hour window's 169,288 metro entries in one statement took 9.7 s,
    past the command timeout, every time the sweep retried the window: its watermark never moved again
    and no later journey was charged. The purses are read a bounded chunk at a time, and the chunks
    together find exactly the cards with something due."""
    monkeypatch.setattr(sweep, "CANDIDATE_CHUNK", 2)
    riding = [await card_with(svc, db, 2000) for _ in range(5)]
    left = [await card_with(svc, db, 2000) for _ in range(2)]
    for c in riding:
        await metro(svc, c, A, "in")
    for c in left:
        await metro(svc, c, A, "in")
        await metro(svc, c, B, "out")
    looked: list[int] = []

    class Counting:  # the one method due_cards uses, counting the purses each statement reads
        async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
            if sql == sweep._DUE_PURSES_SQL:
                looked.append(len(args[0]))
            return await db.fetch(sql, *args)

    now = later(TIMEOUT + 60)
    real_now = dt.datetime.now(dt.UTC)
    found = await sweep.due_cards(
        cast(asyncpg.Connection, Counting()), sweep.metro_operators(TABLE), real_now - dt.timedelta(minutes=5),
        real_now + dt.timedelta(seconds=1), int(now.timestamp()) - TIMEOUT, -1,
    )  # fmt: skip
    assert found == sorted(c["card_id"] for c in riding)
    assert looked == [2, 2, 2, 1]  # the window's 7 cards, 2 at a time
    done = await sweep_timed_out_journeys(pool, TABLE, 0, now=now)
    assert (done.candidates, done.closed, done.charged_fen) == (5, 5, 5 * TABLE.cap_fen), done
    for c in left:
        assert await sweep_rows(db, c["card_id"]) == []


async def test_a_replaced_card_that_cannot_pay_is_looked_at_once_per_run(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """A run that catches up window by window looks at the replacements since it began once: a new card
    whose purse cannot pay its journey counts one unpaid card (the alert reads it), not one per window."""
    c = await card_with(svc, db, TABLE.cap_fen - 1)
    await metro(svc, c, A, "in")
    r = await svc.post(f"/v1/cards/{c['card_no']}/replace", {**replacement_body(), "operator": "staff-1"})
    assert r.status == 200, r.body
    now = later(TIMEOUT + 60)
    behind = now - dt.timedelta(seconds=TIMEOUT) - 4 * sweep.WINDOW_MAX
    await db.execute(
        "INSERT INTO journey_sweep (swept_to) VALUES ($1) ON CONFLICT (one) DO UPDATE SET swept_to = $1", behind
    )
    done = await sweep_timed_out_journeys(pool, TABLE, 0, now=now)
    assert (done.candidates, done.unpaid) == (1, 1), done


async def test_a_failing_maintenance_step_does_not_keep_the_others_from_running(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """A sweep that fails every round (here: a journey state the fare engine refuses, written by hand)
    used to skip pruning and the journal's partitions too, round after round."""
    c = await card_with(svc, db, 2000)
    await metro(svc, c, A, "in")
    await db.execute("UPDATE purse SET journey = journey || '{\"bogus\": 1}' WHERE card_id = $1", c["card_id"])
    await db.execute("INSERT INTO request_nonce (terminal_id, nonce, seen_at) VALUES ('T-x', 'n-old', now() - interval '1 day')")
    await db.execute(
        """INSERT INTO terminal_txn (terminal_id, terminal_seq, request_hash, result, detail, at)
           VALUES ('T-x', 1, '\\x00', 'declined', '{}', now() - interval '30 days')"""
    )
    ahead = await db.fetchval("SELECT 'txn_journal_' || to_char(date_trunc('month', now()) + interval '2 months', 'YYYYMM')")
    await db.execute(f"DROP TABLE IF EXISTS {ahead}")
    await db.execute("UPDATE journey_sweep SET swept_to = now() - make_interval(secs => $1) - interval '1 minute'", float(TIMEOUT))
    failures = metrics.MAINTENANCE_FAILURES.labels("sweep")
    before = failures._value.get()
    with pytest.raises(MaintenanceFailed, match=r"^sweep$"):
        await maintenance_once(pool, svc.settings, dataclasses.replace(TABLE, rules=dataclasses.replace(TABLE.rules, journey_timeout_s=0)))
    assert failures._value.get() == before + 1
    assert await db.fetchval("SELECT count(*) FROM request_nonce WHERE nonce = 'n-old'") == 0
    assert await db.fetchval("SELECT count(*) FROM terminal_txn WHERE terminal_id = 'T-x'") == 0
    assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", ahead)


async def test_the_sweep_shows_how_far_it_has_got_and_stops_moving_when_stuck(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """Ops see the sweep's progress (cardsvc_transit_journey_sweep_through_timestamp_seconds; the alert
    CardsvcJourneySweepBehind): after a round that caught up from hours behind, everything due up to the
    round has been looked at; a round that fails on a window leaves the gauge where it was, so the lag
    grows with the clock."""
    gauge = metrics.JOURNEY_SWEEP_THROUGH
    gauge.set(0)
    await db.execute(
        "INSERT INTO journey_sweep (swept_to) VALUES (now() - make_interval(secs => $1) - interval '3 hours') "
        "ON CONFLICT (one) DO UPDATE SET swept_to = EXCLUDED.swept_to",
        float(TIMEOUT),
    )
    t0 = time.time()
    await maintenance_once(pool, svc.settings, TABLE)
    through = gauge._value.get()
    assert t0 - 1 <= through <= time.time()  # caught up: due through the round's own time

    c = await card_with(svc, db, 2000)
    await metro(svc, c, A, "in")
    await db.execute("UPDATE purse SET journey = journey || '{\"bogus\": 1}' WHERE card_id = $1", c["card_id"])
    stuck = dataclasses.replace(TABLE, rules=dataclasses.replace(TABLE.rules, journey_timeout_s=0))
    await asyncio.sleep(1.1)  # the entry is due under a 0-second timeout
    with pytest.raises(MaintenanceFailed, match=r"^sweep$"):
        await maintenance_once(pool, svc.settings, stuck)
    assert gauge._value.get() == through


async def test_a_new_journal_partition_does_not_wait_for_a_long_reader(
    svc: ServiceHarness, db: asyncpg.Connection, db_dsn: str, pool: asyncpg.Pool
) -> None:
    """Maintenance makes next months' journal partitions while a long reader holds its snapshot of the
    journal (`cardsvc audit`, a clearing run, pg_dump). Made with CREATE TABLE ... PARTITION OF, the
    partition waited for the reader (ACCESS EXCLUSIVE on the journal) and failed after lock_timeout, with
    every journal write queued behind it meanwhile; attached, it needs no lock the reader or writers hold."""
    c = await card_with(svc, db, 2000)
    ahead = await db.fetchval("SELECT 'txn_journal_' || to_char(date_trunc('month', now()) + interval '2 months', 'YYYYMM')")
    await db.execute(f"DROP TABLE IF EXISTS {ahead}")
    reader = await asyncpg.connect(db_dsn)
    try:
        snapshot = reader.transaction(isolation="repeatable_read", readonly=True)
        await snapshot.start()
        await reader.fetchval("SELECT count(*) FROM txn_journal")
        await maintenance_once(pool, svc.settings)  # no MaintenanceFailed("partitions")
        assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", ahead)
        await metro(svc, c, A, "in")  # and the journal takes writes
        await snapshot.rollback()
    finally:
        await reader.close()
    # The attached partition is the journal's like the others: bounds, indexes, and rows written through
    # the journal land in it with the journal's txn_id.
    bounds = await db.fetchval("SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = $1", ahead)
    assert bounds.startswith("FOR VALUES FROM ("), bounds
    indexes = await db.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = $1", ahead)
    assert indexes == await db.fetchval(
        "SELECT count(*) FROM pg_indexes WHERE tablename = (SELECT relname FROM pg_class WHERE oid = "
        "(SELECT inhrelid FROM pg_inherits WHERE inhparent = 'txn_journal'::regclass LIMIT 1))"
    )
    month = await db.fetchval("SELECT date_trunc('month', now()) + interval '2 months' + interval '1 day'")
    txn = await db.fetchval(
        """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty)
           VALUES ($1, 3, 'T-p', 1, 0, 1, $2, 'x') RETURNING txn_id""",
        c["card_id"], month,
    )  # fmt: skip
    assert await db.fetchval(f"SELECT txn_id FROM {ahead}") == txn
    assert txn > await db.fetchval("SELECT max(txn_id) FROM txn_journal WHERE txn_id <> $1", txn)


async def test_a_connection_that_cannot_release_the_sweep_lock_is_closed(db_dsn: str) -> None:
    """The pool does not reset the connections it takes back, so a pooled session still holding the
    sweep's lock would make every later sweep of every worker skip. A session whose unlock fails (here:
    inside a failed transaction, where a session lock outlives the rollback) is closed, which frees it."""
    conn = await asyncpg.connect(db_dsn)
    other = await asyncpg.connect(db_dsn)
    try:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", sweep._LOCK_KEY)
        tx = conn.transaction()
        await tx.start()
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval("SELECT 1 / 0")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await sweep._unlock(conn)
        assert conn.is_closed()
        for _ in range(200):  # the server ends the closed session on its own time
            if await other.fetchval("SELECT pg_try_advisory_lock($1)", sweep._LOCK_KEY):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the sweep lock stayed held")
        await sweep._unlock(other)  # released normally: the connection stays open
        assert not other.is_closed()
    finally:
        await other.close()
        if not conn.is_closed():
            await conn.close()


async def test_workers_making_the_same_journal_partition_at_once_do_not_fail(
    svc: ServiceHarness, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """Every worker's maintenance makes the months ahead as it starts, so the workers of a service do it at
    the same moment. Both saw the month missing and made it, and one failed on the catalog's unique index:
    a failed maintenance step logged at nearly every start of a service with several workers."""
    ahead = await db.fetchval(
        "SELECT 'txn_journal_' || to_char(date_trunc('month', now()) + interval '2 months', 'YYYYMM')"
    )
    for _ in range(5):
        await db.execute(f"DROP TABLE IF EXISTS {ahead}")
        await asyncio.gather(*(maintenance_once(pool, svc.settings) for _ in range(3)))  # no MaintenanceFailed
        assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", ahead)
