"""Routes: thin handlers that validate input (protocols.api), call one flow and answer JSON."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from cardsvc import audit, limits, metrics
from cardsvc.flows import credentials, ecards, hotlist, lifecycle, registry
from cardsvc.flows.actor import Actor
from cardsvc.logs import REQUEST_ID
from cardsvc.security.terminals import HOLDER_SHOWN_TO
from cardsvc.store import migrate
from cardsvc.transit import clearing
from protocols import api, card
from protocols import hotlist as hotlist_wire
from protocols.errors import CodecError

from .keys import AUTH, CLEARING_GAUGE_READ, SERVICES
from .middlewares import json_body, operation
from .problem import ApiError

__all__ = ["setup_routes"]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse(message: api.Message, request: web.Request) -> dict[str, Any]:
    try:
        return message.parse(json_body(request))
    except api.ApiInputError as exc:
        raise ApiError(exc.code, exc.detail, field=exc.field) from None


def _actor(request: web.Request, body: dict[str, Any] | None = None) -> Actor:
    return Actor(request[AUTH].terminal_id, (body or {}).get("operator"), REQUEST_ID.get())


def _card_no(request: web.Request) -> str:
    try:
        return card.validate_card_no(request.match_info["card_no"])
    except CodecError:
        raise ApiError("invalid_parameter", "card_no must be 9 characters A-Z 0-9", field="card_no") from None


def _int_param(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or not lo <= int(value) <= hi:
        raise ApiError("invalid_parameter", f"{name} must be an integer in [{lo}, {hi}]", field=name)
    return int(value)


# ------------------------------------------------------------------ operations (public, unsigned)


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    try:
        async with svc.pool.acquire(timeout=2.0) as conn:
            todo = await migrate.pending(conn)
            version = await hotlist.latest_version(conn)
    except migrate.MigrationError as exc:
        return _json({"status": "unavailable", "database": "ok", "schema": str(exc)}, 503)
    except Exception as exc:
        return _json({"status": "unavailable", "database": "unreachable", "error": type(exc).__name__}, 503)
    if todo:
        return _json(
            {"status": "unavailable", "database": "ok", "migrations_pending": [m.version for m in todo]}, 503
        )
    return _json(
        {"status": "ready", "database": "ok", "hotlist_version": version, "terminals": len(svc.terminals)}
    )


async def metrics_handler(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    metrics.DB_POOL_CONNECTIONS.set(svc.pool.get_size())
    metrics.DB_POOL_IN_USE.set(svc.pool.get_size() - svc.pool.get_idle_size())
    # The hotlist head as of this scrape: a loss report moves it in whichever worker took it, or none
    # (`cardsvc card` from a shell); the audit runs and the days cleared, which only the nightly commands
    # move (the reports at most every 5 minutes). Without the database, /metrics keeps the last values.
    try:
        async with asyncio.timeout(1.0), svc.pool.acquire() as conn:
            await hotlist.latest_version(conn)
            await audit.refresh_metrics(conn)
            read = request.app[CLEARING_GAUGE_READ]
            if time.monotonic() - read[0] >= clearing.CLEARED_THROUGH_MAX_AGE_S:
                await clearing.refresh_cleared_through(conn, svc.transit.table)
                read[0] = time.monotonic()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pass
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE_LATEST})


# ------------------------------------------------------------------ card office


@operation("holder.create")
async def create_holder(request: web.Request) -> web.Response:
    body = _parse(api.HOLDER_CREATE, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(await registry.create_holder(conn, svc.vault, body, _actor(request, body)), 201)


@operation("holder.lookup")
async def lookup_holder(request: web.Request) -> web.Response:
    body = _parse(api.HOLDER_LOOKUP, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(await registry.lookup_holder(conn, svc.vault, body["id_number"], _now()))


@operation("card.issue")
async def issue_card(request: web.Request) -> web.Response:
    body = _parse(api.CARD_ISSUE, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        result = await registry.issue_card(conn, body, _actor(request, body), _now())
    metrics.LIFECYCLE_OPERATIONS.labels("issue", "ok").inc()
    return _json(result, 201)


@operation("card.read")
async def get_card(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(await registry.get_card(conn, _card_no(request), _now()))


@operation("card.read")
async def card_events(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    limit = _int_param(request.query.get("limit"), "limit", 100, 1, 500)
    async with svc.pool.acquire() as conn:
        return _json(await registry.list_events(conn, _card_no(request), limit))


def _lifecycle_operation(request: web.Request) -> str:
    return "card.report_loss" if request.match_info.get("op") == "temporary-loss" else "card.lifecycle"


@operation(_lifecycle_operation)
async def card_operation(request: web.Request) -> web.Response:
    op = request.match_info["op"]
    message = api.CARD_OPERATIONS.get(op)
    if message is None:
        raise ApiError("not_found", "no such card operation (docs/api.md lists them)")
    body = _parse(message, request)
    svc = request.app[SERVICES]
    card_no = _card_no(request)
    try:
        async with svc.pool.acquire() as conn:
            result = await lifecycle.apply(
                conn, card_no, op, body, _actor(request, body), _now(), svc.settings.temp_loss_days
            )
    except ApiError as err:
        metrics.LIFECYCLE_OPERATIONS.labels(op, err.code).inc()
        raise
    metrics.LIFECYCLE_OPERATIONS.labels(op, "ok").inc()
    return _json(result)


# ------------------------------------------------------------------ electronic cards


@operation("ecard.issue")
async def issue_ecard(request: web.Request) -> web.Response:
    body = _parse(api.ECARD_ISSUE, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        result = await ecards.issue_ecard(conn, body, _actor(request, body), _now())
    metrics.LIFECYCLE_OPERATIONS.labels("ecard-issue", "ok").inc()
    return _json(result, 201)


def _ecard_id(request: web.Request) -> int:
    return _int_param(request.match_info["ecard_id"], "ecard_id", 0, 1, 2**63 - 1)


@operation("ecard.read")
async def get_ecard(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(await ecards.get_ecard(conn, _ecard_id(request), _now()))


@operation("ecard.revoke")
async def revoke_ecard(request: web.Request) -> web.Response:
    body = _parse(api.LIFECYCLE, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        result = await ecards.revoke_ecard(conn, _ecard_id(request), _actor(request, body), _now())
    metrics.LIFECYCLE_OPERATIONS.labels("ecard-revoke", "ok").inc()
    return _json(result)


# ------------------------------------------------------------------ acceptance: credentials, hotlist


def _accepted(request: web.Request, answer: dict[str, Any]) -> web.Response:
    """A credential check's answer, with the holder only for the kinds that check the holder in person."""
    if request[AUTH].kind not in HOLDER_SHOWN_TO:
        answer["card"].pop("holder", None)
    return _json(answer)


