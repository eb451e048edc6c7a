"""Transit endpoints: online taps, purse top-ups and history, ride-code certificates."""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from cardsvc import metrics
from cardsvc.errors import ApiError
from cardsvc.transit import flow
from protocols import api

from .keys import AUTH, SERVICES
from .middlewares import operation
from .routes import _actor, _card_no, _json, _parse

__all__ = ["setup_transit_routes"]


@operation("transit.tap")
async def tap(request: web.Request) -> web.Response:
    body = _parse(api.TAP, request)
    svc = request.app[SERVICES]
    now = dt.datetime.now(dt.UTC)
    item = await flow.build_tap_item(svc, svc.transit, request[AUTH].terminal_id, body, now)
    outcome = await svc.taps.submit(item)
    metrics.TAPS.labels(body["mode"], outcome.result, outcome.reason or "").inc()
    if outcome.result == "conflict":
        raise ApiError("idempotency_conflict", field="terminal_seq")
    return _json({**outcome.to_json(), "replayed_answer": outcome.replayed_answer})


@operation("purse.read")
async def purse(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(await flow.purse_view(conn, _card_no(request)))


@operation("purse.topup")
async def top_up(request: web.Request) -> web.Response:
    body = _parse(api.TOPUP, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        return _json(await flow.top_up(conn, svc, _card_no(request), body, _actor(request, body)))


@operation("ridecert.issue")
async def issue_ride_cert(request: web.Request) -> web.Response:
    body = _parse(api.RIDE_CERT_ISSUE, request)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        result = await flow.issue_ride_cert(conn, svc, svc.transit, body, dt.datetime.now(dt.UTC))
    return _json(result, 201)


def setup_transit_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/transit/taps", tap)
    r.add_get("/v1/purses/{card_no}", purse)
    r.add_post("/v1/purses/{card_no}/top-ups", top_up)
    r.add_post("/v1/ride-certs", issue_ride_cert)
