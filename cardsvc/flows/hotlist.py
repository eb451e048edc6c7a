"""Hotlist: every change that makes a card unusable (or usable again) gets the next version.

Versions are gapless and commit-ordered: `append_entry` increments the single `hotlist_head` row in the
transaction of the status change, and that row lock is held until commit, so version N+1 can only
commit after version N. A terminal that has read up to N has therefore seen every change <= N.
"""

from __future__ import annotations

import asyncpg

from cardsvc import metrics
from cardsvc.errors import ApiError
from protocols import hotlist
from protocols.card import HotlistAction, HotlistReason

__all__ = ["append_entry", "entries_of", "latest_version", "read_block", "record_served"]


async def append_entry(
    conn: asyncpg.Connection, card_id: int, card_sn: str, action: HotlistAction, reason: HotlistReason
) -> int:
    version: int = await conn.fetchval("UPDATE hotlist_head SET version = version + 1 RETURNING version")
    await conn.execute(
        "INSERT INTO hotlist_entry (version, card_id, card_sn, action, reason) VALUES ($1, $2, $3, $4, $5)",
        version,
        card_id,
        card_sn,
        int(action),
        int(reason),
    )
    return version


async def latest_version(conn: asyncpg.Connection) -> int:
    version: int = await conn.fetchval("SELECT version FROM hotlist_head")
    metrics.HOTLIST_VERSION.set(version)
    return version


async def record_served(conn: asyncpg.Connection, terminal_id: str, version: int) -> None:
    """Remember that `terminal_id` holds `version` from now on (migrations 0010, 0012): its offline records
    made after this are judged as of this version at least (cardsvc/transit/offline.py). Written only when
    the terminal moves forward: a poll that brings nothing new costs a primary-key probe, and no row lock
    (an ON CONFLICT that finds the row would lock it even to change nothing). The first and the last such
    serve of each hour are also kept for the upload window (`terminal_hotlist_serve`), so that records made
    before the terminal's last download are judged as of what it held then."""
    await conn.execute(
        """WITH t AS (
               INSERT INTO terminal_hotlist (terminal_id, version, served_at)
               SELECT $1, $2, now()
               WHERE NOT EXISTS (SELECT 1 FROM terminal_hotlist WHERE terminal_id = $1 AND version >= $2)
               ON CONFLICT (terminal_id) DO UPDATE SET version = EXCLUDED.version, served_at = EXCLUDED.served_at
               WHERE terminal_hotlist.version < EXCLUDED.version
               RETURNING terminal_id, version, served_at
           )
           INSERT INTO terminal_hotlist_serve (terminal_id, hour, first_version, first_at, last_version, last_at)
           SELECT terminal_id, date_trunc('hour', served_at), version, served_at, version, served_at FROM t
           ON CONFLICT (terminal_id, hour) DO UPDATE SET last_version = EXCLUDED.last_version, last_at = EXCLUDED.last_at
           WHERE terminal_hotlist_serve.last_version < EXCLUDED.last_version""",
        terminal_id,
        version,
    )


async def read_block(conn: asyncpg.Connection, since: int, limit: int) -> hotlist.HotlistBlock:
    """Changes after `since`, at most `limit` of them, with the version the terminal holds after them.

    Head and entries are read in one REPEATABLE READ snapshot, so `latest_version` and the entries agree."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        latest: int = await conn.fetchval("SELECT version FROM hotlist_head")
        rows = await conn.fetch(
            """SELECT version, card_id, card_sn, action, reason, at FROM hotlist_entry
               WHERE version > $1 ORDER BY version LIMIT $2""",
            since,
            limit,
        )
    metrics.HOTLIST_VERSION.set(latest)
    entries = [
        hotlist.HotlistEntry(
            version=r["version"],
            card_sn=r["card_sn"],
            action=HotlistAction(r["action"]),
            reason=HotlistReason(r["reason"]),
            at=int(r["at"].timestamp()),
            account_id=r["card_id"],
        )
        for r in rows
    ]
    if since > latest:
        raise ApiError(
            "invalid_parameter",
            f"since={since} is newer than the latest version {latest}; reload from since=0",
            field="since",
        )
    to_version = entries[-1].version if entries else since
    return hotlist.HotlistBlock(
        since_version=since,
        to_version=to_version,
        latest_version=latest,
        more=to_version < latest,
        entries=entries,
    )


async def entries_of(conn: asyncpg.Connection, card_ids: list[int]) -> dict[int, list[hotlist.HotlistEntry]]:
    """Each card's hotlist entries, in version order (offline records and uploaded rides are judged by
    whether the card was blocked as of the version their terminal held: protocols.transit.blocked_at_version)."""
    entries: dict[int, list[hotlist.HotlistEntry]] = {card_id: [] for card_id in card_ids}
    for r in await conn.fetch(
        """SELECT card_id, version, card_sn, action, reason, at FROM hotlist_entry
           WHERE card_id = ANY($1::bigint[]) ORDER BY version""",
        card_ids,
    ):
        entry = hotlist.HotlistEntry(
            r["version"], r["card_sn"], HotlistAction(r["action"]), HotlistReason(r["reason"]),
            int(r["at"].timestamp()), r["card_id"],
        )  # fmt: skip
        entries[r["card_id"]].append(entry)
    return entries
