"""Verification of every credential a terminal can present.

Physical card (server-side HSM mode): the terminal forwards the card's challenge, its own challenge
(which carries its clock) and the card's INTERNAL AUTHENTICATE answer; we derive the card key, check
the cryptogram, then in one statement look the card up and record the terminal challenge as used.

Electronic card code: decode, check the time window, fetch the e-card's device key, verify the signature
off the event loop, then in one statement record the counter as used on the card the e-card belongs to at
that moment and read that card's status (`_ECARD_USE_SQL`).

Single use is enforced by the primary key of `credential_use`, so a code or answer used once is refused
the second time even when the two uses hit different worker processes or hosts. Every outcome is counted
in cardsvc_credential_verifications_total{kind, outcome}.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from cardsvc import metrics
from cardsvc.errors import ApiError
from cardsvc.services import Services
from protocols import card, ecard
from protocols.errors import CodecError

from .credential_use import KIND_CARD_CRYPTOGRAM, KIND_ECARD_CODE, KIND_RIDE_CODE
from .views import CARD_VIEW_COLUMNS, CARD_VIEW_FROM, card_view, usable

__all__ = ["KIND_CARD_CRYPTOGRAM", "KIND_ECARD_CODE", "KIND_RIDE_CODE", "verify_card", "verify_ecard_code"]

_ECARD_ID_MAX = 2**31 - 1  # token = ecard_id << 32 | counter must fit a bigint

# The use of an e-card code is recorded on the card that holds the e-card when the use commits, and the
# answer is about that card. A replacement moves the e-card and then copies its card's uses to the new
# card (flows/lifecycle.py); the share lock on the e-card row orders the two: a use committed first is
# copied, and one waiting for the replacement lands on the new card, where the copied uses are. (Read
# before the signature check instead, a use could land on the old card after the copy, and the code
# would be fresh again on the new one.) The new card's row is not in this statement's snapshot when it
# waited for the replacement: then the card is read again.
_ECARD_USE_SQL = f"""
WITH e AS (SELECT card_id, revoked_at FROM ecard WHERE ecard_id = $1 FOR SHARE),
     u AS (INSERT INTO credential_use (card_id, kind, token) SELECT card_id, {KIND_ECARD_CODE}, $2 FROM e
           ON CONFLICT DO NOTHING RETURNING 1)
