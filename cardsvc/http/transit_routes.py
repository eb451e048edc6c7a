"""Transit endpoints: online taps, purse top-ups and history, ride-code certificates, uploads of offline
purse records and ride-code rides."""

from __future__ import annotations

import datetime as dt
import re

from aiohttp import web

from cardsvc import limits, metrics
from cardsvc.errors import RETRY_LATER, ApiError
from cardsvc.transit import concessions, corrections, flow, offline, rides
from cardsvc.transit.taps import HELD
from protocols import api, ridecode, transit
from protocols.errors import CodecError

from .keys import AUTH, NONCE, SERVICES
from .middlewares import body_bytes_max, consume_nonce, json_body, nonce_in_handler, operation, replayed
from .routes import _actor, _card_no, _int_param, _json, _parse

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)

__all__ = ["setup_transit_routes"]

# A tap's or an uploaded ride's credential, counted with the verifications of the credential endpoints
# (cardsvc_credential_verifications_total, which the forged-or-replayed alert watches): a clone at a
# validator is the case that matters most. Declines that say nothing about the credential (a tap stamped
# outside the clock window, a ride too old) are not verifications.
_CREDENTIAL_KINDS = {"card": "card_cryptogram", "ecard_code": "ecard_code", "ride_code": "ride_code"}
_CREDENTIAL_OUTCOMES: dict[str | None, str | None] = {
    "credential_forged": "forged",
    "credential_replayed": "replayed",
    "credential_expired": "expired",
    "credential_malformed": "malformed",
    "card_unusable": "card_unusable",
    "unknown_card": "unknown_card",
    "tap_time_out_of_window": None,
    rides.DECLINE_RIDE_TIME: None,
    # Answered before the credential's single-use check (the card has no purse to lock): not a verification.
    "no_transit_purse": None,
}


# Operations whose answers are kept for good under the terminal's keys (topup_key): a tap under such a key is
# another transaction, whenever it comes (its terminal_txn answer is pruned after the retention period).
_OFFICE_KEY_OPERATIONS = frozenset({"purse.topup", "purse.correct_fare"})


def _count_credential(kind: str, reason: str | None) -> None:
    outcome = _CREDENTIAL_OUTCOMES.get(reason, "ok")
    if outcome is not None:
        metrics.VERIFICATIONS.labels(kind, outcome).inc()


