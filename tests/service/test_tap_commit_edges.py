"""The tap batch's failure paths (real PostgreSQL), against docs/api.md "Retries": an online tap's `timeout`
did not commit. A resend of a committed tap whose batch meets a held purse, and a batch whose COMMIT went
unanswered (its command timeout, or its session ended under it) but committed, are answered with their
outcome; a statement cancelled on the server (rolled back) is a 503, not a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cardsvc.config import Settings, load_settings
from cardsvc.http.keys import SERVICES
from cardsvc.store.embedded import EmbeddedPostgres
from tests.helpers import ServiceHarness, until_lock_waits
from tests.transit.test_taps import BUS_FARE, funded_card, tap_body

TAP = "/v1/transit/taps"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # db_pool_max 2: one tap flush at a time (flushes_max = pool // 2), so taps sent meanwhile queue together.
    return load_settings({}, data_dir=tmp_path, db_pool_min=1, db_pool_max=2, log_format="text")


async def _queued(svc: ServiceHarness, n: int) -> None:
    """Return once `n` taps wait in the tap batcher's queue (bounded poll, not a timed assertion)."""
    taps = svc.app[SERVICES].taps
    for _ in range(500):
        if len(taps._pending) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} taps never queued")


async def _stored(db: asyncpg.Connection, terminal_id: str, seq: int) -> str | None:
    return await db.fetchval(  # type: ignore[no-any-return]
        "SELECT result FROM terminal_txn WHERE terminal_id = $1 AND terminal_seq = $2", terminal_id, seq
    )


# ------------------------------------------------------------------ 1. a committed tap's resend answered `timeout`


@pytest.mark.parametrize("other_card_in_batch", [False, True], ids=["all_held", "isolated"])
async def test_a_resend_of_a_committed_tap_is_not_answered_timeout_when_its_batch_meets_a_held_purse(
    svc: ServiceHarness, db: asyncpg.Connection, other_card_in_batch: bool
) -> None:
    """The validator lost the answer of tap T (approved, committed) and resends it. The resend shares a
    batch with a new tap of the same card, whose purse a card-office transaction holds past lock_timeout.
    The resend needs no lock (its answer is stored; `_attempt` locks only the taps it decides), but
    `process_taps` marks every tap of a held card HELD (or, when every tap is on held cards, fails the whole
    batch with 55P03): the resend is answered 503 `timeout`, "did not commit", for a tap that committed.
    A validator that trusts the documented meaning lets the rider tap again under a new sequence number:
    charged twice."""
    x = await funded_card(svc, 1000)
    gate_card = await funded_card(svc, 1000)
    other = await funded_card(svc, 1000) if other_card_in_batch else None
    tid = svc.terminals["transit_validator"].terminal_id
    t = tap_body(svc, x["card_sn"])
    first = await svc.post(TAP, t, as_="transit_validator")
    assert first.status == 200 and first.body["result"] == "approved", first.body
    assert await _stored(db, tid, t["terminal_seq"]) == "approved"

    holder, gate = await asyncpg.connect(svc.dsn), await asyncpg.connect(svc.dsn)
    try:
        async with holder.transaction():  # a card-office change on X, longer than lock_timeout
            await holder.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", x["card_id"])
            async with gate.transaction():  # holds the only flush, so that the taps below share one batch
                await gate.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", gate_card["card_id"])
                ahead = asyncio.ensure_future(
                    svc.post(TAP, tap_body(svc, gate_card["card_sn"]), as_="transit_validator")
                )
                await until_lock_waits(db)
                bodies = [t, tap_body(svc, x["card_sn"])]  # the resend of T, and the rider's next tap on X
                if other is not None:
                    bodies.append(tap_body(svc, other["card_sn"]))
                batch = asyncio.gather(*(svc.post(TAP, b, as_="transit_validator") for b in bodies))
                await _queued(svc, len(bodies))
            assert (await ahead).status == 200
            answers = await batch  # X's purse is still held: the batch meets lock_timeout
    finally:
        await holder.close()
        await gate.close()

    resend = answers[0]
    # Precondition: T is committed (it was answered 200 above).
    assert await _stored(db, tid, t["terminal_seq"]) == "approved"
    assert (
        await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", x["card_id"]) == 1000 - BUS_FARE
    )
    # The defect: a 503 `timeout` ("did not commit") for a key that is committed.
    assert not (resend.status == 503 and resend.body.get("code") == "timeout"), resend.body
    assert resend.status == 200 and resend.body["replayed_answer"] is True, resend.body
    assert resend.body["txn_id"] == first.body["txn_id"], resend.body


