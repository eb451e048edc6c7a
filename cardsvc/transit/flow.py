"""Transit use cases on top of the batch engine (taps.py): an online tap's credential check, purse
top-ups and views, and ride-code certificates.

A tap's credential is checked before the batch: a card cryptogram needs no database, an e-card code needs
its device key (one read), a ride code needs nothing but the issuer key (verified as a gate would, at the
tap's time). A credential that does not verify becomes a *declined* item: the batch still records the
answer under the terminal's sequence number, so a retry gets the same answer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import asyncpg

from cardsvc import localtime
from cardsvc.errors import ApiError
from cardsvc.flows import lifecycle, views
from cardsvc.flows.actor import Actor
from cardsvc.flows.credentials import KIND_CARD_CRYPTOGRAM, KIND_ECARD_CODE, KIND_RIDE_CODE
from cardsvc.services import Services
from protocols import card, ecard, ridecode, sm
from protocols.errors import CodecError

from . import fare_table, fares
from .context import TransitContext
from .taps import KIND_TOPUP, SOURCE_OFFICE, SOURCE_RIDECODE, TapItem, request_hash

__all__ = [
    "KIND_RIDE_CODE",
    "TransitContext",
    "build_tap_item",
    "issue_ride_cert",
    "prior_office_answer",
    "purse_card",
    "purse_view",
    "record_office_key",
    "top_up",
]

ISSUER_KEY_ID = 1
PURSE_HISTORY_ROWS = 20  # the default page of a purse's history
PURSE_HISTORY_ROWS_MAX = 200
_ECARD_ID_MAX = 2**31 - 1


async def build_tap_item(
    svc: Services,
    ctx: TransitContext,
    terminal_id: str,
    body: dict[str, Any],
    now: dt.datetime,
    nonce: str | None = None,
) -> TapItem:
    """Validate the tap against the fare table's shape and check its credential. `nonce`: the request's,
    recorded by the batch (None: already recorded)."""
    s = svc.settings
    now_s = int(now.timestamp())
    if body["mode"] == "metro":
        if body["direction"] == "single" or body["station_id"] is None:
            raise ApiError(
                "invalid_field", "a metro tap has direction in/out and a station_id", field="direction"
            )
        if body["station_id"] not in ctx.table.stations:
            raise ApiError("invalid_field", "unknown station", field="station_id")
        if body["line_id"] not in ctx.table.place_lines[fare_table.place_of(ctx.table, body["station_id"])]:
            raise ApiError("invalid_field", "this metro line does not serve the station", field="line_id")
    elif body["direction"] != "single":
        raise ApiError("invalid_field", "a bus tap has direction single", field="direction")
    elif body["line_id"] not in ctx.table.bus_lines:
        raise ApiError("invalid_field", "unknown bus line", field="line_id")
    elif body["station_id"] is not None:
        # The fare table has no bus stops: an id here could not be checked, yet would reach the journal
        # and the operator's clearing file.
        raise ApiError("invalid_field", "a bus tap has no station_id", field="station_id")
    tap = fares.Tap(body["time"], body["mode"], body["line_id"], body["station_id"], body["direction"])
    base = {
        "terminal_id": terminal_id,
        "terminal_seq": body["terminal_seq"],
        "request_hash": request_hash(body),
        "tap": tap,
        "overdraft_fen": s.purse_overdraft_fen,
        "nonce": nonce,
    }
    if abs(body["time"] - now_s) > s.clock_skew_s:
        # A business answer, not a 400: it is stored under the terminal's sequence number, so a retry of an
        # answered tap sent after the window still gets its stored answer. Offline taps are uploaded.
        return TapItem(declined="tap_time_out_of_window", **base)
    kind = body["credential"]
    if kind == "card":
        return _card_item(svc, body, base, now_s)
    if kind == "ecard_code":
        return await _ecard_item(svc, body, base, now_s)
    return await _ride_item(svc, ctx, body, base)


def _require(body: dict[str, Any], *names: str) -> None:
    for name in names:
        if body.get(name) is None:
            raise ApiError("missing_field", f"{name} is required for this credential", field=name)


def _card_item(svc: Services, body: dict[str, Any], base: dict[str, Any], now_s: int) -> TapItem:
    _require(body, "card_sn", "card_challenge", "terminal_challenge", "cryptogram")
    term_ch = bytes.fromhex(body["terminal_challenge"])
    item = TapItem(
        card_sn=body["card_sn"],
        cred_kind=KIND_CARD_CRYPTOGRAM,
        cred_token=int.from_bytes(term_ch, "big", signed=True),
        **base,
    )
    s = svc.settings
    if card.check_terminal_challenge(term_ch, now_s, s.card_challenge_age_s, s.clock_skew_s) is not None:
        return dataclasses.replace(item, declined="credential_expired")
    if not svc.card_keys.verify(
        body["card_sn"], bytes.fromhex(body["card_challenge"]), term_ch, bytes.fromhex(body["cryptogram"])
    ):
        return dataclasses.replace(item, declined="credential_forged")
    return item


async def _ecard_item(svc: Services, body: dict[str, Any], base: dict[str, Any], now_s: int) -> TapItem:
    _require(body, "code")
    try:
        code = ecard.decode_code(body["code"])
    except CodecError:
        return TapItem(declined="credential_malformed", **base)
    if ecard.check_freshness(code, now_s, svc.settings.ecard_code_lifetime_s, svc.settings.clock_skew_s) is not None:
        return TapItem(declined="credential_expired", **base)
    if not 0 < code.ecard_id <= _ECARD_ID_MAX:
        return TapItem(declined="credential_forged", **base)
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT card_id, alg, device_key, revoked_at FROM ecard WHERE ecard_id = $1", code.ecard_id
        )
    if row is None or row["alg"] != code.alg:
        return TapItem(declined="credential_forged", **base)
    item = TapItem(
        card_id=row["card_id"],
        cred_kind=KIND_ECARD_CODE,
        cred_token=(code.ecard_id << 32) | code.counter,
        **base,
    )
    if not await svc.run_in_signature_pool(ecard.verify_code, code, bytes(row["device_key"])):
        return dataclasses.replace(item, declined="credential_forged", cred_kind=None, cred_token=None)
    # A revoked e-card is refused by the batch, which reads revocations once it holds the purse locks: a
    # revocation that commits while this tap waits is seen there (`card_unusable`, `card_status` revoked).
    return item


_GATE_DECLINES = {
    ridecode.GateOutcome.MALFORMED: "credential_malformed",
    ridecode.GateOutcome.BAD_ISSUER_SIGNATURE: "credential_forged",
    ridecode.GateOutcome.BAD_USER_SIGNATURE: "credential_forged",
    ridecode.GateOutcome.DENIED: "card_unusable",
    ridecode.GateOutcome.CERT_EXPIRED: "credential_expired",
    ridecode.GateOutcome.CODE_EXPIRED: "credential_expired",
}


async def ride_item(svc: Services, ctx: TransitContext, code_text: str, base: dict[str, Any]) -> TapItem:
    """A ride code, verified exactly as the gate did, at the ride's time (also used for uploads)."""
    tap: fares.Tap = base["tap"]
    decision = await svc.run_in_signature_pool(
        ridecode.verify_at_gate,
        code_text,
        {ISSUER_KEY_ID: ctx.issuer_public},
        tap.time,
        (),
        (),
        svc.settings.ecard_code_lifetime_s,
        svc.settings.clock_skew_s,
    )
    assert isinstance(decision, ridecode.GateDecision)
    if not decision.ok or decision.code is None:
        return TapItem(declined=_GATE_DECLINES.get(decision.outcome, "credential_forged"), **base)
    cert = decision.code.cert
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT card_id, revoked_at FROM ride_cert WHERE cert_serial = $1", cert.cert_serial
        )
    if row is None or row["card_id"] != cert.account_id:
        return TapItem(declined="credential_forged", **base)
    base = {
        **base,
        "overdraft_fen": max(base["overdraft_fen"], cert.credit_limit_fen),
        "tap": dataclasses.replace(base["tap"], max_fare_fen=cert.max_fare_fen),
    }
    item = TapItem(
        card_id=cert.account_id,
        cred_kind=KIND_RIDE_CODE,
        cred_token=(cert.cert_serial << 32) | decision.code.counter,
        source=SOURCE_RIDECODE,
        **base,
    )
    if row["revoked_at"] is not None:
        return dataclasses.replace(item, declined="card_unusable")
    return item