SELECT EXISTS (SELECT 1 FROM u) AS fresh, e.revoked_at, {CARD_VIEW_COLUMNS}
FROM e LEFT JOIN ({CARD_VIEW_FROM}) ON c.card_id = e.card_id
"""
_ECARD_CARD_SQL = f"""
SELECT e.revoked_at, {CARD_VIEW_COLUMNS} FROM ecard e JOIN {CARD_VIEW_FROM} ON c.card_id = e.card_id
WHERE e.ecard_id = $1
"""

_OUTCOME_CODES = {
    "forged": "credential_forged",
    "replayed": "credential_replayed",
    "expired": "credential_expired",
    "malformed": "credential_malformed",
    "card_unusable": "card_unusable",
    "unknown_card": "unknown_card",
}


def _refuse(kind: str, outcome: str, started: float, detail: str | None = None, **extra: Any) -> ApiError:
    metrics.VERIFICATIONS.labels(kind, outcome).inc()
    metrics.VERIFICATION_DURATION.labels(kind).observe(time.perf_counter() - started)
    return ApiError(_OUTCOME_CODES[outcome], detail, extra=extra or None)


def _accept(kind: str, started: float) -> None:
    metrics.VERIFICATIONS.labels(kind, "ok").inc()
    metrics.VERIFICATION_DURATION.labels(kind).observe(time.perf_counter() - started)


_STALE = {"expired": "expired", "future": "stamped in the future"}


def _why_unusable(view: dict[str, Any]) -> str:
    if view["status"] != "active":
        return f"the card is {view['status']}"
    if view["app_locked"]:
        return "the card's application is locked"
    return "the card has expired"


def _token(challenge8: bytes) -> int:
    return int.from_bytes(challenge8, "big", signed=True)


async def verify_card(svc: Services, body: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    kind = "card_cryptogram"
    started = time.perf_counter()
    card_ch = bytes.fromhex(body["card_challenge"])
    term_ch = bytes.fromhex(body["terminal_challenge"])
    cryptogram = bytes.fromhex(body["cryptogram"])
    # The protocol's own rule (protocols/card.md): the clock skew on the future side only.
    s = svc.settings
    too_old = card.check_terminal_challenge(term_ch, int(now.timestamp()), s.card_challenge_age_s, s.clock_skew_s)
    if too_old is not None:
        raise _refuse(kind, "expired", started, f"the terminal challenge is {_STALE[too_old]}")
    if not svc.card_keys.verify(body["card_sn"], card_ch, term_ch, cryptogram):
        raise _refuse(kind, "forged", started)
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow(
            f"""WITH c AS (SELECT {CARD_VIEW_COLUMNS} FROM {CARD_VIEW_FROM} WHERE c.card_sn = $1),
                     u AS (INSERT INTO credential_use (card_id, kind, token)
                           SELECT card_id, {KIND_CARD_CRYPTOGRAM}, $2 FROM c
                           ON CONFLICT DO NOTHING RETURNING 1)
                SELECT c.*, EXISTS (SELECT 1 FROM u) AS fresh FROM c""",
            body["card_sn"],
            _token(term_ch),
        )
    if row is None:
        raise _refuse(kind, "unknown_card", started)
    if not row["fresh"]:
        raise _refuse(kind, "replayed", started)
    view = card_view(row, now)
    if not usable(row, now):
        raise _refuse(
            kind, "card_unusable", started, _why_unusable(view), card_status=view["status"]
        )
    _accept(kind, started)
    return {"result": "ok", "credential": "card", "card": view}


async def verify_ecard_code(svc: Services, body: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    kind = "ecard_code"
    started = time.perf_counter()
    try:
        code = ecard.decode_code(body["code"])
    except CodecError:
        raise _refuse(kind, "malformed", started) from None
    s = svc.settings
    too_old = ecard.check_freshness(code, int(now.timestamp()), s.ecard_code_lifetime_s, s.clock_skew_s)
    if too_old is not None:
        raise _refuse(kind, "expired", started, f"the code is {_STALE[too_old]}")
    if not 0 < code.ecard_id <= _ECARD_ID_MAX:
        raise _refuse(kind, "forged", started)
    async with svc.pool.acquire() as conn:
        key = await conn.fetchrow("SELECT alg, device_key FROM ecard WHERE ecard_id = $1", code.ecard_id)
        if key is None or key["alg"] != code.alg:
            raise _refuse(kind, "forged", started)
        ok = await svc.run_in_signature_pool(ecard.verify_code, code, bytes(key["device_key"]))
        if not ok:
            raise _refuse(kind, "forged", started)
        row = await conn.fetchrow(_ECARD_USE_SQL, code.ecard_id, (code.ecard_id << 32) | code.counter)
        assert row is not None  # e-cards are never deleted
        fresh = row["fresh"]
        if fresh and row["card_id"] is None:  # the card it moved to while the use waited: read it now
            row = await conn.fetchrow(_ECARD_CARD_SQL, code.ecard_id)
            assert row is not None
    if not fresh:
        raise _refuse(kind, "replayed", started)
    view = card_view(row, now)
    if row["revoked_at"] is not None:
        raise _refuse(kind, "card_unusable", started, "the electronic card is revoked", card_status="revoked")
    if not usable(row, now):
        raise _refuse(
            kind, "card_unusable", started, _why_unusable(view), card_status=view["status"]
        )
    _accept(kind, started)
    return {
        "result": "ok",
        "credential": "ecard",
        "ecard_id": code.ecard_id,
        "business_type": body["business_type"],
        "card": view,
    }