# ------------------------------------------------------------------ 2. a commit of unknown outcome answered `timeout`


async def _own_service(
    own_dsn: str, keys: object, tmp_path: Path, aiohttp_client: Any, **settings: Any
) -> ServiceHarness:
    """A service on the test's own PostgreSQL (whose server settings the test may change)."""
    loaded = load_settings({}, data_dir=tmp_path, db_pool_min=1, db_pool_max=4, log_format="text", **settings)
    harness = ServiceHarness(own_dsn, keys, loaded)  # type: ignore[arg-type]
    await harness.start(aiohttp_client)
    return harness


@pytest.fixture
async def sync_rep_svc(
    own_postgres: EmbeddedPostgres,
    own_dsn: str,
    keys_for_process,
    tmp_path: Path,
    aiohttp_client,  # type: ignore[no-untyped-def]
) -> AsyncIterator[tuple[ServiceHarness, EmbeddedPostgres]]:
    yield await _own_service(own_dsn, keys_for_process, tmp_path, aiohttp_client, db_command_timeout_s=0.5), own_postgres


@pytest.fixture
async def lost_conn_svc(
    own_postgres: EmbeddedPostgres,
    own_dsn: str,
    keys_for_process,
    tmp_path: Path,
    aiohttp_client,  # type: ignore[no-untyped-def]
) -> AsyncIterator[tuple[ServiceHarness, EmbeddedPostgres]]:
    yield await _own_service(own_dsn, keys_for_process, tmp_path, aiohttp_client), own_postgres


@contextlib.asynccontextmanager
async def _standby_required(admin_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """While inside: every commit waits for a synchronous standby that does not exist (the admin session
    given, to watch and end backends)."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'cardsvc_review_no_such_standby'")
        await admin.execute("SELECT pg_reload_conf()")
        yield admin
    finally:
        await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()


async def _commits_wait_for_a_standby(dsn: str) -> bool:
    """Whether a commit now waits for a (missing) synchronous standby: a write's COMMIT past 0.2 s."""
    probe = await asyncpg.connect(dsn)
    try:
        await probe.execute("BEGIN; CREATE TEMP TABLE review_probe (x int)")  # writes WAL (the catalog)
        try:
            await probe.execute("COMMIT", timeout=0.2)
        except TimeoutError:
            return True
        return False
    finally:
        probe.terminate()


async def test_a_tap_whose_commit_outlasts_the_command_timeout_is_not_answered_timeout_when_it_committed(
    sync_rep_svc: tuple[ServiceHarness, EmbeddedPostgres],
) -> None:
    """The tap batch's COMMIT takes longer than `db_command_timeout_s` (here: synchronous replication
    waiting for a standby; a stalled fsync does the same). asyncpg raises TimeoutError and sends a cancel;
    the transaction has already committed locally (PostgreSQL: "The transaction has already committed
    locally"), so the rider is charged. The middleware maps that TimeoutError to 503 `timeout`, the answer
    docs/api.md promises "did not commit" for an online tap."""
    svc, server = sync_rep_svc
    admin_dsn = server.dsn("postgres")
    card = await funded_card(svc, 1000)
    body = tap_body(svc, card["card_sn"])
    tid = svc.terminals["transit_validator"].terminal_id
    async with _standby_required(admin_dsn):
        for _ in range(200):
            if await _commits_wait_for_a_standby(admin_dsn):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("commits never started waiting for the standby")
        r = await svc.post(TAP, body, as_="transit_validator")

    db = await asyncpg.connect(svc.dsn)
    try:
        for _ in range(200):  # the cancelled wait ends the commit; its backend then leaves the transaction
            stored = await _stored(db, tid, body["terminal_seq"])
            if stored is not None:
                break
            await asyncio.sleep(0.05)
        balance = await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card["card_id"])
    finally:
        await db.close()
    # Precondition: the tap committed (charged) even though its COMMIT's acknowledgement came too late.
    assert (stored, balance) == ("approved", 1000 - BUS_FARE), (stored, balance, r.status, r.body)
    # Not `timeout` ("did not commit") for a charge that committed: its commit is looked up, and answered.
    assert not (r.status == 503 and r.body.get("code") == "timeout"), r.body
    assert r.status == 200 and r.body["result"] == "approved" and r.body["fare_fen"] == BUS_FARE, r.body


