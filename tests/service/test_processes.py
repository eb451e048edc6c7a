"""The real `cardsvc` command in subprocesses: worker processes sharing one port, graceful shutdown,
the database going away and coming back, migrations at start-up, and the CLI's help.

Each test starts `cardsvc serve` against its own database (the pg_admin_dsn/db_dsn fixtures, or its own
embedded server for the database-down test) with a fresh key file, and talks to it over TCP. Waiting is
always a bounded poll for a condition (readiness, a lock wait, a refused connection), never a timed
assertion.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from cardsvc import demo, localtime
from cardsvc.cli import build_parser
from cardsvc.security.keys import KeyRing
from cardsvc.store import migrate
from cardsvc.store.embedded import EmbeddedPostgres
from protocols import population
from tests.helpers import migrated_before, scratch_database
from tests.service.serving import (
    POLL_ATTEMPTS,
    POLL_INTERVAL_S,
    PROBLEM_JSON,
    Service,
    cli_command,
    free_port,
    load_people,
    metric_samples,
    poll,
    refuses_connections,
    service_env,
)

pytestmark = pytest.mark.slow


def _metrics_dir_owners(tmp: Path) -> list[int]:
    """The supervisor pids named by the multi-worker metrics directories in `tmp`."""
    return sorted(int(p.name.split("-")[2]) for p in tmp.glob("cardsvc-metrics-*"))


def _per_worker_requests(tmp: Path) -> dict[int, float]:
    """Requests counted by each worker, from the per-process files of the shared metrics directory."""
    counts: dict[int, float] = {}
    for path in tmp.glob("cardsvc-metrics-*/counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):
            for sample in metric.samples:
                if sample.name == "cardsvc_http_requests_total" and sample.labels["route"].startswith("/v1"):
                    counts[pid] = counts.get(pid, 0) + sample.value
    return counts


# ------------------------------------------------------------------ (a) several workers, one truth


async def test_two_workers_share_single_use_and_metrics(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    keys = keys_for_process
    await load_people(db_dsn, keys, 10)
    svc = Service(tmp_path, db_dsn, keys, workers=2)
    await svc.add_terminal("merchant_pos")
    await svc.add_terminal("card_office")
    try:
        svc.start()
        await svc.wait_ready()
        worker_pids = svc.listening_pids()

        # One e-card code presented 40 times at once, over 40 connections: exactly one is accepted.
        index = next(i for i in range(10) if population.person(i, demo.DEMO_SEED).has_ecard)
        code = demo.demo_device(index).next_code(int(time.time()))
        presentations = 40
        answers = await asyncio.gather(
            *(
                svc.post("/v1/ecard-codes/verify", {"code": code, "business_type": "02"}, as_="merchant_pos")
                for _ in range(presentations)
            )
        )
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200] + [422] * (presentations - 1), statuses
        assert {body["code"] for status, _, body in answers if status == 422} == {"credential_replayed"}

        # The same signed request bytes sent 40 times: the nonce is accepted once, across both workers.
        card_no = population.person(0, demo.DEMO_SEED).card_no
        path = f"/v1/cards/{card_no}"
        headers = svc.signed_headers("GET", path, b"", "card_office")
        replays = 40
        answers = await asyncio.gather(*(svc.send("GET", path, b"", headers) for _ in range(replays)))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200] + [401] * (replays - 1), statuses
        assert {body["code"] for status, _, body in answers if status == 401} == {"auth_replayed"}
        ok = next(body for status, _, body in answers if status == 200)
        assert ok["card_no"] == card_no

        # Both workers answered some of them, and /metrics (served by either) adds them all up.
        per_worker = _per_worker_requests(tmp_path)
        assert set(per_worker) == worker_pids and all(n > 0 for n in per_worker.values()), per_worker
        assert sum(per_worker.values()) == presentations + replays
        for _ in range(4):  # whichever worker answers /metrics, the totals are the same
            status, _, text = await svc.send("GET", "/metrics")
            assert status == 200
            samples = metric_samples(text, "cardsvc_http_requests_total")
            v1 = {
                (labels["route"], labels["status"]): value
                for labels, value in samples
                if labels["route"].startswith("/v1")
            }
            assert v1 == {
                ("/v1/ecard-codes/verify", "200"): 1,
                ("/v1/ecard-codes/verify", "422"): presentations - 1,
                ("/v1/cards/{card_no}", "200"): 1,
                ("/v1/cards/{card_no}", "401"): replays - 1,
            }, v1
            verifications = {
                labels["outcome"]: value
                for labels, value in metric_samples(text, "cardsvc_credential_verifications_total")
            }
            assert verifications == {"ok": 1, "replayed": presentations - 1}, verifications
            assert sum(value for _, value in samples) < svc.responses  # /metrics is counted after it answers

        assert await svc.terminate() == 0, svc.log()[-4000:]
        leftovers = await asyncio.to_thread(lambda: list(tmp_path.glob("cardsvc-metrics-*")))
        assert not leftovers, "the metrics directory is removed on exit"
    finally:
        await svc.close()


# ------------------------------------------------------------------ (b) graceful shutdown


async def test_sigterm_lets_in_flight_requests_finish(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    keys = keys_for_process
    cards = 6
    await load_people(db_dsn, keys, cards)
    card_nos = [population.person(i, demo.DEMO_SEED).card_no for i in range(cards)]
    svc = Service(tmp_path, db_dsn, keys, workers=2)
    await svc.add_terminal("card_office")
    blocker = await asyncpg.connect(db_dsn)
    watcher = await asyncpg.connect(db_dsn)
    db_name = await blocker.fetchval("SELECT current_database()")
    try:
        svc.start()
        await svc.wait_ready()
        # Hold every card's row lock so that the loss reports are in flight, waiting inside the service.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM card WHERE card_no = ANY($1::text[]) FOR UPDATE", card_nos)
        in_flight = [
            asyncio.ensure_future(
                svc.post(f"/v1/cards/{n}/temporary-loss", {"operator": "staff-1"}, as_="card_office")
            )
            for n in card_nos
        ]

        async def all_waiting() -> bool:
            # Not from the blocker: statistics views are a snapshot for the rest of a transaction.
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                db_name,
            )
            return bool(waiting == cards)

        await poll("the requests to wait on the row locks", all_waiting)
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)

        async def refusing() -> bool:
            return await asyncio.to_thread(refuses_connections, svc.port)

        await poll("the service to stop accepting connections", refusing)
        assert not any(f.done() for f in in_flight)
        await tx.commit()  # the requests go on and finish with their normal answer

        answers = await asyncio.gather(*in_flight)
        for status, _, body in answers:
            assert status == 200, body
            assert body["status"] == "temporary_loss", body
        assert await asyncio.to_thread(svc.proc.wait, 60) == 0, svc.log()[-4000:]
        assert refuses_connections(svc.port)
        statuses = await blocker.fetch("SELECT status FROM card WHERE card_no = ANY($1::text[])", card_nos)
        assert len(statuses) == cards and len({r["status"] for r in statuses}) == 1
        assert "shutting down" in svc.log()
    finally:
        await blocker.close()
        await watcher.close()
        await svc.close()


async def test_workers_stop_when_their_supervisor_is_killed(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """The supervisor alone is killed (SIGKILL, the OOM killer). Its workers used to serve on, unsupervised,
    holding the port: the service could not be started again. They drain and stop; a new start works, and
    removes the metrics directory the killed supervisor could not (each such kill used to leave one)."""
    keys = keys_for_process
    await load_people(db_dsn, keys, 2)
    card_no = population.person(0, demo.DEMO_SEED).card_no
    svc = Service(tmp_path, db_dsn, keys, workers=2)
    await svc.add_terminal("card_office")
    try:
        svc.start()
        await svc.wait_ready()
        workers = svc.live_worker_pids()
        assert svc.proc is not None
        svc.proc.kill()
        svc.proc.wait()

        async def workers_gone() -> bool:
            return not svc.live_worker_pids() and refuses_connections(svc.port)

        await poll("the workers of a killed supervisor to stop", workers_gone)
        log = svc.log()
        assert log.count("supervisor gone; shutting down") == len(workers), log[-3000:]
        assert log.count('"msg":"stopped"') == len(workers), log[-3000:]  # drained, as on SIGTERM
        killed = svc.proc.pid
        assert _metrics_dir_owners(tmp_path) == [killed]  # nobody removed the killed one's metrics

        svc.start()
        await svc.wait_ready()
        status, _, body = await svc.get(f"/v1/cards/{card_no}")
        assert status == 200, body
        assert _metrics_dir_owners(tmp_path) == [svc.proc.pid] != [killed]  # the new start removed it
    finally:
        await svc.close()


# ------------------------------------------------------------------ (c) the database goes away


async def test_database_down_answers_503_then_recovers(
    own_postgres: EmbeddedPostgres, own_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    keys = keys_for_process
    dsn = own_dsn
    await load_people(dsn, keys, 2)
    card_no = population.person(0, demo.DEMO_SEED).card_no
    svc = Service(tmp_path, dsn, keys)
    await svc.add_terminal("card_office")
    try:
        svc.start()
        await svc.wait_ready()
        status, _, body = await svc.get(f"/v1/cards/{card_no}")
        assert status == 200, body

        own_postgres.stop("immediate")

        answers = []

        async def unavailable() -> bool:
            status, headers, body = await svc.get(f"/v1/cards/{card_no}")
            answers.append((status, body))
            if status == 503:
                assert headers["Content-Type"].startswith(PROBLEM_JSON), headers
                assert body["code"] == "db_unavailable" and body["status"] == 503, body
                assert int(headers["Retry-After"]) > 0
                return True
            return False

        try:
            await poll("the API to report the database unavailable", unavailable)
        except AssertionError:
            raise AssertionError(f"{answers[:3]} ... {answers[-3:]}\n{svc.log()[-3000:]}") from None
        status, _, body = await svc.get("/readyz", sign=False)
        assert status == 503 and body["database"] == "unreachable", body
        status, _, body = await svc.get("/healthz", sign=False)
        assert status == 200 and body == {"status": "ok"}
        assert svc.proc is not None and svc.proc.poll() is None

        own_postgres.start()

        async def recovered() -> bool:
            status, _, _ = await svc.get(f"/v1/cards/{card_no}")
            return status == 200

        await poll("the service to recover once the database is back", recovered)
        status, _, body = await svc.get("/readyz", sign=False)
        assert status == 200, body
        assert await svc.terminate() == 0, svc.log()[-4000:]
        assert "database unavailable" in svc.log()
    finally:
        await svc.close()


# ------------------------------------------------------------------ (d) migrations at start-up


@pytest.fixture
async def empty_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    name = f"cardsvc_empty_{os.getpid()}_{time.monotonic_ns()}"
    async with scratch_database(pg_admin_dsn, name) as dsn:
        yield dsn


def _run_cli(tmp: Path, dsn: str, key_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli_command(), *args],
        env=service_env(tmp, dsn, key_file, free_port()),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_refuses_an_unmigrated_database(
    empty_dsn: str, keys_for_process: KeyRing, tmp_path: Path, workers: int
) -> None:
    key_file = tmp_path / "keys.json"
    keys_for_process.write(key_file)
    result = await asyncio.to_thread(
        _run_cli, tmp_path, empty_dsn, key_file, "serve", "--workers", str(workers)
    )
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "cardsvc migrate" in out and "pending" in out, out
    assert "Traceback" not in out, out


async def test_workers_failing_at_start_up_stop_the_service(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """A worker that cannot start (here: the fare table file is missing) is not restarted forever."""
    key_file = tmp_path / "keys.json"
    keys_for_process.write(key_file)
    result = await asyncio.to_thread(
        subprocess.run,
        [*cli_command(), "serve", "--workers", "2"],
        env=service_env(tmp_path, db_dsn, key_file, free_port(), CARDSVC_FARE_TABLE=str(tmp_path / "missing.toml")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "keep failing at start-up" in result.stdout + result.stderr


async def test_migrate_check_then_migrate(empty_dsn: str, keys_for_process: KeyRing, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    keys_for_process.write(key_file)
    check = await asyncio.to_thread(_run_cli, tmp_path, empty_dsn, key_file, "migrate", "--check")
    assert check.returncode == 1, check
    assert "pending: 0001_core" in check.stdout
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('card')") is None  # --check changed nothing
    finally:
        await conn.close()
    done = await asyncio.to_thread(_run_cli, tmp_path, empty_dsn, key_file, "migrate")
    assert done.returncode == 0, done
    assert "applied 0001_core" in done.stdout
    check = await asyncio.to_thread(_run_cli, tmp_path, empty_dsn, key_file, "migrate", "--check")
    assert check.returncode == 0, check
    assert "schema is current" in check.stdout


ROOT = Path(__file__).resolve().parents[2]
_PARTITION_INDEXES = """
SELECT ic.relname, ic.oid, x.indisvalid, pg_get_indexdef(ic.oid) AS def FROM pg_inherits i
JOIN pg_index x ON x.indrelid = i.inhrelid JOIN pg_class ic ON ic.oid = x.indexrelid
JOIN pg_am am ON am.oid = ic.relam
WHERE i.inhparent = 'txn_journal'::regclass AND am.amname = 'brin'
"""
_ADD_COLUMN = "ALTER TABLE txn_journal ADD COLUMN IF NOT EXISTS posted_at timestamptz NOT NULL DEFAULT '-infinity'"


def _psql_script(dsn: str, script: Path) -> subprocess.CompletedProcess[str]:
    psql = EmbeddedPostgres(Path(tempfile.gettempdir())).tool("psql")
    return subprocess.run([str(psql), dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


async def test_migration_0007_attaches_the_indexes_built_beforehand(empty_dsn: str) -> None:
    """docs/operations.md "Upgrading a large journal": deploy/sql/0007_before_migrate.sql run by psql,
    after an interrupted build left an INVALID index, then the migration, which attaches the script's
    indexes; and the migration refuses to attach an INVALID one."""
    conn = await asyncpg.connect(empty_dsn)
    other = await asyncpg.connect(empty_dsn)
    try:
        await migrated_before(conn, 7)  # the schema before 0007
        insert = ("INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at) "
                  "VALUES (1, 1, 'v1', $1, -180, 1, now())")  # fmt: skip
        await conn.execute(insert, 1)
        partition = await conn.fetchval("SELECT tableoid::regclass::text FROM txn_journal")

        # An interrupted build: CONCURRENTLY waits for a writer's transaction, and its timeout cancels it.
        await conn.execute(_ADD_COLUMN)
        tx = other.transaction()
        await tx.start()
        await other.execute(insert, 2)
        await conn.execute("SET statement_timeout = '500ms'")
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.execute(f"CREATE INDEX CONCURRENTLY {partition}_greatest_idx ON {partition} "
                               "USING brin ((greatest(at, posted_at))) WITH (autosummarize = on)")  # fmt: skip
        await tx.rollback()
        await conn.execute("RESET statement_timeout")
        assert [r["indisvalid"] for r in await conn.fetch(_PARTITION_INDEXES)] == [False]
        # The migration does not attach it: it fails and changes nothing.
        with pytest.raises(asyncpg.RaiseError, match="INVALID"):
            await migrate.apply(conn)
        later = [m.version for m in migrate.available()[6:]]  # 0007 and what came after it
        assert [m.version for m in await migrate.pending(conn)] == later

        script = _psql_script(empty_dsn, ROOT / "deploy" / "sql" / "0007_before_migrate.sql")
        assert script.returncode == 0, script.stdout + script.stderr
        built = {r["relname"]: r for r in await conn.fetch(_PARTITION_INDEXES)}
        partitions = await conn.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'txn_journal'::regclass")
        assert len(built) == partitions and all(r["indisvalid"] for r in built.values())
        assert all("autosummarize='on'" in r["def"] for r in built.values()), built
        # Until the release, a row keeps its ride day: the running release still clears by ride time.
        await conn.execute(insert, 3)
        assert await conn.fetchval("SELECT count(*) FROM txn_journal WHERE posted_at <> '-infinity'") == 0
        assert _psql_script(empty_dsn, ROOT / "deploy" / "sql" / "0007_before_migrate.sql").returncode == 0

        assert [m.version for m in await migrate.apply(conn)] == later
        attached = await conn.fetch(
            """SELECT c.relname, c.oid FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
               WHERE p.relname = 'txn_journal_clearing_day'"""
        )
        assert {r["relname"]: r["oid"] for r in attached} == {n: r["oid"] for n, r in built.items()}  # not rebuilt
        assert await migrate.pending(conn) == []
        await conn.execute(insert, 4)
        assert await conn.fetchval("SELECT count(*) FROM txn_journal WHERE posted_at <> '-infinity'") == 1
    finally:
        await other.close()
        await conn.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_on_a_port_in_use_says_so_and_exits(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path, workers: int
) -> None:
    """Another service already listens on the port, with SO_REUSEPORT as cardsvc's workers do: serve
    neither hangs (it used to wait forever for its pools) nor joins it (splitting its traffic)."""
    key_file = tmp_path / "keys.json"
    keys_for_process.write(key_file)
    port = free_port()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        result = await asyncio.to_thread(
            subprocess.run,
            [*cli_command(), "serve", "--workers", str(workers)],
            env=service_env(tmp_path, db_dsn, key_file, port),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "address already in use" in out.lower(), out[-2000:]
    assert "Traceback" not in out, out[-2000:]


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("::", "http://[::1]:{port}/healthz"),  # IPv6 only (as the workers bind it), an IPv4 service on the port
        ("0.0.0.0", "http://127.0.0.1:{port}/healthz"),  # every IPv4 interface (an empty host is refused)
    ],
)
async def test_serve_probes_the_port_as_its_workers_bind_it(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path, host: str, url: str
) -> None:
    svc = Service(tmp_path, db_dsn, keys_for_process, workers=2)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ipv4_only:
        if host == "::":
            ipv4_only.bind(("127.0.0.1", svc.port))
            ipv4_only.listen()
        svc.start(CARDSVC_HOST=host)
        try:
            for _ in range(POLL_ATTEMPTS):
                assert svc.proc is not None and svc.proc.poll() is None, svc.log_path.read_text(errors="replace")[-1500:]
                try:
                    async with svc.http.get(url.format(port=svc.port)) as r:
                        if r.status == 200:
                            break
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(POLL_INTERVAL_S)
            else:
                raise AssertionError("never served")
            assert await svc.terminate() == 0
        finally:
            await svc.close()


# ------------------------------------------------------------------ (d2) the demo, from a shell


def _demo_people_with_each_concession(on: dt.date) -> dict[str | None, int]:
    """The first demo person of each concession kind (None: no concession) on the city's date `on`."""
    first: dict[str | None, int] = {}
    for i in range(2_000):
        first.setdefault(population.concession(i, on, demo.DEMO_SEED), i)
        if len(first) == 4:
            return first
    raise AssertionError(f"not every concession kind among 2,000 demo people: {first}")


