"""Operational faults: two migrations at once, a worker crash while the database is away, and an embedded
data directory whose creation was interrupted. Each test failed before its fix (a review found them).
Real processes, real sockets, as tests/service/test_processes.py does."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from cardsvc import demo
from cardsvc.security.keys import KeyRing
from cardsvc.store import migrate
from cardsvc.store.embedded import EmbeddedPostgres
from protocols import population
from tests.helpers import scratch_database
from tests.service.serving import Service, cli_command, free_port, load_people, poll, service_env

pytestmark = pytest.mark.slow


@pytest.fixture
async def empty_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    name = f"cardsvc_review_{os.getpid()}_{time.monotonic_ns()}"
    async with scratch_database(pg_admin_dsn, name) as dsn:
        yield dsn


# ------------------------------------------------------------------ two `cardsvc migrate` at once


async def test_a_second_migrate_waits_for_the_first_instead_of_failing(
    empty_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """migrate.apply serialises callers with pg_advisory_lock ("several workers or operators may call it at
    once"), but its connection comes from cli._connect, whose init_connection sets lock_timeout = 3s: the
    advisory lock wait is a lock wait. Before, a `cardsvc migrate` (or the `_migrate` of `cardsvc seed`,
    `demo-data`, embedded `serve`) started while another ran a migration longer than 3 s (0007 on a large
    journal: 12 s at 48.6M rows) failed with a lock timeout instead of waiting its turn.

    The first migrate is stood in for by a session holding the migrations' advisory lock, exactly as
    migrate.apply holds it while it applies."""
    key_file = tmp_path / "keys.json"
    keys_for_process.write(key_file)
    first = await asyncpg.connect(empty_dsn)
    try:
        await first.execute("SELECT pg_advisory_lock($1)", migrate._LOCK_KEY)
        proc = await asyncio.create_subprocess_exec(
            *cli_command(), "migrate",
            env=service_env(tmp_path, empty_dsn, key_file, free_port()),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

        async def second_waits() -> bool:
            n = await first.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = $1::oid",
                migrate._LOCK_KEY & 0xFFFFFFFF,
            )
            return bool(n) or proc.returncode is not None

        await poll("the second migrate to wait for the migrations' lock", second_waits)
        # The first migrate is still applying a long migration (here: 5 s, more than the 3 s lock_timeout).
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            pass
        await first.execute("SELECT pg_advisory_unlock($1)", migrate._LOCK_KEY)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await first.close()
    assert proc.returncode == 0, (proc.returncode, out.decode()[-1000:], err.decode()[-1000:])
    assert b"schema is current" in out


# ------------------------------------------------------------------ a worker crash while the database is away


async def test_a_worker_killed_while_the_database_is_down_is_restarted_once_it_is_back(
    own_postgres: EmbeddedPostgres, own_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """docs/operations.md "When the database goes away": requests answer 503, do not restart the service,
    the pool reconnects by itself. A worker that dies meanwhile (the OOM killer, a crash) is restarted
    into a database that does not answer: its replacement fails in create_app within
    WORKER_EARLY_DEATH_S, again and again. Before, after three such deaths server.serve's start-up guard
    (meant for bad settings) stopped the whole service, the healthy worker too, exit 1; under the shipped
    unit, `cardsvc migrate` (ExecStartPre) then failed too while the database was away, and
    StartLimitBurst ended the restarts. Now the guard gives up only when no other worker is alive, and
    the dead one is restarted, a little later each time, until it comes up."""
    keys = keys_for_process
    await load_people(own_dsn, keys, 2)
    card_no = population.person(0, demo.DEMO_SEED).card_no
    svc = Service(tmp_path, own_dsn, keys, workers=2)
    await svc.add_terminal("card_office")
    try:
        svc.start()
        await svc.wait_ready()
        assert svc.proc is not None
        own_postgres.stop("immediate")
        victim = sorted(svc.live_worker_pids())[0]
        os.kill(victim, signal.SIGKILL)
        # A 30-second outage (a failover, a restart of PostgreSQL for a setting).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and svc.proc.poll() is None:  # noqa: ASYNC110 - a process, not an event
            await asyncio.sleep(0.2)
        exited = svc.proc.poll()
        own_postgres.start()
        assert exited is None, f"the service exited with {exited} during the outage:\n{svc.log()[-2500:]}"

        async def recovered() -> bool:
            assert svc.proc is not None and svc.proc.poll() is None, svc.log()[-2500:]
            status, _, _ = await svc.get(f"/v1/cards/{card_no}")
            return status == 200 and len(svc.live_worker_pids()) == 2

        await poll("both workers serving once the database is back", recovered)
    finally:
        await svc.close()


# ------------------------------------------------------------------ an interrupted first start of the embedded server


async def test_an_embedded_data_dir_whose_initdb_was_killed_can_be_started_again() -> None:
    """`cardsvc db start` (or the first `./dev run`, `cardsvc serve`) on a new data dir runs initdb. Killed
    during it (SIGKILL, the OOM killer, a power cut, a container stopped), initdb leaves PG_VERSION,
    which it writes first. Before, EmbeddedPostgres.init() took PG_VERSION for "initialised" and never
    ran initdb again, nor wrote the cardsvc settings (socket directory, listen_addresses = ''): every
    later start failed, and only removing the data dir by hand helped. A marker beside the data dir now
    says an init was in progress: the next one starts it again from an empty dir."""
    base = Path(tempfile.mkdtemp(prefix="cardsvc-review-"))
    data = base / "data"
    pg = data / "pg"
    env = service_env(base, "", base / "keys.json", free_port())
    env.pop("CARDSVC_DATABASE_URL")
    try:
        proc = subprocess.Popen(  # noqa: ASYNC220 - killed with its process group, as a power cut would
            [*cli_command(), "db", "start"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            for _ in range(600):
                if (pg / "PG_VERSION").exists() or proc.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            assert proc.poll() is None, "initdb finished before it could be interrupted"
            assert not (pg / "postgresql.auto.conf").exists() or "cardsvc" not in (
                pg / "postgresql.auto.conf"
            ).read_text(), "initdb finished before it could be interrupted"
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its initdb, as a power cut would
        finally:
            proc.wait()
        # initdb's own children (the bootstrap backend) may outlive it by a moment
        await asyncio.sleep(1.0)

        again = await asyncio.to_thread(
            subprocess.run, [*cli_command(), "db", "start"], env=env, capture_output=True, text=True,
            timeout=180, check=False,
        )  # fmt: skip
        assert again.returncode == 0, (again.returncode, again.stdout[-1500:], again.stderr[-1500:])
        dsn = again.stdout.strip().splitlines()[-1]
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SHOW listen_addresses") == ""
        finally:
            await conn.close()
    finally:
        server = EmbeddedPostgres(pg)
        try:
            server.destroy()
        except Exception:  # best effort: the dir may be half made
            pass
        shutil.rmtree(base, ignore_errors=True)