async def _ride_item(
    svc: Services, ctx: TransitContext, body: dict[str, Any], base: dict[str, Any]
) -> TapItem:
    _require(body, "code")
    return await ride_item(svc, ctx, body["code"], base)


# ------------------------------------------------------------------ purse


async def purse_card(conn: asyncpg.Connection, card_no: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        """SELECT c.card_id, c.has_purse, p.balance_fen FROM card c LEFT JOIN purse p ON p.card_id = c.card_id
           WHERE c.card_no = $1""",
        card_no,
    )
    if row is None:
        raise ApiError("not_found", "no such card")
    if not row["has_purse"] or row["balance_fen"] is None:
        raise ApiError("no_transit_purse")
    return row


def _movement(h: asyncpg.Record) -> dict[str, Any]:
    """A purse history row; `quota_ride` only on a fare that used an elderly quota ride."""
    out = {
        "txn_id": h["txn_id"],
        "kind": h["kind"],
        "amount_fen": h["amount_fen"],
        "at": h["at"].isoformat(),
        "counterparty": h["counterparty"],
        "line_id": h["line_id"],
        "station_id": h["station_id"],
    }
    if h["quota_ride"]:
        out["quota_ride"] = True
    return out


def history_cursor(at: dt.datetime, txn_id: int) -> str:
    """The `before` cursor of the rows after (older than) the journal row (at, txn_id): its time in unix
    microseconds and its id."""
    delta = at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return f"{micros}.{txn_id}"