async def test_demo_data_registers_concessions_and_a_shell_tap_pays_by_them(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """The README's path: `cardsvc demo-data`, then `cardsvc demo-credential tap | cardsvc call ...`.
    Demo people hold the concessions `cardsvc seed` would give them, and their bus taps pay by them."""
    svc = Service(tmp_path, db_dsn, keys_for_process)
    env = service_env(tmp_path, db_dsn, svc.key_file, svc.port)
    today = localtime.local_date(dt.datetime.now(dt.UTC))
    people = _demo_people_with_each_concession(today)
    count = max(people.values()) + 1
    # The README's and docs/api.md's examples: person 9 pays the card fare, person 2 rides free.
    assert people[None] == 9 and population.concession(2, today, demo.DEMO_SEED) == "elderly"

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli_command(), *args], env=env, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )

    loaded = await asyncio.to_thread(cli, "demo-data", "--cards", str(count))
    assert loaded.returncode == 0, loaded.stderr[-2000:]

    def concessions_on(day: dt.date) -> dict[int, str]:
        return {i + 1: kind for i in range(count) if (kind := population.concession(i, day, demo.DEMO_SEED))}

    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await conn.fetch("SELECT holder_id, kind, quota_year, rides_left FROM concession ORDER BY 1")
        events = await conn.fetch("SELECT holder_id, op, kind_after, terminal_id FROM concession_event ORDER BY 1")

        def loaded_for(day: dt.date) -> bool:
            return {r["holder_id"]: r["kind"] for r in rows} == concessions_on(day) and all(
                (r["quota_year"], r["rides_left"]) == ((day.year, 1_200) if r["kind"] == "elderly" else (None, None))
                for r in rows
            )

        # The command reads its own clock: it loaded for `today`, or for the next day only if local midnight
        # passed after `today` was read (read again now).
        after = localtime.local_date(dt.datetime.now(dt.UTC))
        on = next((day for day in dict.fromkeys([today, after]) if loaded_for(day)), None)
        assert on is not None, [dict(r) for r in rows]
        if on != today:
            people = _demo_people_with_each_concession(on)
        expected = concessions_on(on)
        assert [(e["holder_id"], e["op"], e["kind_after"], e["terminal_id"]) for e in events] == [
            (h, "set", k, "demo") for h, k in expected.items()
        ]
        # The summary names an example of each kind, for the shell.
        for kind in ("elderly", "disabled_free", "disabled_half"):
            assert f"{kind} " in loaded.stderr and f"--index {people[kind]})" in loaded.stderr, loaded.stderr

        # Loading again adds nothing, and does not give back a concession the card office ended.
        await conn.execute("UPDATE concession SET ended_at = now() WHERE holder_id = $1", people["elderly"] + 1)
        again = await asyncio.to_thread(cli, "demo-data", "--cards", str(count))
        assert again.returncode == 0, again.stderr[-2000:]
        assert await conn.fetchval("SELECT count(*) FROM concession_event") == len(expected)
        await conn.execute("UPDATE concession SET ended_at = NULL WHERE holder_id = $1", people["elderly"] + 1)
    finally:
        await conn.close()

    svc.start()
    try:
        await svc.wait_ready()
        fares = {}
        for kind, index in people.items():
            body = await asyncio.to_thread(cli, "demo-credential", "tap", "--index", str(index))
            assert body.returncode == 0, body.stderr
            answer = await asyncio.to_thread(
                cli, "call", "POST", "/v1/transit/taps", "--as", "transit_validator", "--data", "@-",
                "--url", svc.base, stdin=body.stdout,
            )  # fmt: skip
            assert answer.returncode == 0, answer.stdout + answer.stderr
            tap = orjson.loads(answer.stdout)
            assert tap["result"] == "approved", tap
            fares[kind] = (tap["fare_fen"], tap["balance_fen"], tap["rules"][-1])
        # bus-105 costs 200 fen: 180 with the card discount; half fare is half the base fare, no discount.
        assert fares == {
            None: (180, demo.DEMO_PURSE_FEN - 180, "card_discount"),
            "elderly": (0, demo.DEMO_PURSE_FEN, "elderly_free"),
            "disabled_free": (0, demo.DEMO_PURSE_FEN, "disabled_free"),
            "disabled_half": (100, demo.DEMO_PURSE_FEN - 100, "disabled_half"),
        }
        # A metro entry from the shell, too.
        body = await asyncio.to_thread(
            cli, "demo-credential", "tap", "--index", str(people[None]), "--station", "l1-chaotianmen"
        )
        tap_in = orjson.loads(body.stdout)
        assert (tap_in["mode"], tap_in["line_id"], tap_in["direction"]) == ("metro", "L1", "in")
        refused = await asyncio.to_thread(cli, "demo-credential", "tap", "--station", "nowhere")
        assert refused.returncode != 0 and "no station 'nowhere'" in refused.stderr
        assert await svc.terminate() == 0
    finally:
        await svc.close()


