"""Ride-code rides uploaded by gates: re-verified as the gate did (at the ride's time) and charged
post-paid by the online tap engine (taps.process_taps), in chunks, outside the online micro-batcher.

Each ride becomes a `TapItem` keyed by (gate, gate_seq) with the SM3 of its record as the request hash,
so a re-upload is answered from terminal_txn and the same record under another key is a conflict. The
ride code's (cert_serial, counter) is its single-use credential: the same code in two gate records is
charged once (the second is declined `credential_replayed`).

Verification mirrors `flow.ride_item` (the gate's checks at the ride's time, the certificate's account
and the credit limit as overdraft) with the certificate look-up done once per upload, not per ride.
One difference, on purpose: a certificate revoked *after* the ride is still charged (ridecode.md: "an
ok at the gate and a deny entry added later is the scheme's risk, not the operator's"); one revoked at
or before the ride's time is declined `card_unusable`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import orjson

from cardsvc import limits
from cardsvc.errors import RETRY_LATER, ApiError
from cardsvc.flows import hotlist as hotlist_flow
from cardsvc.services import Services
from protocols import ridecode
from protocols.card import CardStatus
from protocols.hotlist import HotlistEntry
from protocols.ridecode import RideBatch, RideRecord

from . import fares
from .context import TransitContext
from .flow import _GATE_DECLINES, ISSUER_KEY_ID, KIND_RIDE_CODE
from .offline import Served, served_to
from .taps import (
    SOURCE_RIDECODE,
    ReplacedMeanwhile,
    TapItem,
    TapOutcome,
    blocked_as_of,
    process_taps,
    stop_times,
)

__all__ = ["RIDE_AGE_S_MAX", "charge_rides", "ride_items", "ride_tap"]

RIDE_AGE_S_MAX = limits.UPLOAD_AGE_S_MAX
DECLINE_RIDE_TIME = "ride_time_out_of_range"
RESOLVE_ATTEMPTS_MAX = 3  # look-ups of a chunk's cards, when a replacement commits in between


def ride_tap(r: RideRecord) -> fares.Tap:
    """The fare engine's tap for a ride: metro when the gate names a station, bus otherwise. `uploaded`:
    gates upload independently, so a ride may arrive after later rides of the same card."""
    mode: fares.Mode = "metro" if r.station_id else "bus"
    direction: fares.Direction = "in" if r.direction == "in" else "out" if r.direction == "out" else "single"
    return fares.Tap(r.time, mode, r.line_id, r.station_id or None, direction, uploaded=True)


def _request_hash(r: RideRecord) -> bytes:
    body = ridecode.ride_record_to_dict(r)
    return hashlib.new("sm3", orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


async def ride_items(svc: Services, ctx: TransitContext, batch: RideBatch, now: dt.datetime) -> list[TapItem]:
    """One TapItem per ride, in batch order; a ride that does not verify is a declined item."""
    s = svc.settings
    now_s = int(now.timestamp())
    keys = {ISSUER_KEY_ID: ctx.issuer_public}
    decisions = await asyncio.gather(
        *(
            svc.run_in_signature_pool(
                ridecode.verify_at_gate,
                r.code_text,
                keys,
                r.time,
                (),
                (),
                s.ecard_code_lifetime_s,
                s.clock_skew_s,
            )
            for r in batch.records
        )
    )
    serials = sorted(
        {
            d.code.cert.cert_serial
            for d in decisions
            if isinstance(d, ridecode.GateDecision) and d.ok and d.code
        }
    )
    certs: dict[int, Any] = {}
    stops: dict[int, float] = {}  # replaced cards: when they stopped
    hotlists: dict[int, list[HotlistEntry]] = {}  # replaced cards: their hotlist entries
    served = Served.of([])
    if serials:
        async with svc.pool.acquire() as conn:
            # The deny-list versions served to the gate: a ride is judged as of the one its record claims,
            # but at least the one the gate is known to have held (the claim is the gate's word).
            served = await served_to(conn, batch.gate_id, now - dt.timedelta(seconds=RIDE_AGE_S_MAX + s.clock_skew_s))
            rows = await conn.fetch(
                """SELECT r.cert_serial, r.card_id, r.revoked_at, c.status, c.replaced_by
                   FROM ride_cert r JOIN card c ON c.card_id = r.card_id WHERE r.cert_serial = ANY($1::bigint[])""",
                serials,
            )
            replaced = [row["card_id"] for row in rows if row["status"] == CardStatus.REPLACED and row["replaced_by"]]
            if replaced:
                stops = await stop_times(conn, replaced)
                hotlists = await hotlist_flow.entries_of(conn, replaced)
        certs = {row["cert_serial"]: row for row in rows}
    items: list[TapItem] = []
    for r, decision in zip(batch.records, decisions, strict=True):
        assert isinstance(decision, ridecode.GateDecision)
        base: dict[str, Any] = {
            "terminal_id": r.gate_id,
            "terminal_seq": r.gate_seq,
            "request_hash": _request_hash(r),
            "tap": ride_tap(r),
            "overdraft_fen": s.purse_overdraft_fen,
            "source": SOURCE_RIDECODE,
        }
        if r.time > now_s + s.clock_skew_s or r.time < now_s - RIDE_AGE_S_MAX:
            items.append(TapItem(declined=DECLINE_RIDE_TIME, **base))
            continue
        if not decision.ok or decision.code is None:
            items.append(TapItem(declined=_GATE_DECLINES.get(decision.outcome, "credential_forged"), **base))
            continue
        cert = decision.code.cert
        row = certs.get(cert.cert_serial)
        if row is None or row["card_id"] != cert.account_id:
            items.append(TapItem(declined="credential_forged", **base))
            continue
        base["overdraft_fen"] = max(base["overdraft_fen"], cert.credit_limit_fen)
        base["tap"] = dataclasses.replace(base["tap"], max_fare_fen=cert.max_fare_fen)
        revoked: dt.datetime | None = row["revoked_at"]
        # A ride taken before its card was replaced is charged to the new card: the purse (balance, fare
        # state, ride-code uses) moved there. So is a later one its gate could not refuse (the old card not
        # blocked yet in the deny-list the gate held), and an exit within the journey timeout after the
        # stop, as the end of a journey entered before it only (Tap.entered_before, as after a loss
        # report). Other later rides stay the old card's, declined.
        card_id = cert.account_id
        deny_version = max(r.deny_list_version, served.at(r.time))
        base["resolved_unreplaced"] = row["replaced_by"] is None
        if row["replaced_by"] is not None:
            stop = stops.get(card_id, float("-inf"))
            if r.time < stop or not blocked_as_of(hotlists.get(card_id, ()), deny_version):
                card_id = row["replaced_by"]
            elif r.direction == "out" and r.time - ctx.table.rules.journey_timeout_s < stop:
                card_id = row["replaced_by"]
                base["tap"] = dataclasses.replace(base["tap"], entered_before=math.ceil(stop))
        items.append(
            TapItem(
                card_id=card_id,
                cred_kind=KIND_RIDE_CODE,
                cred_token=(cert.cert_serial << 32) | decision.code.counter,
                deny_version=deny_version,
                declined="card_unusable" if revoked is not None and revoked.timestamp() <= r.time else None,
                **base,
            )
        )
    return items


async def charge_rides(
    svc: Services, ctx: TransitContext, batch: RideBatch, now: dt.datetime | None = None
) -> list[TapOutcome]:
    """Verify and charge an upload; one outcome per ride, in batch order. Chunks of at most
    settings.batch_items_max rides, each one transaction of the tap engine."""
    at = now or dt.datetime.now(dt.UTC)
    items = await ride_items(svc, ctx, batch, at)
    chunk = max(1, svc.settings.batch_items_max)
    outcomes: list[TapOutcome] = []
    for start in range(0, len(items), chunk):
        part: Sequence[TapItem] = items[start : start + chunk]
        for attempt in range(RESOLVE_ATTEMPTS_MAX):
            try:
                outcomes.extend(await process_taps(svc.pool, ctx.table, part))
                break
            except ReplacedMeanwhile as exc:
                # A card was replaced between the look-up above and the batch's lock: look again, so a ride
                # taken before the replacement goes to the new card (nothing of this chunk was written).
                if attempt == RESOLVE_ATTEMPTS_MAX - 1:
                    raise ApiError(
                        "timeout", "cards kept being replaced during the upload", headers=RETRY_LATER
                    ) from exc
                records = batch.records[start : start + chunk]
                part = await ride_items(svc, ctx, dataclasses.replace(batch, records=records), at)
    return outcomes
