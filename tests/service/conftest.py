"""Fixtures of the tests that run `cardsvc serve` as a subprocess (tests/service/serving.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cardsvc.security.keys import KeyRing
from cardsvc.store.embedded import EmbeddedPostgres
from tests.helpers import migrated


@pytest.fixture
def keys_for_process() -> KeyRing:
    return KeyRing.generate()


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    # Not under tmp_path: pytest resets the mode of its temporary root, which the server's user
    # (when tests run as root) must be able to traverse.
    base = Path(tempfile.mkdtemp(prefix="cardsvc-test-"))
    server = EmbeddedPostgres(base / "pg")
    server.start()
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def own_dsn(own_postgres: EmbeddedPostgres) -> str:
    """The own server's database, migrated."""
    return await migrated(own_postgres.dsn())