def parse_history_cursor(text: str) -> tuple[dt.datetime, int]:
    """`history_cursor`'s inverse; ValueError for anything else."""
    micros, _, txn = text.partition(".")
    if not (micros.isascii() and micros.isdigit() and txn.isascii() and txn.isdigit()) or len(micros) > 17 or len(txn) > 19:
        raise ValueError("before is <microseconds>.<txn_id>, as a page's next_before")
    if int(txn) > 2**63 - 1:  # a txn id is a bigint
        raise ValueError("before's txn_id is out of range")
    at = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(micros))
    return at, int(txn)


async def purse_view(
    conn: asyncpg.Connection, card_no: str, limit: int = PURSE_HISTORY_ROWS, before: tuple[dt.datetime, int] | None = None
) -> dict[str, Any]:
    """The balance and a page of the purse's journal rows, newest first (ride time, then id): the latest
    `limit`, or those older than the cursor `before` (a previous page's `next_before`). Keyset paging on
    the journal's primary key (card_id, at, txn_id), so any page costs the same."""
    row = await purse_card(conn, card_no)
    at, txn = before if before is not None else (None, None)
    history = await conn.fetch(
        """SELECT txn_id, kind, amount_fen, at, counterparty, line_id, station_id, quota_ride FROM txn_journal
           WHERE card_id = $1 AND ($3::timestamptz IS NULL OR (at, txn_id) < ($3, $4::bigint))
           ORDER BY at DESC, txn_id DESC LIMIT $2""",
        row["card_id"], limit + 1, at, txn,
    )  # fmt: skip
    more = len(history) > limit
    history = history[:limit]
    return {
        "card_no": card_no,
        "balance_fen": row["balance_fen"],
        "next_before": history_cursor(history[-1]["at"], history[-1]["txn_id"]) if more else None,
        "history": [_movement(h) for h in history],
    }


_DEAD = (card.CardStatus.REPLACED, card.CardStatus.CANCELLED)

# The key's earlier answer: topup_key (the card office's answers, kept for good: a top-up has no time of its own
# to refuse a late copy with; migration 0009), else terminal_txn (any transaction, kept for a retention period).
_PRIOR_TOPUP_SQL = """
SELECT request_hash, 'approved' AS result, amount_fen, balance_fen, txn_id, 0 AS pref FROM topup_key
WHERE terminal_id = $1 AND terminal_seq = $2
UNION ALL
SELECT request_hash, result, amount_fen, balance_fen, txn_id, 1 FROM terminal_txn
WHERE terminal_id = $1 AND terminal_seq = $2
ORDER BY pref
LIMIT 1
"""


