"""Electronic social security cards: signed to an active physical card (one per card), bound to the
device's public key and the issuing channel, revocable. Its status is never stored: every answer and
every verification joins the physical card, so the e-card always mirrors it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg

from cardsvc.errors import ApiError
from protocols import sm
from protocols.errors import CodecError

from . import lifecycle
from .actor import Actor
from .views import CARD_VIEW_COLUMNS, CARD_VIEW_FROM, card_view, usable

__all__ = ["get_ecard", "issue_ecard", "revoke_ecard"]


async def _view(conn: asyncpg.Connection, ecard_id: int, now: dt.datetime) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"""SELECT e.ecard_id, e.channel, e.alg, e.revoked_at, e.issued_at, {CARD_VIEW_COLUMNS}
            FROM ecard e JOIN {CARD_VIEW_FROM} ON c.card_id = e.card_id WHERE e.ecard_id = $1""",
        ecard_id,
    )
    if row is None:
        raise ApiError("not_found", "no such electronic card")
    card = card_view(row, now)
    revoked = row["revoked_at"] is not None
    return {
        "ecard_id": row["ecard_id"],
        "channel": row["channel"],
        "alg": row["alg"],
        "issued_at": row["issued_at"].isoformat(),
        "revoked_at": row["revoked_at"].isoformat() if revoked else None,
        "status": "revoked" if revoked else card["status"],
        "usable": not revoked and card["usable"],
        "card": card,
    }


async def issue_ecard(
    conn: asyncpg.Connection, body: dict[str, Any], actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    key = bytes.fromhex(body["device_public_key"])
    if len(key) != sm.public_key_length(body["alg"]):
        raise ApiError(
            "invalid_field", "device_public_key length does not match alg", field="device_public_key"
        )
    try:
        sm.validate_public_key(body["alg"], key)
    except CodecError:
        raise ApiError(
            "invalid_field", "device_public_key is not a valid public key", field="device_public_key"
        ) from None
    async with conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {CARD_VIEW_COLUMNS} FROM {CARD_VIEW_FROM} WHERE c.card_no = $1 FOR UPDATE OF c",
            body["card_no"],
        )
        if row is None:
            raise ApiError("not_found", "no such card", field="card_no")
        if not usable(row, now):
            raise ApiError("card_not_active", f"the card is {card_view(row, now)['status']}", field="card_no")
        status = await lifecycle.record_lapsed_loss(conn, row)  # a temporary loss that ran out: recorded
        try:
            ecard_id = await conn.fetchval(
                "INSERT INTO ecard (card_id, channel, alg, device_key) VALUES ($1, $2, $3, $4) RETURNING ecard_id",
                row["card_id"],
                body["channel"],
                body["alg"],
                key,
            )
        except asyncpg.UniqueViolationError:
            raise ApiError("ecard_exists", field="card_no") from None
        await conn.execute(
            """INSERT INTO card_event (card_id, op, terminal_id, operator, request_id, status_before,
                                       status_after, detail)
               VALUES ($1, 'ecard-issue', $2, $3, $4, $5, $5, $6)""",
            row["card_id"],
            actor.terminal_id,
            actor.operator,
            actor.request_id,
            status,
            {"ecard_id": ecard_id, "channel": body["channel"]},
        )
    return await _view(conn, ecard_id, now)


async def get_ecard(conn: asyncpg.Connection, ecard_id: int, now: dt.datetime) -> dict[str, Any]:
    return await _view(conn, ecard_id, now)


async def revoke_ecard(
    conn: asyncpg.Connection, ecard_id: int, actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    async with conn.transaction():
        # The card's purse lock first, as every writer a tap batch must see takes it (taps, top-ups, the
        # card office): a batch holding it has read the e-card's state and commits before this revocation,
        # or waits and then refuses the tap. Purse, then e-card: a replacement locks card, purse, e-card.
        locked = await conn.fetchval(
            """SELECT p.card_id FROM purse p JOIN ecard e ON e.card_id = p.card_id WHERE e.ecard_id = $1
               FOR UPDATE OF p""",
            ecard_id,
        )
        row = await conn.fetchrow(
            """UPDATE ecard e SET revoked_at = now() FROM card c
               WHERE e.ecard_id = $1 AND e.revoked_at IS NULL AND c.card_id = e.card_id
               RETURNING e.card_id, c.status""",
            ecard_id,
        )
        if row is None:
            exists = await conn.fetchval("SELECT 1 FROM ecard WHERE ecard_id = $1", ecard_id)
            raise ApiError("ecard_revoked" if exists else "not_found")
        if row["card_id"] != locked:
            # A replacement moved the e-card while this waited for the old card's purse: a tap batch of the
            # new card may have read it unrevoked. Its purse lock too, so that such a batch commits before
            # this revocation is answered, as on the old card.
            await conn.execute("SELECT 1 FROM purse WHERE card_id = $1 FOR UPDATE", row["card_id"])
        await conn.execute(
            """INSERT INTO card_event (card_id, op, terminal_id, operator, request_id, status_before,
                                       status_after, detail)
               VALUES ($1, 'ecard-revoke', $2, $3, $4, $5, $5, $6)""",
            row["card_id"],
            actor.terminal_id,
            actor.operator,
            actor.request_id,
            row["status"],
            {"ecard_id": ecard_id},
        )
    return await _view(conn, ecard_id, now)
