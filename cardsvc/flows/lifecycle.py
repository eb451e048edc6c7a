"""The card lifecycle state machine (DOMAIN.md §3) and its application to the database.

`plan()` is pure: (card state, operation) -> the new state and the hotlist change, or the reason the
operation is illegal. `apply()` runs it on one card under a row lock (`SELECT ... FOR UPDATE`), so
concurrent operations on a card serialise: each sees the state the previous one committed. The
status change, the audit event and the hotlist entry commit together or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import asyncpg

from cardsvc.errors import ApiError
from cardsvc.localtime import local_date
from protocols.card import CardStatus, HotlistAction, HotlistReason

from .actor import SYSTEM, Actor
from .credentials import KIND_ECARD_CODE, KIND_RIDE_CODE
from .hotlist import append_entry
from .registry import get_card
from .views import effective_status

__all__ = ["OPERATIONS", "CardState", "Plan", "apply", "expire_one", "expire_temporary_losses", "plan"]

S = CardStatus
LIVE = frozenset({S.ISSUED, S.ACTIVE, S.TEMP_LOST})


@dataclasses.dataclass(frozen=True, slots=True)
class CardState:
    status: CardStatus
    pin_locked: bool
    app_locked: bool
    purse_balance_fen: int = 0

    @property
    def usable(self) -> bool:
        return self.status == S.ACTIVE and not self.app_locked

    @property
    def listed(self) -> bool:
        """On the hotlist: in circulation (activated at some point) and not usable. A card still in the
        card office (issued, never activated) is in nobody's hands and needs no listing."""
        return self.status != S.ISSUED and not self.usable


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    after: CardState
    hotlist: tuple[HotlistAction, HotlistReason] | None


# operation -> (statuses it may start from, status after (None: unchanged), flag changes)
_TABLE: dict[str, tuple[frozenset[CardStatus], CardStatus | None, dict[str, bool]]] = {
    "activate": (frozenset({S.ISSUED}), S.ACTIVE, {}),
    "temporary-loss": (frozenset({S.ACTIVE}), S.TEMP_LOST, {}),
    "lift-loss": (frozenset({S.TEMP_LOST}), S.ACTIVE, {}),
    "formal-loss": (frozenset({S.ISSUED, S.ACTIVE, S.TEMP_LOST}), S.LOST, {}),
    "replace": (frozenset({S.ACTIVE, S.TEMP_LOST, S.LOST}), S.REPLACED, {}),
    "cancel": (frozenset({S.ISSUED, S.ACTIVE, S.TEMP_LOST, S.LOST}), S.CANCELLED, {}),
    "lock-pin": (LIVE, None, {"pin_locked": True}),
    "unlock-pin": (LIVE, None, {"pin_locked": False}),
    "lock-app": (LIVE, None, {"app_locked": True}),
    "unlock-app": (LIVE, None, {"app_locked": False}),
}
OPERATIONS = tuple(_TABLE)

# Why a card became unusable / usable again, for the hotlist.
_BLOCK_REASON = {
    "temporary-loss": HotlistReason.TEMP_LOSS,
    "formal-loss": HotlistReason.FORMAL_LOSS,
    "replace": HotlistReason.REPLACED,
    "cancel": HotlistReason.CANCELLED,
    "lock-app": HotlistReason.APP_LOCKED,
}
_UNBLOCK_REASON = {
    "lift-loss": HotlistReason.LOSS_LIFTED,
    "unlock-app": HotlistReason.APP_UNLOCKED,
}