async def office_key_taken(pool: asyncpg.Pool, terminal_id: str, terminal_seq: int) -> bool:
    """Whether a card-office answer (top-up, fare correction, quota ride return) holds this key for good. A
    tap checks it before its batch, since the batch reads only terminal_txn: while that answer is there too
    (the retention period), the tap's write conflicts with it anyway."""
    async with pool.acquire() as conn:
        return bool(
            await conn.fetchval(
                "SELECT 1 FROM topup_key WHERE terminal_id = $1 AND terminal_seq = $2", terminal_id, terminal_seq
            )
        )


async def prior_office_answer(
    conn: asyncpg.Connection, terminal_id: str, terminal_seq: int, digest: bytes
) -> asyncpg.Record | None:
    """The earlier answer under a card-office key (a top-up, refund or fare correction: one key space per
    terminal with its taps), or None. A different request under the key is `idempotency_conflict`. Call it
    holding the purse lock: a resent request that waited for its original's lock then reads its answer."""
    prior: asyncpg.Record | None = await conn.fetchrow(_PRIOR_TOPUP_SQL, terminal_id, terminal_seq)
    if prior is not None and bytes(prior["request_hash"]) != digest:
        raise ApiError("idempotency_conflict", field="terminal_seq")
    return prior


async def record_office_key(
    conn: asyncpg.Connection, actor: Actor, terminal_seq: int, digest: bytes, card_id: int, amount_fen: int,
    balance_fen: int, txn_id: int,
) -> None:
    """Keep a card-office answer under its key: in terminal_txn (the answer of every terminal transaction)
    and for good in topup_key (migration 0009), with the clerk (`actor.operator`, '' for none; 0023)."""
    try:
        await conn.execute(
            """WITH k AS (
                   INSERT INTO topup_key (terminal_id, terminal_seq, request_hash, card_id, amount_fen,
                                          balance_fen, txn_id, staff)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               )
               INSERT INTO terminal_txn (terminal_id, terminal_seq, request_hash, card_id, result,
                                         amount_fen, balance_fen, txn_id)
               VALUES ($1, $2, $3, $4, 'approved', $5, $6, $7)""",
            actor.terminal_id, terminal_seq, digest, card_id, amount_fen, balance_fen, txn_id, actor.operator or "",
        )  # fmt: skip
    except asyncpg.UniqueViolationError:
        # The key was taken meanwhile by a request for another card (the same card would have waited for
        # the purse lock and seen it): a different payload under one key.
        raise ApiError("idempotency_conflict", field="terminal_seq") from None


async def top_up(
    conn: asyncpg.Connection, svc: Services, card_no: str, body: dict[str, Any], actor: Actor
) -> dict[str, Any]:
    """Credit a purse (card office or bank channel): idempotent per (terminal, terminal_seq)."""
    digest = request_hash({**body, "card_no": card_no})
    async with conn.transaction():
        row = await purse_card(conn, card_no)
        # The purse lock first, then the earlier answer: a resent top-up that waited for its original's
        # lock then reads the original's answer instead of writing the same key again.
        balance: int = await conn.fetchval(
            "SELECT balance_fen FROM purse WHERE card_id = $1 FOR UPDATE", row["card_id"]
        )
        prior = await prior_office_answer(conn, actor.terminal_id, body["terminal_seq"], digest)
        if prior is not None:
            return {
                "result": prior["result"],
                "amount_fen": prior["amount_fen"],
                "balance_fen": prior["balance_fen"],
                "txn_id": prior["txn_id"],
                "replayed_answer": True,
            }
        sign = -1 if body["channel"] == "refund" else 1
        new_balance = balance + sign * body["amount_fen"]
        if sign > 0 and new_balance > 0:
            # Money onto a dead card would be stuck there (a replacement moved the balance, a cancel needed
            # it empty): a credit only settles its debt, up to 0. Read after the purse lock: a replacement
            # or a cancel holds it while it commits.
            status = await conn.fetchval("SELECT status FROM card WHERE card_id = $1", row["card_id"])
            if status in _DEAD:
                raise ApiError(
                    "card_unusable", "a replaced or cancelled card takes a top-up only to settle its debt",
                    extra={"card_status": card.CardStatus(status).api_name},
                )  # fmt: skip
        # Each bound only against the money's direction: a top-up smaller than a debt settles part of it
        # (the balance stays below 0), and a refund from a purse above the maximum (a late refund of a
        # penalty, a maximum lowered since) takes money out.
        if sign > 0 and new_balance > svc.settings.purse_balance_max_fen:
            raise ApiError(
                "purse_balance_cap", f"at most {svc.settings.purse_balance_max_fen} fen", field="amount_fen"
            )
        if sign < 0 and new_balance < 0:
            raise ApiError("invalid_field", "a refund cannot exceed the balance", field="amount_fen")
        txn_id = await conn.fetchval(
            """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at,
                                        counterparty, source)
               VALUES ($1, $2, $3, $4, $5, 1, now(), $6, $7) RETURNING txn_id""",
            row["card_id"],
            KIND_TOPUP,
            actor.terminal_id,
            body["terminal_seq"],
            sign * body["amount_fen"],
            f"topup:{body['channel']}",
            SOURCE_OFFICE,
        )
        await conn.execute(
            "UPDATE purse SET balance_fen = $2, updated_at = now() WHERE card_id = $1",
            row["card_id"],
            new_balance,
        )
        await record_office_key(
            conn, actor, body["terminal_seq"], digest, row["card_id"], sign * body["amount_fen"],
            new_balance, txn_id,
        )  # fmt: skip
    return {
        "result": "approved",
        "amount_fen": sign * body["amount_fen"],
        "balance_fen": new_balance,
        "txn_id": txn_id,
        "replayed_answer": False,
    }


