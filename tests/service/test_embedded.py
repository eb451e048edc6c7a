"""The embedded PostgreSQL sizes its memory to the machine it is created on."""

from __future__ import annotations

import os

import asyncpg
import pytest

from cardsvc.store.embedded import SHARED_BUFFERS_MB_MAX, SHARED_BUFFERS_MB_MIN, memory_settings


def test_shared_buffers_is_a_quarter_of_memory_within_bounds() -> None:
    assert memory_settings(24 * 1024) == {"shared_buffers": "6144MB", "effective_cache_size": "12288MB"}
    assert memory_settings(256)["shared_buffers"] == f"{SHARED_BUFFERS_MB_MIN}MB"
    assert memory_settings(1024 * 1024)["shared_buffers"] == f"{SHARED_BUFFERS_MB_MAX}MB"
    small = memory_settings(256)
    assert int(small["effective_cache_size"].removesuffix("MB")) >= int(small["shared_buffers"].removesuffix("MB"))


async def test_the_embedded_server_runs_with_those_settings(pg_admin_dsn: str) -> None:
    if os.environ.get("CARDSVC_DATABASE_URL"):
        pytest.skip("an external server keeps its own settings")
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        shown = await conn.fetchval("SELECT setting::bigint * 8 / 1024 FROM pg_settings WHERE name = 'shared_buffers'")
    finally:
        await conn.close()
    assert f"{shown}MB" == memory_settings()["shared_buffers"]
