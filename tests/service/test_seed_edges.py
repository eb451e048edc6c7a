"""The seeder, the migrations and the embedded PostgreSQL where an operator meets their edges: a data dir
named in Chinese, a moved data dir, a stale postmaster.pid naming another process, an edited migration, an
--append beside the card office's registrations."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from cardsvc import cli, seed
from cardsvc.security.keys import KeyRing
from cardsvc.security.pii import PiiVault
from cardsvc.store import embedded
from cardsvc.store.embedded import EmbeddedPostgres
from tests.service.test_seed import _env

SEED = b"review-seed"
UNIX_SOCKET_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux; PostgreSQL says "maximum 107 bytes"


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    # Not under tmp_path (see tests/service/conftest.py: the server's user must traverse it when root).
    base = Path(tempfile.mkdtemp(prefix="cardsvc-review-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _select_one(server: EmbeddedPostgres) -> int:
    async def go() -> int:
        conn = await asyncpg.connect(server.dsn())
        try:
            return int(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()

    return asyncio.run(go())


# ------------------------------------------------------------------ embedded PostgreSQL


def test_the_socket_path_fits_in_a_unix_socket_for_a_data_dir_with_chinese_characters(
    scratch_dir: Path,
) -> None:
    """The socket path's limit is in bytes: a data dir named in Chinese (3 bytes a character in UTF-8) whose
    `<data_dir>.run` socket path is 84 characters but 154 bytes gets a shorter socket dir, and starts.
    (Before, characters were counted and PostgreSQL refused the path: "is too long (maximum 107 bytes)".)"""
    server = EmbeddedPostgres(scratch_dir / ("重庆社保卡数据" * 5) / "pg")
    socket = os.fsencode(str(server.socket_dir / ".s.PGSQL.5432"))
    try:
        assert len(socket) <= UNIX_SOCKET_PATH_MAX, (len(socket), socket.decode())
        server.start()
        assert _select_one(server) == 1
    finally:
        server.destroy()


def test_a_data_dir_moved_to_another_path_starts_again(scratch_dir: Path) -> None:
    """A data dir moved (a renamed checkout, a restored backup, a volume mounted elsewhere) starts with its
    socket where dsn() looks for it. (Before, `unix_socket_directories`, written at initdb from the path
    then, kept the old socket dir: "could not create lock file .../a/pg.run/.s.PGSQL.5432.lock".)"""
    first = EmbeddedPostgres(scratch_dir / "a" / "pg")
    first.start()
    first.stop()
    os.rename(scratch_dir / "a", scratch_dir / "b")
    moved = EmbeddedPostgres(scratch_dir / "b" / "pg")
    try:
        moved.start()
        assert _select_one(moved) == 1
    finally:
        moved.destroy()


def test_a_stale_postmaster_pid_naming_a_live_process_does_not_stop_a_restart(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an unclean stop (the postmaster killed, a container or host restart) postmaster.pid names a
    pid that another process of the same user may have by now (pids restart low after a reboot or in a
    container). `pg_ctl status` only sends that pid signal 0: the server is started anyway, since that pid
    is not this install's postgres. (Before, running() took it for the server and start() waited
    START_TIMEOUT_S for a server that was not there: "not answering".)"""
    monkeypatch.setattr(embedded, "START_TIMEOUT_S", 20)
    server = EmbeddedPostgres(scratch_dir / "pg")
    server.start()
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        pid_file = server.data_dir / "postmaster.pid"
        lines = pid_file.read_text().splitlines()
        server.stop("immediate")  # no checkpoint, as a crash; then the lock file a crash leaves behind
        # Another process of the server's user now has the pid the lock file names.
        sleeper = subprocess.Popen(["sleep", "600"], user=server.run_as)
        pid_file.write_text("\n".join([str(sleeper.pid), *lines[1:]]) + "\n")

        server.start()
        assert _select_one(server) == 1
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        server.destroy()


# ------------------------------------------------------------------ migrations


async def test_an_applied_migration_that_changed_is_a_one_line_error(
    db: asyncpg.Connection,
    db_dsn: str,
    keys: KeyRing,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/operations.md: the service refuses "an applied migration that changed"; cli.main promises one
    clear line for operator-facing errors, a MigrationError among them (before: a traceback from
    `cardsvc migrate --check` and `cardsvc migrate`)."""
    await db.execute("UPDATE schema_migration SET checksum = 'edited' WHERE version = 3")
    for name in [n for n in os.environ if n.startswith("CARDSVC_")]:
        monkeypatch.delenv(name)
    _env(monkeypatch, db_dsn, keys, tmp_path)
    for argv in (["migrate", "--check"], ["migrate"]):
        code = await asyncio.to_thread(cli.main, argv)  # an uncaught exception fails the test here
        err = capsys.readouterr().err
        assert code == 1 and "migration 3 changed" in err and "Traceback" not in err, (argv, code, err)


# ------------------------------------------------------------------ the seeder


async def test_the_card_office_can_register_people_while_an_append_loads(
    db: asyncpg.Connection, db_dsn: str, keys: KeyRing
) -> None:
    """An --append writes explicit ids first+1..first+count and reserves them first: a registration by the
    card office while it loads (cardsvc/flows/registry.py: INSERT INTO cardholder with the identity
    default) gets an id after them. (Before, the sequences moved only after the load: the registration drew
    first+1, an id a committed chunk held, and failed with a duplicate key.)"""
    await seed.seed(db_dsn, keys, seed.SeedOptions(count=300, seed=SEED, jobs=1, key_pool=16))
    chunk_done = asyncio.Event()
    append = seed.SeedOptions(count=200, seed=SEED, jobs=1, key_pool=16, append=True, chunk_rows=100)
    task = asyncio.create_task(seed.seed(db_dsn, keys, append, progress=lambda _n: chunk_done.set()))
    try:
        await asyncio.wait_for(chunk_done.wait(), 120)  # people 300..399 are in
        sealed = PiiVault(keys).seal("110101199003071234", "王芳")  # someone at the card office's counter
        office = await asyncpg.connect(db_dsn)
        try:
            holder_id = await office.fetchval(
                """INSERT INTO cardholder (id_hash, id_cipher, name_cipher, id_masked, name_masked)
                   VALUES ($1, $2, $3, $4, $5) RETURNING holder_id""",
                sealed.id_hash, sealed.id_cipher, sealed.name_cipher, sealed.id_masked, sealed.name_masked,
            )  # fmt: skip
        finally:
            await office.close()
    finally:
        report = await asyncio.wait_for(task, 300)
    assert report.count == 200
    assert holder_id > 500, holder_id  # not one of the ids the append loads
    assert await db.fetchval("SELECT count(*) FROM cardholder") == 501


async def test_a_seed_logged_to_a_file_reports_its_progress_in_lines(
    db_dsn: str,
    keys: KeyRing,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A seed run under systemd or with its standard error in a file (not a terminal) printed no progress
    at all (the bar was disabled there): a 40M-card load was silent for its 20 minutes. It now prints a
    line every half minute (here every update) and one at the end: count, share and rate, no carriage
    return."""
    for name in [n for n in os.environ if n.startswith("CARDSVC_")]:
        monkeypatch.delenv(name)
    _env(monkeypatch, db_dsn, keys, tmp_path)
    monkeypatch.setattr(cli, "PROGRESS_LINE_S", 0.0)
    code = await asyncio.to_thread(cli.main, ["seed", "--count", "1200", "--jobs", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("seed: ")]
    assert code == 0 and lines, err
    assert "\r" not in err and lines[-1].startswith("seed: 1,200/1,200 cards (100.0%), "), lines
