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

__all__ = ["append_entry", "entries_of", "latest_version", "serve_block"]


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


# A terminal's hotlist poll in one statement (one snapshot, one round trip): the head, the changes after
# `since` ($2, at most $3 of them), and, unless `since` is newer than the head, what the terminal holds from
# now on (migrations 0010, 0012). Its offline records made after this are judged as of that version at
# least (cardsvc/transit/offline.py). Written only when the terminal moves forward: a poll that brings
# nothing new costs a primary-key probe, and no row lock (an ON CONFLICT that finds the row would lock it
# even to change nothing). The first and the last such serve of each hour are also kept for the upload
# window (`terminal_hotlist_serve`), so that records made before the terminal's last download are judged
# as of what it held then. The head and the entries agree: every version up to the head is committed and
# in the snapshot (versions are commit-ordered, above), none after it is.
_SERVE_SQL = """
WITH head AS (SELECT version AS latest FROM hotlist_head),
e AS (
    SELECT version, card_id, card_sn, action, reason, at FROM hotlist_entry
    WHERE version > $2 ORDER BY version LIMIT $3
), held AS (
    SELECT coalesce((SELECT max(version) FROM e), $2) AS version
), t AS (
    INSERT INTO terminal_hotlist (terminal_id, version, served_at)
    SELECT $1, held.version, now() FROM held, head
    WHERE held.version <= head.latest
      AND NOT EXISTS (SELECT 1 FROM terminal_hotlist WHERE terminal_id = $1 AND version >= held.version)
    ON CONFLICT (terminal_id) DO UPDATE SET version = EXCLUDED.version, served_at = EXCLUDED.served_at
    WHERE terminal_hotlist.version < EXCLUDED.version
    RETURNING terminal_id, version, served_at
), serve AS (
    INSERT INTO terminal_hotlist_serve (terminal_id, hour, first_version, first_at, last_version, last_at)
    SELECT terminal_id, date_trunc('hour', served_at), version, served_at, version, served_at FROM t
    ON CONFLICT (terminal_id, hour) DO UPDATE SET last_version = EXCLUDED.last_version, last_at = EXCLUDED.last_at
    WHERE terminal_hotlist_serve.last_version < EXCLUDED.last_version
)
SELECT head.latest, e.version, e.card_id, e.card_sn, e.action, e.reason, e.at
FROM head LEFT JOIN e ON true
ORDER BY e.version
"""


async def serve_block(conn: asyncpg.Connection, terminal_id: str, since: int, limit: int) -> hotlist.HotlistBlock:
    """The changes after `since`, at most `limit` of them, with the version the terminal holds after them;
    remembered as what `terminal_id` holds."""
    rows = await conn.fetch(_SERVE_SQL, terminal_id, since, limit)
    latest: int = rows[0]["latest"]
    metrics.HOTLIST_VERSION.set(latest)
    if since > latest:
        raise ApiError(
            "invalid_parameter",
            f"since={since} is newer than the latest version {latest}; reload from since=0",
            field="since",
        )
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
        if r["version"] is not None
    ]
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