# ------------------------------------------------------------------ ride-code certificates


async def issue_ride_cert(
    conn: asyncpg.Connection, svc: Services, ctx: TransitContext, body: dict[str, Any], now: dt.datetime
) -> dict[str, Any]:
    """Sign the phone's key for offline ride codes on an active card with a transit purse."""
    key = bytes.fromhex(body["user_public_key"])
    try:
        sm.validate_public_key(body["alg"], key)
    except CodecError:
        raise ApiError(
            "invalid_field", "user_public_key is not a valid public key", field="user_public_key"
        ) from None
    valid_from = int(now.timestamp())
    valid_to = valid_from + svc.settings.ride_cert_days * 86400
    async with conn.transaction():
        row = await conn.fetchrow(
            """SELECT card_id, card_sn, status, temp_loss_until, expires_on, app_locked, has_purse FROM card
               WHERE card_no = $1 FOR UPDATE""",
            body["card_no"],
        )
        if row is None:
            raise ApiError("not_found", "no such card", field="card_no")
        if not views.usable(row, now):  # active (a temporary loss that ran out is), not locked, not expired
            raise ApiError("card_not_active", field="card_no")
        # A temporary loss that ran out: recorded first, so that the hotlist unblocks the card (its account)
        # and gates accept the certificate's codes now, not at the sweep.
        await lifecycle.record_lapsed_loss(conn, row)
        if not row["has_purse"]:
            raise ApiError("no_transit_purse")
        # Not beyond the card's last valid day: a gate knows the card only by this certificate and the hotlist,
        # where an expired card is not listed, and a ride after it is declined at upload (nobody pays it).
        valid_to = min(valid_to, int(localtime.day_end(row["expires_on"]).timestamp()))
        serial: int = await conn.fetchval(
            """INSERT INTO ride_cert (card_id, alg, user_key, valid_from, valid_to)
               VALUES ($1, $2, $3, to_timestamp($4), to_timestamp($5)) RETURNING cert_serial""",
            row["card_id"],
            body["alg"],
            key,
            valid_from,
            valid_to,
        )
    cert = ridecode.issue_cert(
        ctx.issuer_private,
        issuer_key_id=ISSUER_KEY_ID,
        cert_serial=serial,
        account_id=row["card_id"],
        alg=body["alg"],
        user_public_key=key,
        valid_from=valid_from,
        valid_to=valid_to,
        max_fare_fen=svc.settings.ride_max_fare_fen,
        credit_limit_fen=svc.settings.ride_credit_limit_fen,
    )
    return {
        "cert_serial": serial,
        "cert": ridecode.encode_cert(cert).hex(),
        "valid_to": valid_to,
        "issuer_public_key": ctx.issuer_public.hex(),
    }