async def test_a_tap_whose_commit_lost_its_connection_but_committed_is_answered_as_decided(
    lost_conn_svc: tuple[ServiceHarness, EmbeddedPostgres],
) -> None:
    """The batch's COMMIT is under way (here it waits for a synchronous standby) when its session is ended
    (a failover, a cut network, an operator ending the session): the transaction has committed locally, the
    rider is charged. docs/api.md "Retries": such a batch ("a lost connection") is looked up on another
    connection and, committed, answered as decided. asyncpg reports the lost connection as
    ConnectionDoesNotExistError, which the batch did not count as an unanswered COMMIT: the validator got
    503 `db_unavailable` for a tap approved and charged, and a gate that took it as "not charged" would turn
    away a rider who had paid (or charge them again on a new tap)."""
    svc, server = lost_conn_svc
    admin_dsn = server.dsn("postgres")
    card = await funded_card(svc, 1000)
    body = tap_body(svc, card["card_sn"])
    tid = svc.terminals["transit_validator"].terminal_id
    async with _standby_required(admin_dsn) as admin:
        await asyncio.sleep(0.3)
        pending = asyncio.ensure_future(svc.post(TAP, body, as_="transit_validator"))
        for _ in range(200):  # the batch's COMMIT waits for the standby
            pid = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'cardsvc' AND wait_event = 'SyncRep'"
            )
            if pid is not None:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the batch's commit never waited for the standby")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        r = await pending

    db = await asyncpg.connect(svc.dsn)
    try:
        stored = await db.fetchval(
            "SELECT result FROM terminal_txn WHERE terminal_id = $1 AND terminal_seq = $2", tid, body["terminal_seq"]
        )
        balance = await db.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1", card["card_id"])
    finally:
        await db.close()
    # Precondition: the tap committed: the rider was charged.
    assert (stored, balance) == ("approved", 1000 - BUS_FARE), (stored, balance, r.status, r.body)
    # Answered as decided: its commit is looked up on another connection.
    assert r.status == 200 and r.body["result"] == "approved" and r.body["fare_fen"] == BUS_FARE, (r.status, r.body)


# ------------------------------------------------------------------ 3. a cancelled statement answered 500


async def test_a_tap_batch_whose_statement_is_cancelled_is_a_503_not_a_500(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The batch's statement is cancelled on the server (SQLSTATE 57014 query_canceled: a role's
    statement_timeout, or an operator's pg_cancel_backend while it waits for a purse). The transaction
    rolled back, nothing was written, a resend is safe: that is 503 with Retry-After, like 55P03. The
    middleware only treats 08xxx/57Pxx as unavailable and 55P03/40P01/40001 as contention, so 57014 falls
    through to 500 `internal` ("a bug: report it"), without Retry-After."""
    card = await funded_card(svc, 1000)
    body = tap_body(svc, card["card_sn"])
    tid = svc.terminals["transit_validator"].terminal_id
    holder = await asyncpg.connect(svc.dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", card["card_id"])
            pending = asyncio.ensure_future(svc.post(TAP, body, as_="transit_validator"))
            await until_lock_waits(db)
            cancelled = await db.fetchval(
                """SELECT count(*) FILTER (WHERE pg_cancel_backend(a.pid)) FROM pg_locks l
                   JOIN pg_stat_activity a ON a.pid = l.pid
                   WHERE NOT l.granted AND a.application_name = 'cardsvc' AND a.datname = current_database()"""
            )
            assert cancelled == 1
            r = await pending
    finally:
        await holder.close()
    assert await _stored(db, tid, body["terminal_seq"]) is None  # rolled back
    assert r.status == 503 and r.headers.get("Retry-After"), (r.status, r.body)


# ------------------------------------------------------------------ 4. the lookup of an unanswered commit


async def test_an_unanswered_commit_is_looked_up_and_an_undecided_one_is_db_unavailable(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """taps._committed asks another connection what became of the transaction: committed, rolled back, or,
    while it is still in progress after its tries, `db_unavailable` (may have committed: resend the same
    terminal_seq), never `timeout`."""
    from cardsvc.errors import ApiError
    from cardsvc.transit import taps

    pool = svc.app[SERVICES].pool
    other = await asyncpg.connect(svc.dsn)
    try:
        for ending in ("COMMIT", "ROLLBACK"):
            await other.execute("BEGIN")
            xid = await other.fetchval("SELECT txid_current()")
            await other.execute(ending)
            assert await taps._committed(pool, xid) is (ending == "COMMIT")
        await other.execute("BEGIN")
        xid = await other.fetchval("SELECT txid_current()")
        with pytest.raises(ApiError) as unknown:
            await taps._committed(pool, xid)
        assert unknown.value.code == "db_unavailable" and "same terminal_seq" in str(unknown.value.detail)
        await other.execute("ROLLBACK")
    finally:
        await other.close()