@operation("card.authenticate")
async def authenticate_card(request: web.Request) -> web.Response:
    body = _parse(api.CARD_AUTH, request)
    return _accepted(request, await credentials.verify_card(request.app[SERVICES], body, _now()))


@operation("ecard.verify")
async def verify_ecard_code(request: web.Request) -> web.Response:
    body = _parse(api.ECARD_VERIFY, request)
    return _accepted(request, await credentials.verify_ecard_code(request.app[SERVICES], body, _now()))


@operation("hotlist.read")
async def get_hotlist(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    since = _int_param(request.query.get("since"), "since", 0, 0, 2**63 - 1)
    most = svc.settings.hotlist_block_entries_max
    limit = _int_param(request.query.get("limit"), "limit", min(limits.HOTLIST_BLOCK_ENTRIES_DEFAULT, most), 1, most)
    async with svc.pool.acquire() as conn:
        block = await hotlist.serve_block(conn, request[AUTH].terminal_id, since, limit)
    return _json(hotlist_wire.encode_block(block))


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_handler)
    r.add_post("/v1/holders", create_holder)
    r.add_post("/v1/holders/lookup", lookup_holder)
    r.add_post("/v1/cards", issue_card)
    r.add_get("/v1/cards/{card_no}", get_card)
    r.add_get("/v1/cards/{card_no}/events", card_events)
    r.add_post("/v1/cards/{card_no}/{op}", card_operation)
    r.add_post("/v1/ecards", issue_ecard)
    r.add_get("/v1/ecards/{ecard_id}", get_ecard)
    r.add_post("/v1/ecards/{ecard_id}/revoke", revoke_ecard)
    r.add_post("/v1/card-auth", authenticate_card)
    r.add_post("/v1/ecard-codes/verify", verify_ecard_code)
    r.add_get("/v1/hotlist", get_hotlist)