@operation("transit.tap")
@nonce_in_handler
async def tap(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    try:
        body = _parse(api.TAP, request)
        now = dt.datetime.now(dt.UTC)
        terminal = request[AUTH]
        item = await flow.build_tap_item(svc, svc.transit, terminal.terminal_id, body, now, nonce=request[NONCE])
        if terminal.operations & _OFFICE_KEY_OPERATIONS and await flow.office_key_taken(
            svc.pool, terminal.terminal_id, item.terminal_seq
        ):
            raise ApiError("idempotency_conflict", field="terminal_seq")
    except ApiError:
        await consume_nonce(request)  # refused input still uses up the nonce (a replay is auth_replayed)
        raise
    outcome = await svc.taps.submit(item)  # records the nonce in the batch's transaction
    if outcome.result == "replayed":
        raise replayed()
    if outcome is HELD:  # nothing written: the same tap may be sent again
        raise ApiError("timeout", "the card's purse is held by another transaction", headers=RETRY_LATER)
    if outcome.result == "conflict":
        metrics.TAPS.labels(body["mode"], outcome.result, outcome.reason or "").inc()
    elif not outcome.replayed_answer:  # a retry's stored answer is not another tap
        metrics.TAPS.labels(body["mode"], outcome.result, outcome.reason or "").inc()
        _count_credential(_CREDENTIAL_KINDS[body["credential"]], outcome.reason)
    if outcome.result == "conflict":
        raise ApiError("idempotency_conflict", field="terminal_seq")
    return _json({**outcome.to_json(), "replayed_answer": outcome.replayed_answer})


@operation("purse.read")
async def purse(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    limit = _int_param(
        request.query.get("limit"), "limit", flow.PURSE_HISTORY_ROWS, 1, flow.PURSE_HISTORY_ROWS_MAX
    )
    before = None
    if "before" in request.query:
        try:
            before = flow.parse_history_cursor(request.query["before"])
        except ValueError as exc:
            raise ApiError("invalid_parameter", str(exc), field="before") from None
    async with svc.pool.acquire() as conn:
        return _json(await flow.purse_view(conn, _card_no(request), limit, before))


@operation("purse.topup")
async def top_up(request: web.Request) -> web.Response:
    body = _parse(api.TOPUP, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(await flow.top_up(conn, svc, _card_no(request), body, _actor(request, body)))


@operation("purse.correct_fare")
async def correct_fare(request: web.Request) -> web.Response:
    body = _parse(api.FARE_CORRECTION, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(
            await corrections.correct_fare(conn, svc, _card_no(request), body, _actor(request, body))
        )


@operation("purse.correct_fare")
async def return_quota_ride(request: web.Request) -> web.Response:
    body = _parse(api.QUOTA_RIDE_RETURN, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(
            await concessions.return_quota_ride(
                conn, svc.transit.table, _card_no(request), body, _actor(request, body), dt.datetime.now(dt.UTC)
            )
        )


@operation("ridecert.issue")
async def issue_ride_cert(request: web.Request) -> web.Response:
    body = _parse(api.RIDE_CERT_ISSUE, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        result = await flow.issue_ride_cert(conn, svc, svc.transit, body, dt.datetime.now(dt.UTC))
    return _json(result, 201)


def _own_terminal(request: web.Request, terminal_id: str, name: str) -> None:
    """An upload carries the records of the terminal that signs it, never another's."""
    signer = request[AUTH].terminal_id
    if terminal_id != signer:  # a mis-provisioned or hostile terminal: counted like any forbidden call
        metrics.REQUEST_AUTH_FAILURES.labels("forbidden").inc()
        raise ApiError(
            "forbidden_operation",
            f"{name} {terminal_id!r} is not the signing terminal {signer!r}",
            field=name,
        )


def _codec_error(exc: CodecError) -> ApiError:
    return ApiError("invalid_field", f"{exc.code}: {exc}"[:300], field=exc.field or "records")


@body_bytes_max(limits.UPLOAD_BODY_BYTES_MAX)
@operation("transit.upload")
async def offline_batch(request: web.Request) -> web.Response:
    try:
        batch = transit.batch_from_dict(json_body(request))
    except CodecError as exc:
        raise _codec_error(exc) from None
    _own_terminal(request, batch.terminal_id, "terminal_id")
    svc = request.app[SERVICES]
    answers = await offline.process_batch(
        svc.pool,
        svc.transit.table,
        offline.tac_checker(svc.keys.card_tac_master),
        batch,
        skew_s=svc.settings.clock_skew_s,
    )
    for a in answers:
        if not a.replayed_answer:
            metrics.UPLOADED_RECORDS.labels("purse", a.result, a.reason or "").inc()
    return _json(
        {
            "terminal_id": batch.terminal_id,
            "batch_id": batch.batch_id,
            "records": [a.to_json() for a in answers],
        }
    )


@body_bytes_max(limits.UPLOAD_BODY_BYTES_MAX)
@operation("transit.upload")
async def ride_batch(request: web.Request) -> web.Response:
    try:
        batch = ridecode.ride_batch_from_dict(json_body(request))
    except CodecError as exc:
        raise _codec_error(exc) from None
    _own_terminal(request, batch.gate_id, "gate_id")
    svc = request.app[SERVICES]
    outcomes = await rides.charge_rides(svc, svc.transit, batch)
    out = []
    for r, o in zip(batch.records, outcomes, strict=True):
        if not o.replayed_answer:
            metrics.UPLOADED_RECORDS.labels("ridecode", o.result, o.reason or "").inc()
            if o.result != "conflict":
                _count_credential("ride_code", o.reason)
            if (refund := o.detail.get("refund")) is not None:
                metrics.LATE_REFUNDS.labels(refund["reason"]).inc()
                metrics.LATE_REFUND_FEN.labels(refund["reason"]).inc(refund["amount_fen"])
        out.append({"gate_seq": r.gate_seq, **o.to_json(), "replayed_answer": o.replayed_answer})
    return _json({"gate_id": batch.gate_id, "batch_id": batch.batch_id, "records": out})


@operation("clearing.read")
async def clearing_report(request: web.Request) -> web.Response:
    from cardsvc.transit import clearing

    operator_id = request.match_info["operator_id"]
    if not (
        operator_id.isascii()
        and 1 <= len(operator_id) <= 16
        and all(c.isalnum() or c in "_-" for c in operator_id)
    ):
        raise ApiError("invalid_parameter", "operator_id is 1-16 of A-Z a-z 0-9 _ -", field="operator_id")
    text = request.match_info["date"]
    try:  # fromisoformat alone also takes ISO basic (20261128) and week dates (2026-W48-6)
        if not _DATE.fullmatch(text):
            raise ValueError(text)
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise ApiError("invalid_parameter", "date is YYYY-MM-DD", field="date") from None
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT operator_id, business_date, txn_count, total_fen, correction_count, correction_fen, digest,
                      created_at
               FROM clearing_report WHERE operator_id = $1 AND business_date = $2""",
            operator_id,
            day,
        )
    if row is None:
        raise ApiError("not_found", "no clearing report for this operator and day")
    return _json(clearing.report_view(row))


def _holder_id(request: web.Request) -> int:
    raw = request.match_info["holder_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < 1:
        raise ApiError("invalid_parameter", "holder_id is a positive integer", field="holder_id")
    return int(raw)


@operation("concession.read")
async def get_concession(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    holder_id = _holder_id(request)
    async with svc.pool.acquire() as conn:
        return _json(
            await concessions.get_concession(conn, svc.transit.table, holder_id, dt.datetime.now(dt.UTC))
        )


@operation("concession.manage")
async def set_concession(request: web.Request) -> web.Response:
    holder_id = _holder_id(request)
    body = _parse(api.CONCESSION_SET, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        result = await concessions.set_concession(
            conn, svc.vault, svc.transit.table, holder_id, body["kind"], _actor(request, body),
            dt.datetime.now(dt.UTC),
        )  # fmt: skip
    metrics.CONCESSION_CHANGES.labels("set").inc()
    return _json(result)


async def _concession_change(request: web.Request, action: str) -> web.Response:
    holder_id = _holder_id(request)
    body = _parse(api.CONCESSION_ACTION, request)
    svc = request.app[SERVICES]
    run = concessions.grant_extra_quota if action == "extra_quota" else concessions.end_concession
    async with svc.pool.acquire() as conn:
        result = await run(conn, svc.transit.table, holder_id, _actor(request, body), dt.datetime.now(dt.UTC))
    metrics.CONCESSION_CHANGES.labels(action).inc()
    return _json(result)


@operation("concession.manage")
async def grant_extra_quota(request: web.Request) -> web.Response:
    return await _concession_change(request, "extra_quota")


@operation("concession.manage")
async def end_concession(request: web.Request) -> web.Response:
    return await _concession_change(request, "end")


def setup_transit_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/transit/taps", tap)
    r.add_get("/v1/holders/{holder_id}/concession", get_concession)
    r.add_put("/v1/holders/{holder_id}/concession", set_concession)
    r.add_post("/v1/holders/{holder_id}/concession/extra-quota", grant_extra_quota)
    r.add_post("/v1/holders/{holder_id}/concession/end", end_concession)
    r.add_get("/v1/purses/{card_no}", purse)
    r.add_post("/v1/purses/{card_no}/top-ups", top_up)
    r.add_post("/v1/purses/{card_no}/fare-corrections", correct_fare)
    r.add_post("/v1/purses/{card_no}/quota-ride-returns", return_quota_ride)
    r.add_post("/v1/ride-certs", issue_ride_cert)
    r.add_post("/v1/transit/offline-batches", offline_batch)
    r.add_post("/v1/transit/ride-batches", ride_batch)
    r.add_get("/v1/clearing/{operator_id}/{date}", clearing_report)
