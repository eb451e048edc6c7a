"""Whether the registry can be used: a fresh `cardsvc seed` marks its load in `seed_in_progress` (migration
0016; `dropped` once its indexes and constraints are gone, migration 0017) and holds SEED_LOCK_KEY for its
run. Checked by the service at start-up, by the seed and by `cardsvc demo-data` (docs/schema.md "Seeding a
large registry")."""

from __future__ import annotations

import asyncpg

__all__ = ["INCOMPLETE_ADVICE", "SEED_LOCK_KEY", "interrupted_seed"]

INCOMPLETE_ADVICE = (
    "the registry is incomplete: a fresh seed dropped its indexes and constraints for the load and did not "
    "finish. Start again from an empty database: drop it (or remove the embedded data dir), then "
    "`cardsvc migrate` and seed again"
)


# A seed holds this session advisory lock for its whole run: the row of a seed still loading is told apart
# from the row of one that was interrupted, and two seeds never load the same database at once.
SEED_LOCK_KEY = 0x6361726473656564  # "cardseed"


async def interrupted_seed(conn: asyncpg.Connection) -> str | None:
    """Why the registry cannot be used as it is (a fresh seed still loading, or one that was interrupted
    after its drop: migrations 0016, 0017), or None: the registry is whole. Reads the seed's lock, never
    takes it (checks at the same moment must not see each other as a seed), in the same statement as the
    row."""
    row = await conn.fetchrow(
        """SELECT started_at, detail, dropped, EXISTS (
                  SELECT 1 FROM pg_locks
                  WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND classid = $1::oid
                    AND objid = $2::oid AND pid <> pg_backend_pid()
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
              ) AS loading
           FROM seed_in_progress""",
        SEED_LOCK_KEY >> 32,
        SEED_LOCK_KEY & 0xFFFFFFFF,
    )
    if row is None:
        return None
    started = f"seed started {row['started_at'].isoformat(timespec='seconds')}: {row['detail']}"
    if row["loading"]:
        return f"a seed is loading the registry ({started}); wait for it to finish"
    if not row["dropped"]:  # stopped before it dropped anything (migration 0017): the registry is whole
        return None
    return f"{INCOMPLETE_ADVICE} ({started})"