# ------------------------------------------------------------------ (e) help


# What the help of these commands must say they do (other commands: a non-empty description).
HELP_MENTIONS = {
    "serve": "run the service",
    "demo": "synthetic population",
    "demo-data": "load demo data",
    "demo-credential": "e-card code",
    "migrate": "apply pending database migrations",
    "db": "embedded postgresql",
    "keys": "key file",
    "config": "effective configuration",
    "terminal": "sign every request",
    "card": "temporary-loss",
    "call": "sign a request",
    "seed": "create --count cardholders",
}


def _subcommands() -> dict[str, str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a.help or "" for a in action._choices_actions}


async def test_help_of_every_command() -> None:
    commands = _subcommands()
    assert set(HELP_MENTIONS) <= set(commands), set(HELP_MENTIONS) - set(commands)

    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *cli_command(),
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, top = await run("--help")
    assert code == 0 and top.startswith("usage: cardsvc"), top
    for name, summary in commands.items():
        assert name in top and summary in top, (name, top)
    results = await asyncio.gather(*(run(name, "--help") for name in commands))
    for (name, _), (code, out) in zip(commands.items(), results, strict=True):
        assert code == 0, (name, out)
        assert out.startswith(f"usage: cardsvc {name}"), out
        description = out.split("\n\n")[1].strip()  # after the usage paragraph
        assert description and summary, (name, out)  # every command says what it does
        assert HELP_MENTIONS.get(name, description).lower() in out.lower(), (name, out)
    code, out = await run("no-such-command")
    assert code == 2 and "invalid choice" in out
