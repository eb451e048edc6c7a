"""The workers' terminal cache (cardsvc/security/terminals.py, migration 0021): a refresh reads the
terminals changed since the last one, not the whole registry, and misses no change, whatever the order in
which concurrent changes commit.

Each worker's refresh runs on its event loop; before 0021 every refresh decrypted every terminal's keys
(~25 µs a terminal: ~0.14 s at 5,500 terminals, seconds at a city's 100,000) on every NOTIFY and every
fallback timer, and each request of that worker waited that long.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse

import asyncpg
import pytest

from cardsvc.security import terminals
from cardsvc.security.keys import KeyRing
from cardsvc.store import migrate
from protocols import sm
from tests.helpers import migrated_before, scratch_database


def _cache(keys: KeyRing) -> terminals.TerminalRegistry:
    return terminals.TerminalRegistry(keys.terminal_kek, 60.0)


async def _add(db: asyncpg.Connection, keys: KeyRing, tid: str) -> bytes:
    return await terminals.add_terminal(db, keys.terminal_kek, tid, "transit_validator", "bus-1")


async def test_a_refresh_reads_only_the_terminals_that_changed(db: asyncpg.Connection, keys: KeyRing) -> None:
    for i in range(30):
        await _add(db, keys, f"gate-{i}")
    cache = _cache(keys)
    assert await cache.load(db) == 30
    assert await cache.load(db) == 0  # nothing changed: nothing read, nothing decrypted

    await terminals.rotate_key(db, keys.terminal_kek, "gate-3", "k2", 600)
    assert await cache.load(db) == 1
    gate = cache.get("gate-3")
    assert gate is not None and set(gate.keys) == {"k1", "k2"}
    assert gate.keys["k1"].not_after is not None and gate.keys["k2"].not_after is None  # the overlap's end

    await db.execute("UPDATE terminal SET disabled = true WHERE terminal_id = 'gate-7'")
    secret = await _add(db, keys, "gate-new")
    assert await cache.load(db) == 2
    disabled, new = cache.get("gate-7"), cache.get("gate-new")
    assert disabled is not None and disabled.disabled
    assert new is not None and new.keys["k1"].secret == secret
    assert len(cache) == 31

    # A key removed by hand (psql) is a change of its terminal too.
    await db.execute("DELETE FROM terminal_key WHERE terminal_id = 'gate-3' AND key_id = 'k1'")
    assert await cache.load(db) == 1
    gate = cache.get("gate-3")
    assert gate is not None and set(gate.keys) == {"k2"}


async def _waiting_for_lock(db: asyncpg.Connection, pid: int) -> bool:
    return bool(await db.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid))


async def test_changes_that_commit_out_of_order_are_not_missed(
    db: asyncpg.Connection, db_dsn: str, keys: KeyRing
) -> None:
    """A change numbered after an open one cannot commit first, so the cache never moves past a change it
    has not seen (with a plain sequence, the second change would commit, the cache would read up to its
    number, and the first change, committed later under a lower number, would never be read)."""
    await _add(db, keys, "gate-a")
    cache = _cache(keys)
    await cache.load(db)
    first = await asyncpg.connect(db_dsn)
    second = await asyncpg.connect(db_dsn)
    try:
        tx = first.transaction()
        await tx.start()
        await first.execute("UPDATE terminal SET disabled = true WHERE terminal_id = 'gate-a'")
        later = asyncio.create_task(_add(second, keys, "gate-b"))
        second_pid = second.get_server_pid()
        for _ in range(1000):  # until the second change has committed or waits for the first
            if later.done() or await _waiting_for_lock(db, second_pid):
                break
            await asyncio.sleep(0.005)
        await cache.load(db)  # what is committed now
        await tx.commit()
        await later
        await cache.load(db)
        gate_a, gate_b = cache.get("gate-a"), cache.get("gate-b")
        assert gate_a is not None and gate_a.disabled
        assert gate_b is not None
    finally:
        await first.close()
        await second.close()


async def test_a_terminal_is_disabled_not_deleted(db: asyncpg.Connection, keys: KeyRing) -> None:
    await _add(db, keys, "gate-x")
    await db.execute("DELETE FROM terminal_key WHERE terminal_id = 'gate-x'")
    with pytest.raises(asyncpg.RestrictViolationError, match="disabled, not deleted"):
        await db.execute("DELETE FROM terminal WHERE terminal_id = 'gate-x'")
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("TRUNCATE terminal CASCADE")
    assert await db.fetchval("SELECT count(*) FROM terminal WHERE terminal_id = 'gate-x'") == 1


async def test_a_cache_ahead_of_its_database_reads_everything_again(
    db: asyncpg.Connection, pg_admin_dsn: str, template_dsn: str, keys: KeyRing
) -> None:
    """A database restored from a backup (or a failover to a replica behind) has fewer changes than the
    cache has read: the cache reads the whole registry again and drops what the database no longer has."""
    for i in range(5):
        await _add(db, keys, f"gate-{i}")
    cache = _cache(keys)
    await cache.load(db)
    template = urllib.parse.urlsplit(template_dsn).path.lstrip("/")
    async with scratch_database(pg_admin_dsn, f"cardsvc_restored_{os.getpid()}", template) as dsn:
        restored = await asyncpg.connect(dsn)
        try:
            await _add(restored, keys, "gate-0")
            assert await cache.load(restored) == 1
        finally:
            await restored.close()
    assert len(cache) == 1 and cache.get("gate-1") is None


async def test_the_migration_numbers_the_terminals_already_there(pg_admin_dsn: str, keys: KeyRing) -> None:
    async with scratch_database(pg_admin_dsn, f"cardsvc_mig21_{os.getpid()}") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await migrated_before(conn, 21)
            for i in range(4):
                await conn.execute(
                    "INSERT INTO terminal (terminal_id, kind, org, operations) VALUES ($1, 'pharmacy_pos', 'p', '{}')",
                    f"pos-{i}",
                )
            await conn.execute(
                "INSERT INTO terminal_key (terminal_id, key_id, secret_cipher) VALUES ('pos-2', 'k1', $1)",
                sm.sm4_gcm_encrypt(keys.terminal_kek, b"s" * 32, terminals.secret_aad("pos-2", "k1")),
            )
            applied = [m.version for m in await migrate.apply(conn)]
            assert applied[0] == 21, applied  # and the migrations after it
            seqs = [r["change_seq"] for r in await conn.fetch("SELECT change_seq FROM terminal ORDER BY change_seq")]
            assert seqs == [1, 2, 3, 4]
            assert await conn.fetchval("SELECT version FROM terminal_head") == 4
            cache = _cache(keys)
            assert await cache.load(conn) == 4
            pos = cache.get("pos-2")
            assert pos is not None and pos.keys["k1"].secret == b"s" * 32
            await conn.execute("UPDATE terminal SET disabled = true WHERE terminal_id = 'pos-0'")
            assert await conn.fetchval("SELECT change_seq FROM terminal WHERE terminal_id = 'pos-0'") == 5
            assert await cache.load(conn) == 1
        finally:
            await conn.close()
