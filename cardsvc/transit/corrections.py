"""Fare corrections: the card office gives a charged fare back, whole or in part (docs/transit.md "Fare
corrections").

A correction is one transaction: a journal row of kind `KIND_CORRECTION` on the fare's card, crediting its
purse `amount_fen` from the counterparty the fare paid (the operator, which clearing file version 2 then
debits: protocols/clearing.md), the purse's new balance, a `fare_correction` row linking it to the fare
(migration 0019), and the answer under the request's key. It is idempotent per (terminal, terminal_seq),
in the card office's key space of top-ups (kept for good in `topup_key`).

The corrections of one fare never exceed it: every correction of a card holds its purse lock while it
reads what was given back so far and writes its own, so two concurrent corrections of one fare are
serialised and the second sees the first.

A replaced card's purse moved to the card that replaced it: the credit is carried there at once by a pair
of transfers through the `replacement` account (as an offline debit uploaded after a replacement is,
docs/transit.md), so the money is where the holder can spend it. A cancelled card's purse was paid out: a
correction on it may only settle a debt (up to a balance of 0), like a top-up.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from cardsvc import metrics
from cardsvc.errors import ApiError
from cardsvc.flows.actor import Actor
from cardsvc.services import Services
from protocols import card
from protocols.clearing import ClearingSource

from .clearing import FARE_KINDS, clearing_source
from .flow import prior_office_answer, purse_card, record_office_key
from .taps import (
    KIND_CORRECTION,
    KIND_TRANSFER,
    SOURCE_OFFICE,
    request_hash,
)

__all__ = ["CORRECTABLE_KINDS", "correct_fare"]

# What a correction may give back: an approved debit of these kinds (what clearing pays an operator for).
CORRECTABLE_KINDS = FARE_KINDS
_REPLACEMENT_HOPS_MAX = 100
_DEAD = (card.CardStatus.REPLACED, card.CardStatus.CANCELLED)

_FARE_SQL = """
SELECT j.kind, j.source, j.amount_fen, j.result, j.counterparty, j.line_id, j.station_id,
       (SELECT coalesce(sum(f.amount_fen), 0)::bigint FROM fare_correction f
        WHERE f.card_id = j.card_id AND f.corrects_txn_id = j.txn_id) AS given_back
FROM txn_journal j WHERE j.card_id = $1 AND j.txn_id = $2
"""

_JOURNAL_SQL = """
INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty,
                         line_id, station_id, source)
