"""Card registry: cardholders (personal data sealed by the vault) and card issuance."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg

from cardsvc.errors import ApiError
from cardsvc.localtime import local_date
from cardsvc.security.pii import PiiVault
from protocols.card import CardStatus

from .actor import Actor
from .views import CARD_VIEW_COLUMNS, CARD_VIEW_FROM, card_view

__all__ = ["create_holder", "get_card", "issue_card", "list_events", "lookup_holder"]


def _holder_view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "holder_id": row["holder_id"],
        "id_number_masked": row["id_masked"],
        "name_masked": row["name_masked"],
    }


# The holder and who registered it (holder_event, migration 0022), in one statement.
_CREATE_HOLDER_SQL = """
WITH h AS (
    INSERT INTO cardholder (id_hash, id_cipher, name_cipher, id_masked, name_masked)
    VALUES ($1, $2, $3, $4, $5) RETURNING holder_id, id_masked, name_masked
), e AS (
    INSERT INTO holder_event (holder_id, op, terminal_id, operator, request_id)
    SELECT holder_id, 'create', $6, $7, $8 FROM h
)
SELECT holder_id, id_masked, name_masked FROM h
"""


async def create_holder(
    conn: asyncpg.Connection, vault: PiiVault, body: dict[str, Any], actor: Actor
) -> dict[str, Any]:
    sealed = vault.seal(body["id_number"], body["name"])
    try:
        row = await conn.fetchrow(
            _CREATE_HOLDER_SQL,
            sealed.id_hash,
            sealed.id_cipher,
            sealed.name_cipher,
            sealed.id_masked,
            sealed.name_masked,
            actor.terminal_id,
            actor.operator,
            actor.request_id,
        )
    except asyncpg.UniqueViolationError:
        existing = await conn.fetchval("SELECT holder_id FROM cardholder WHERE id_hash = $1", sealed.id_hash)
        raise ApiError("holder_exists", field="id_number", extra={"holder_id": existing}) from None
    assert row is not None
    return _holder_view(row)


async def lookup_holder(
    conn: asyncpg.Connection, vault: PiiVault, id_number: str, now: dt.datetime
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT holder_id, id_masked, name_masked FROM cardholder WHERE id_hash = $1",
        vault.lookup_hash(id_number),
    )
    if row is None:
        raise ApiError("not_found", "no cardholder with this ID number")
    cards = await conn.fetch(
        f"SELECT {CARD_VIEW_COLUMNS} FROM {CARD_VIEW_FROM} WHERE c.holder_id = $1 ORDER BY c.card_id",
        row["holder_id"],
    )
    return {**_holder_view(row), "cards": [card_view(c, now) for c in cards]}


async def issue_card(
    conn: asyncpg.Connection, body: dict[str, Any], actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    if body["expires_on"] <= local_date(now):
        raise ApiError("invalid_field", "expires_on must be in the future", field="expires_on")
    async with conn.transaction():
        holder = await conn.fetchval("SELECT 1 FROM cardholder WHERE holder_id = $1", body["holder_id"])
        if holder is None:
            raise ApiError("not_found", "no such cardholder", field="holder_id")
        try:
            card_id = await conn.fetchval(
                """INSERT INTO card (holder_id, card_no, card_sn, status, generation, issuing_area, bank_code,
                                     has_purse, expires_on)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING card_id""",
                body["holder_id"],
                body["card_no"],
                body["card_sn"],
                int(CardStatus.ISSUED),
                body["generation"] or 3,
                body["card_sn"][:6],
                body["bank_code"],
                bool(body["has_purse"]),
                body["expires_on"],
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "card_one_live_per_holder":
                raise ApiError("holder_has_live_card", field="holder_id") from None
            field = "card_sn" if exc.constraint_name == "card_card_sn_key" else "card_no"
            raise ApiError("card_exists", field=field) from None
        if body["has_purse"]:
            await conn.execute("INSERT INTO purse (card_id) VALUES ($1)", card_id)
        await conn.execute(
            """INSERT INTO card_event (card_id, op, terminal_id, operator, request_id, status_before, status_after)
               VALUES ($1, 'issue', $2, $3, $4, NULL, $5)""",
            card_id,
            actor.terminal_id,
            actor.operator,
            actor.request_id,
            int(CardStatus.ISSUED),
        )
    return await get_card(conn, body["card_no"], now)


async def get_card(conn: asyncpg.Connection, card_no: str, now: dt.datetime) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"SELECT {CARD_VIEW_COLUMNS} FROM {CARD_VIEW_FROM} WHERE c.card_no = $1", card_no
    )
    if row is None:
        raise ApiError("not_found", "no such card")
    view = card_view(row, now)
    ecard = await conn.fetchrow(
        "SELECT ecard_id, channel, alg, issued_at FROM ecard WHERE card_id = $1 AND revoked_at IS NULL",
        row["card_id"],
    )
    view["ecard"] = (
        {
            "ecard_id": ecard["ecard_id"],
            "channel": ecard["channel"],
            "alg": ecard["alg"],
            "issued_at": ecard["issued_at"].isoformat(),
        }
        if ecard
        else None
    )
    return view


async def list_events(conn: asyncpg.Connection, card_no: str, limit: int) -> dict[str, Any]:
    card_id = await conn.fetchval("SELECT card_id FROM card WHERE card_no = $1", card_no)
    if card_id is None:
        raise ApiError("not_found", "no such card")
    rows = await conn.fetch(
        """SELECT event_id, op, terminal_id, operator, request_id, status_before, status_after, detail, at
           FROM card_event WHERE card_id = $1 ORDER BY event_id LIMIT $2""",
        card_id,
        limit,
    )
    return {
        "card_no": card_no,
        "events": [
            {
                "event_id": r["event_id"],
                "op": r["op"],
                "terminal_id": r["terminal_id"],
                "operator": r["operator"],
                "request_id": r["request_id"],
                "status_before": CardStatus(r["status_before"]).api_name if r["status_before"] else None,
                "status_after": CardStatus(r["status_after"]).api_name,
                "detail": r["detail"],
                "at": r["at"].isoformat(),
            }
            for r in rows
        ],
    }
