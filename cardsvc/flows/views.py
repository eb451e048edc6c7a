"""How cards, holders and e-cards are shown: masked personal data only, stable field names."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg

from cardsvc.localtime import local_date
from protocols.card import CardStatus

__all__ = ["CARD_VIEW_COLUMNS", "CARD_VIEW_FROM", "card_view", "effective_status", "usable"]

# Columns and joins that every card answer is built from (one round trip, no personal data in clear).
CARD_VIEW_COLUMNS = """c.card_id, c.holder_id, c.card_no, c.card_sn, c.status, c.pin_locked, c.app_locked,
    c.generation, c.issuing_area, c.bank_code, c.financial_active, c.has_purse, coalesce(pu.balance_fen, 0) AS purse_balance_fen,
    c.expires_on, c.temp_loss_until, c.replaced_by, h.id_masked, h.name_masked"""
CARD_VIEW_FROM = (
    "card c JOIN cardholder h ON h.holder_id = c.holder_id LEFT JOIN purse pu ON pu.card_id = c.card_id"
)


def effective_status(status: int, temp_loss_until: dt.datetime | None, now: dt.datetime) -> CardStatus:
    """A temporary loss ends by itself when its period runs out, even before the sweeper records it."""
    if status == CardStatus.TEMP_LOST and temp_loss_until is not None and temp_loss_until <= now:
        return CardStatus.ACTIVE
    return CardStatus(status)


def usable(row: asyncpg.Record | dict[str, Any], now: dt.datetime) -> bool:
    status = effective_status(row["status"], row["temp_loss_until"], now)
    return status == CardStatus.ACTIVE and not row["app_locked"] and row["expires_on"] >= local_date(now)


def card_view(row: asyncpg.Record | dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    status = effective_status(row["status"], row["temp_loss_until"], now)
    temp_until = row["temp_loss_until"] if status == CardStatus.TEMP_LOST else None
    return {
        "card_no": row["card_no"],
        "card_sn": row["card_sn"],
        "status": status.api_name,
        "usable": usable(row, now),
        "pin_locked": row["pin_locked"],
        "app_locked": row["app_locked"],
        "generation": row["generation"],
        "issuing_area": row["issuing_area"],
        "bank_code": row["bank_code"],
        "financial_active": row["financial_active"],
        "has_purse": row["has_purse"],
        "purse_balance_fen": row["purse_balance_fen"],
        "expires_on": row["expires_on"].isoformat(),
        "temp_loss_until": temp_until.isoformat() if temp_until else None,
        "holder": {
            "holder_id": row["holder_id"],
            "id_number_masked": row["id_masked"],
            "name_masked": row["name_masked"],
        },
    }