VALUES ($1, $2, $3, $4, $5, 1, now(), $6, $7, $8, $9) RETURNING txn_id
"""


async def correct_fare(
    conn: asyncpg.Connection, svc: Services, card_no: str, body: dict[str, Any], actor: Actor
) -> dict[str, Any]:
    """Give (part of) fare `body["txn_id"]` of card `card_no` back to its purse (module docstring)."""
    digest = request_hash({**body, "card_no": card_no})
    fare_txn: int = body["txn_id"]
    amount: int = body["amount_fen"]
    async with conn.transaction():
        row = await purse_card(conn, card_no)
        card_id: int = row["card_id"]
        balance: int = await conn.fetchval(
            "SELECT balance_fen FROM purse WHERE card_id = $1 FOR UPDATE", card_id
        )
        prior = await prior_office_answer(conn, actor.terminal_id, body["terminal_seq"], digest)
        if prior is not None:
            return {
                "result": prior["result"],
                "txn_id": prior["txn_id"],
                "corrects_txn_id": fare_txn,
                "amount_fen": prior["amount_fen"],
                "balance_fen": prior["balance_fen"],
                "reason": body["reason"],
                "replayed_answer": True,
            }
        fare = await conn.fetchrow(_FARE_SQL, card_id, fare_txn)
        if fare is None:
            raise ApiError("not_found", f"card {card_no} has no transaction {fare_txn}", field="txn_id")
        if fare["kind"] not in CORRECTABLE_KINDS or fare["result"] != 1 or fare["amount_fen"] >= 0:
            raise ApiError(
                "fare_not_correctable", "only a fare the purse paid (a fare, penalty, offline debit or ride-code "
                "charge) can be given back", field="txn_id",
            )  # fmt: skip
        left = -fare["amount_fen"] - fare["given_back"]
        if amount > left:
            raise ApiError(
                "correction_exceeds_fare",
                f"{left} fen of this fare is left to give back",
                field="amount_fen",
                extra={
                    "fare_fen": -fare["amount_fen"],
                    "given_back_fen": fare["given_back"],
                    "left_fen": left,
                },
            )
        # The purse the holder spends from: this card's, or (replaced) the live end of its replacements'. Each
        # card's purse is locked before its row is read (a replacement or a cancel holds the purse lock while
        # it commits), in card order (a replacement card is newer: a higher id), as tap batches lock them.
        own = await conn.fetchrow("SELECT status, replaced_by FROM card WHERE card_id = $1", card_id)
        home, home_balance, home_status, nxt = (
            card_id,
            balance,
            card.CardStatus(own["status"]),
            own["replaced_by"],
        )
        for _ in range(_REPLACEMENT_HOPS_MAX):
            if home_status != card.CardStatus.REPLACED or nxt is None:
                break
            locked = await conn.fetchval("SELECT balance_fen FROM purse WHERE card_id = $1 FOR UPDATE", nxt)
            if locked is None:  # a replacement without a purse (not made by cardsvc): nowhere to carry to
                break
            st = await conn.fetchrow("SELECT status, replaced_by FROM card WHERE card_id = $1", nxt)
            home, home_balance, home_status = nxt, locked, card.CardStatus(st["status"])
            nxt = st["replaced_by"]
        if home_status in _DEAD and home_balance + amount > 0:
            raise ApiError(
                "card_unusable", "a cancelled card (or one whose replacement was cancelled) takes a correction "
                "only to settle its debt", extra={"card_status": home_status.api_name},
            )  # fmt: skip
        if home_balance + amount > svc.settings.purse_balance_max_fen:
            raise ApiError(
                "purse_balance_cap", f"at most {svc.settings.purse_balance_max_fen} fen", field="amount_fen"
            )
        ridecode = clearing_source(fare["kind"], fare["source"]) == ClearingSource.RIDE_CODE
        txn_id: int = await conn.fetchval(
            _JOURNAL_SQL, card_id, KIND_CORRECTION, actor.terminal_id, body["terminal_seq"], amount,
            fare["counterparty"], fare["line_id"], fare["station_id"], SOURCE_OFFICE,
        )  # fmt: skip
        await conn.execute(
            """INSERT INTO fare_correction (txn_id, card_id, corrects_txn_id, amount_fen, reason, fare_ridecode,
                                            terminal_id, terminal_seq, staff)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            txn_id, card_id, fare_txn, amount, body["reason"], ridecode, actor.terminal_id, body["terminal_seq"],
            actor.operator or "",
        )  # fmt: skip
        if home != card_id:
            # Carried to the live card: out of the replaced card's purse and into its successor's through the
            # replacement account, each side naming the other card (the pair `cardsvc audit` checks).
            for src, other, amt in ((card_id, home, -amount), (home, card_id, amount)):
                await conn.execute(
                    """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                                counterparty, source)
                       VALUES ($1, $2, $3, $4, $5, 1, now(), 'replacement', $6)""",
                    src, KIND_TRANSFER, actor.terminal_id, other, amt, SOURCE_OFFICE,
                )  # fmt: skip
            await conn.execute(
                "UPDATE purse SET balance_fen = balance_fen + $2, updated_at = now() WHERE card_id = $1",
                home,
                amount,
            )
        else:
            await conn.execute(
                "UPDATE purse SET balance_fen = $2, updated_at = now() WHERE card_id = $1",
                card_id,
                balance + amount,
            )
        new_balance = home_balance + amount
        await record_office_key(
            conn, actor, body["terminal_seq"], digest, card_id, amount, new_balance, txn_id
        )
    metrics.FARE_CORRECTIONS.labels(body["reason"]).inc()
    metrics.FARE_CORRECTION_FEN.labels(body["reason"]).inc(amount)
    return {
        "result": "approved",
        "txn_id": txn_id,
        "corrects_txn_id": fare_txn,
        "amount_fen": amount,
        "balance_fen": new_balance,
        "reason": body["reason"],
        "replayed_answer": False,
    }