class IllegalTransition(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def plan(state: CardState, op: str) -> Plan:
    """The outcome of `op` on a card in `state`, or IllegalTransition with a reason."""
    assert op in _TABLE, op
    allowed_from, status_after, flags = _TABLE[op]
    if state.status not in allowed_from:
        raise IllegalTransition(f"cannot {op} a card whose status is {state.status.api_name}")
    for flag, value in flags.items():
        if getattr(state, flag) == value:
            raise IllegalTransition(f"cannot {op}: {flag.replace('_', ' ')} is already {value}")
    if op == "cancel" and state.purse_balance_fen > 0:
        raise IllegalTransition("cannot cancel a card whose transit purse still holds money; refund it first")
    after = dataclasses.replace(state, status=status_after or state.status, **flags)
    change: tuple[HotlistAction, HotlistReason] | None = None
    if after.listed and not state.listed:
        # Activating an application-locked card puts it in circulation unusable: list it at once.
        change = (HotlistAction.BLOCK, _BLOCK_REASON[op] if op != "activate" else HotlistReason.APP_LOCKED)
    elif state.listed and not after.listed:
        change = (HotlistAction.UNBLOCK, _UNBLOCK_REASON[op])
    return Plan(after, change)


async def _record(
    conn: asyncpg.Connection,
    card_id: int,
    card_sn: str,
    op: str,
    actor: Actor,
    before: CardStatus | None,
    p: Plan,
    detail: dict[str, Any],
) -> None:
    await conn.execute(
        """INSERT INTO card_event (card_id, op, terminal_id, operator, request_id, status_before,
                                   status_after, detail)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        card_id,
        op,
        actor.terminal_id,
        actor.operator,
        actor.request_id,
        int(before) if before is not None else None,
        int(p.after.status),
        detail,
    )
    if p.hotlist is not None:
        await append_entry(conn, card_id, card_sn, *p.hotlist)


async def apply(
    conn: asyncpg.Connection,
    card_no: str,
    op: str,
    body: dict[str, Any],
    actor: Actor,
    now: dt.datetime,
    temp_loss_days: int,
) -> dict[str, Any]:
    async with conn.transaction():
        row = await conn.fetchrow(
            """SELECT c.card_id, c.holder_id, c.card_sn, c.status, c.pin_locked, c.app_locked,
                      coalesce(p.balance_fen, 0) AS purse_balance_fen, c.temp_loss_until, c.has_purse,
                      c.generation, c.bank_code, c.financial_active
               FROM card c LEFT JOIN purse p ON p.card_id = c.card_id
               WHERE c.card_no = $1 FOR UPDATE OF c""",
            card_no,
        )
        if row is None:
            raise ApiError("not_found", "no such card")
        status = effective_status(row["status"], row["temp_loss_until"], now)
        if status != row["status"]:
            # The temporary loss ran out before the sweeper saw it: record that first.
            await expire_one(conn, row["card_id"], row["card_sn"], row["app_locked"])
        balance = row["purse_balance_fen"]
        if op == "cancel" and row["has_purse"]:
            # The join above read the purse unlocked: a top-up may have committed since. Card, then purse
            # is the order a replacement takes too.
            balance = await conn.fetchval(
                "SELECT balance_fen FROM purse WHERE card_id = $1 FOR UPDATE", row["card_id"]
            ) or 0
        state = CardState(status, row["pin_locked"], row["app_locked"], balance)
        try:
            p = plan(state, op)
        except IllegalTransition as exc:
            raise ApiError("illegal_transition", exc.detail, extra={"card_status": status.api_name}) from None

        detail: dict[str, Any] = {}
        # A temporary loss runs from its report: a flag changed meanwhile (a PIN or application lock) keeps its end.
        new_loss = p.after.status == S.TEMP_LOST and status != S.TEMP_LOST
        temp_until = row["temp_loss_until"] if p.after.status == S.TEMP_LOST else None
        if new_loss:
            temp_until = now + dt.timedelta(days=temp_loss_days)
        await conn.execute(
            """UPDATE card SET status = $2, pin_locked = $3, app_locked = $4, temp_loss_until = $5,
                      status_changed_at = CASE WHEN status <> $2 THEN now() ELSE status_changed_at END
               WHERE card_id = $1""",
            row["card_id"],
            int(p.after.status),
            p.after.pin_locked,
            p.after.app_locked,
            temp_until,
        )
        if new_loss and temp_until is not None:
            detail["temp_loss_until"] = temp_until.isoformat()
        if op == "replace":
            detail.update(await _replace(conn, row, body, actor, now))
        elif op == "cancel":
            revoked = await conn.fetchval(
                "UPDATE ecard SET revoked_at = now() WHERE card_id = $1 AND revoked_at IS NULL RETURNING ecard_id",
                row["card_id"],
            )
            if revoked is not None:  # the e-card goes with the card: its event says which (one live per card)
                detail["ecard_revoked"] = revoked
        await _record(conn, row["card_id"], row["card_sn"], op, actor, status, p, detail)
    return await get_card(conn, body["new_card_no"] if op == "replace" else card_no, now)


async def _replace(
    conn: asyncpg.Connection, old: asyncpg.Record, body: dict[str, Any], actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    """补卡/换卡: a new card number and chip for the same holder; the purse balance and the electronic
    card move to the new card; the old card is dead."""
    if body["expires_on"] <= local_date(now):
        raise ApiError("invalid_field", "expires_on must be in the future", field="expires_on")
    try:
        new_id = await conn.fetchval(
            """INSERT INTO card (holder_id, card_no, card_sn, status, generation, issuing_area, bank_code,
                                 financial_active, has_purse, expires_on)
               VALUES ($1, $2, $3, $4, 3, $5, $6, $7, $8, $9) RETURNING card_id""",
            old["holder_id"],
            body["new_card_no"],
            body["new_card_sn"],
            int(S.ACTIVE),
            body["new_card_sn"][:6],
            old["bank_code"],
            old["financial_active"],
            old["has_purse"],
            body["expires_on"],
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "card_one_live_per_holder":  # the holder was issued another card meanwhile
            raise ApiError("holder_has_live_card", field="holder_id") from None
        field = "new_card_sn" if exc.constraint_name == "card_card_sn_key" else "new_card_no"
        raise ApiError("card_exists", field=field) from None
    await conn.execute("UPDATE card SET replaced_by = $2 WHERE card_id = $1", old["card_id"], new_id)
    # What moves is the balance read under the purse lock, not the one read before it.
    purse_moved = await move_purse(conn, old["card_id"], new_id, actor) if old["has_purse"] else 0
    moved = await conn.fetchval(
        "UPDATE ecard SET card_id = $2 WHERE card_id = $1 AND revoked_at IS NULL RETURNING ecard_id",
        old["card_id"],
        new_id,
    )
    # Single use follows the e-card, and the purse (ride-code rides taken before the replacement and
    # uploaded after it are charged to the new card, docs/transit.md): a code used on the old card stays used.
    kinds = [KIND_ECARD_CODE] if moved is not None else []
    if old["has_purse"]:
        kinds.append(KIND_RIDE_CODE)
    if kinds:
        await conn.execute(
            """INSERT INTO credential_use (card_id, kind, token, used_at)
               SELECT $2, kind, token, used_at FROM credential_use WHERE card_id = $1 AND kind = ANY($3::smallint[])
               ON CONFLICT DO NOTHING""",
            old["card_id"],
            new_id,
            kinds,
        )
    await conn.execute(
        """INSERT INTO card_event (card_id, op, terminal_id, operator, request_id, status_before, status_after,
                                   detail)
           VALUES ($1, 'issue-replacement', $2, $3, $4, NULL, $5, $6)""",
        new_id,
        actor.terminal_id,
        actor.operator,
        actor.request_id,
        int(S.ACTIVE),
        {"replaces_card_id": old["card_id"], "purse_moved_fen": purse_moved},
    )
    return {
        "new_card_id": new_id,
        "purse_moved_fen": purse_moved,
        "ecard_moved": moved is not None,
    }


async def move_purse(conn: asyncpg.Connection, old_id: int, new_id: int, actor: Actor) -> int:
    """The purse moves to the replacement card: its balance, by two journal transfers through the
    'replacement' account (which nets to zero), so each purse still equals the sum of its journal; and its
    fare state (an open metro journey, the transfer window, the day's total), so that the new card's next
    tap charges a journey the old card left open, as the old card's would have."""
    balance: int = await conn.fetchval(
        "SELECT balance_fen FROM purse WHERE card_id = $1 FOR UPDATE", old_id
    ) or 0
    await conn.execute(
        "INSERT INTO purse (card_id, balance_fen, journey) SELECT $1, $2, journey FROM purse WHERE card_id = $3",
        new_id,
        balance,
        old_id,
    )
    await conn.execute("UPDATE purse SET balance_fen = 0, journey = NULL WHERE card_id = $1", old_id)
    if balance:
        await conn.execute(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, source)
               VALUES ($1, 7, $3, $2, $4, 1, now(), 'replacement', 4), ($2, 7, $3, $1, $5, 1, now(), 'replacement', 4)""",
            old_id, new_id, actor.terminal_id, -balance, balance,
        )
    return balance


async def record_lapsed_loss(conn: asyncpg.Connection, row: Any) -> int:
    """For a card locked FOR UPDATE and found usable (`views.usable`): a temporary loss still stored is one
    that ran out before the sweeper saw it. Record its expiry now (event, hotlist unblock), so that gates
    accept the card at once and the caller's own event says what it decided on; returns the status now."""
    if row["status"] != int(S.ACTIVE):
        await expire_one(conn, row["card_id"], row["card_sn"], row["app_locked"])
        return int(S.ACTIVE)
    return int(row["status"])


async def expire_one(conn: asyncpg.Connection, card_id: int, card_sn: str, app_locked: bool) -> None:
    await conn.execute(
        "UPDATE card SET status = $2, temp_loss_until = NULL, status_changed_at = now() WHERE card_id = $1",
        card_id,
        int(S.ACTIVE),
    )
    before = CardState(S.TEMP_LOST, False, app_locked)
    after = dataclasses.replace(before, status=S.ACTIVE)
    change = (HotlistAction.UNBLOCK, HotlistReason.LOSS_EXPIRED) if not after.listed else None
    await _record(
        conn, card_id, card_sn, "temporary-loss-expired", SYSTEM, S.TEMP_LOST, Plan(after, change), {}
    )


async def expire_temporary_losses(pool: asyncpg.Pool, batch_rows_max: int = 500) -> int:
    """Record every temporary loss whose period has run out (the sweeper); returns how many."""
    done = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT card_id, card_sn, app_locked FROM card
                   WHERE status = 3 AND temp_loss_until <= now()
                   ORDER BY temp_loss_until LIMIT $1 FOR UPDATE SKIP LOCKED""",
                batch_rows_max,
            )
            for r in rows:
                await expire_one(conn, r["card_id"], r["card_sn"], r["app_locked"])
        done += len(rows)
        if len(rows) < batch_rows_max:
            return done
