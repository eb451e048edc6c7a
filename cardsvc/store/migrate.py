"""Versioned SQL migrations: files `NNNN_name.sql` in cardsvc/store/migrations, applied in order.

Each file runs in its own transaction under an advisory lock (several workers or operators may call it
at once); its SHA-256 is recorded, and a changed applied file is an error, not a silent drift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from importlib import resources

import asyncpg

__all__ = ["Migration", "MigrationError", "apply", "available", "pending"]

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x63617264  # "card"


class MigrationError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    out = []
    for entry in resources.files("cardsvc.store.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if versions != list(range(1, len(out) + 1)):
        raise MigrationError(f"migration versions must be 1..N without gaps, found {versions}")
    return out


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migration (
               version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    rows = await conn.fetch("SELECT version, checksum FROM schema_migration ORDER BY version")
    return {r["version"]: r["checksum"] for r in rows}


async def pending(conn: asyncpg.Connection) -> list[Migration]:
    """Migrations not applied yet; raises if an applied one has changed or is unknown to this code."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migration') IS NOT NULL")
    applied: dict[int, str] = {}
    if exists:
        rows = await conn.fetch("SELECT version, checksum FROM schema_migration")
        applied = {r["version"]: r["checksum"] for r in rows}
    known = available()
    by_version = {m.version: m for m in known}
    for version, checksum in applied.items():
        if version not in by_version:
            raise MigrationError(f"database has migration {version}, newer than this cardsvc")
        if by_version[version].checksum != checksum:
            raise MigrationError(f"migration {version} changed after it was applied")
    return [m for m in known if m.version not in applied]


async def apply(conn: asyncpg.Connection) -> list[Migration]:
    """Apply every pending migration; return those applied by this call. Waits for another caller's
    migrations (the advisory lock) however long they take; the migrations themselves keep the
    connection's lock_timeout, so that one queued behind a long transaction fails rather than stall
    the service's queries behind it."""
    timeout = await conn.fetchval("SHOW lock_timeout")
    await conn.execute("SELECT set_config('lock_timeout', '0', false)")
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    finally:
        await conn.execute("SELECT set_config('lock_timeout', $1, false)", timeout)
    try:
        await _applied(conn)
        todo = await pending(conn)
        for m in todo:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migration (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
