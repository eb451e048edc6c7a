"""Middlewares, outermost first:

1. `observe`: request id, latency and status metrics, the access log line, the request deadline, and
   the translation of every error into problem+json (never a 500 for anything a client can send; a
   database that cannot be reached is a 503 with Retry-After).
2. `authenticate`: reads the body (bounded), verifies the terminal's request signature, the clock skew,
   the nonce (single use across all workers) and that the terminal may call this operation. A handler
   marked `nonce_in_handler` (online taps) records the nonce inside its own transaction instead: one
   database transaction per tap batch rather than two, with the same single-use guarantee.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web

from cardsvc import metrics
from cardsvc.errors import RETRY_LATER
from cardsvc.logs import REQUEST_ID, redact
from cardsvc.store.batcher import BatcherClosed, BatcherOverloaded
from cardsvc.store.pool import DB_UNAVAILABLE_ERRORS
from protocols import terminal_auth
from protocols.errors import CodecError

from .keys import AUTH, BODY, NONCE, SERVICES
from .problem import ApiError, problem_response

__all__ = [
    "authenticate",
    "body_bytes_max",
    "consume_nonce",
    "nonce_in_handler",
    "observe",
    "operation",
    "replayed",
]

log = logging.getLogger("cardsvc.http")
access_log = logging.getLogger("cardsvc.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OperationSpec = str | Callable[[web.Request], str]
_REQUEST_ID_CHARS_MAX = 64
ACCESS_LOG_SLOW_S = 1.0
_UNAVAILABLE: tuple[type[BaseException], ...] = (BatcherClosed, *DB_UNAVAILABLE_ERRORS)


def operation(spec: OperationSpec) -> Callable[[Handler], Handler]:
    """Mark a handler as a signed operation; `spec` names it or computes it from the request."""

    def mark(handler: Handler) -> Handler:
        handler.cardsvc_operation = spec  # type: ignore[attr-defined]
        return handler

    return mark


def body_bytes_max(limit: int) -> Callable[[Handler], Handler]:
    """Allow a signed operation a larger body than settings.body_bytes_max (batch uploads); the app's
    client_max_size must be at least this."""

    def mark(handler: Handler) -> Handler:
        handler.cardsvc_body_bytes_max = limit  # type: ignore[attr-defined]
        return handler

    return mark


def nonce_in_handler(handler: Handler) -> Handler:
    """The handler records the request nonce itself, in the transaction that does its work (it finds it
    under `request[NONCE]`), and calls `consume_nonce` on every path that does not reach that transaction.
    It raises `replayed()` when the nonce turns out to be used."""
    handler.cardsvc_nonce_in_handler = True  # type: ignore[attr-defined]
    return handler


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if (
        0 < len(given) <= _REQUEST_ID_CHARS_MAX
        and given.isascii()
        and all(c.isalnum() or c in "-_." for c in given)
        and redact(given) == given  # not shaped like an ID number or a bank card: it is logged and stored
    ):
        return given
    return new_request_id()


def new_request_id() -> str:
    """16 hex digits, never all decimal: one in ~1,900 would be, and 16 digits look like a bank card
    number, which the logs redact (the id could not be found in them)."""
    while True:
        rid = secrets.token_hex(8)
        if not rid.isdigit():
            return rid


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    rid = _request_id(request)
    token = REQUEST_ID.set(rid)
    route = _route_name(request)
    metrics.HTTP_REQUESTS_IN_FLIGHT.inc()
    status = 499  # the client went away before an answer
    try:
        response = await _answer(request, handler, rid, route)
        response.headers["X-Request-Id"] = rid
        status = response.status
        return response
    finally:
        elapsed = time.perf_counter() - started
        metrics.HTTP_REQUESTS_IN_FLIGHT.dec()
        metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
        metrics.HTTP_REQUEST_DURATION.labels(route, request.method).observe(elapsed)
        mode = request.app[SERVICES].settings.access_log
        if mode == "all" or (mode == "errors" and (status >= 400 or elapsed >= ACCESS_LOG_SLOW_S)):
            term = request.get(AUTH)
            access_log.info(
                "request",
                extra={
                    "method": request.method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "terminal_id": term.terminal_id if term is not None else None,
                },
            )
        REQUEST_ID.reset(token)


# A lock not granted within the pool's lock_timeout (a row held by a long transaction), a deadlock, a
# serialization failure that outlasted its retries, or a statement cancelled on the server (57014: a role's
# statement_timeout, an operator's pg_cancel_backend): the transaction rolled back, so a retry is safe.
_CONTENDED = frozenset({"55P03", "40P01", "40001", "57014"})


async def _answer(request: web.Request, handler: Handler, rid: str, route: str) -> web.StreamResponse:
    retry = RETRY_LATER
    try:
        async with asyncio.timeout(request.app[SERVICES].settings.request_timeout_s):
            return await handler(request)
    except ApiError as err:
        return problem_response(err, rid)
    except web.HTTPException as exc:
        return problem_response(_from_http_exception(exc), rid)
    except TimeoutError:
        log.warning("request deadline exceeded", extra={"route": route})
        return problem_response(ApiError("timeout", headers=retry), rid)
    except BatcherOverloaded:
        return problem_response(ApiError("overloaded", headers=retry), rid)
    except _UNAVAILABLE:
        log.warning("database unavailable", extra={"route": route}, exc_info=True)
        return problem_response(ApiError("db_unavailable", headers=retry), rid)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate and exc.sqlstate.startswith(("08", "57P")):
            return problem_response(ApiError("db_unavailable", headers=retry), rid)
        if exc.sqlstate in _CONTENDED:  # rolled back, nothing changed: the same request may be sent again
            log.warning("database contention", extra={"route": route, "sqlstate": exc.sqlstate})
            return problem_response(ApiError("timeout", headers=retry), rid)
        log.exception("database error", extra={"route": route, "sqlstate": exc.sqlstate})
        return problem_response(ApiError("internal"), rid)
    except Exception:
        log.exception("unhandled error", extra={"route": route})
        return problem_response(ApiError("internal"), rid)


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        return ApiError("not_found")
    if exc.status == 405:
        return ApiError("method_not_allowed", headers={"Allow": exc.headers.get("Allow", "")})
    if exc.status == 413:
        return ApiError("body_too_large")
    return ApiError("invalid_parameter", exc.reason)


def _auth_failure(reason: str, code: str, field: str | None = None, detail: str | None = None) -> ApiError:
    metrics.REQUEST_AUTH_FAILURES.labels(reason).inc()
    return ApiError(code, detail, field=field)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    spec: OperationSpec | None = getattr(request.match_info.handler, "cardsvc_operation", None)
    if spec is None:
        return await handler(request)
    svc = request.app[SERVICES]
    if len(request.query) != len(set(request.query)):
        # The signature covers the parameters sorted, the handlers read the first of each name: with a name
        # repeated, reordering the values would keep the signature and change the request.
        raise ApiError("invalid_parameter", "a query parameter is repeated")
    limit = max(svc.settings.body_bytes_max, getattr(request.match_info.handler, "cardsvc_body_bytes_max", 0))
    if request.content_length is not None and request.content_length > limit:
        raise ApiError("body_too_large", f"at most {limit} bytes")
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        # The signature covers the bytes as sent; a compressed body would be checked after decoding.
        raise ApiError("bad_content_type", "Content-Encoding is not supported: send the body uncompressed")
    body = await request.read()
    if len(body) > limit:  # a chunked body has no Content-Length; client_max_size is the largest limit
        raise ApiError("body_too_large", f"at most {limit} bytes")
    request[BODY] = body
    try:
        headers = terminal_auth.parse_auth_headers(request.headers)
    except CodecError as exc:
        reason = "missing" if exc.code == "auth_missing" else "malformed"
        raise _auth_failure(reason, exc.code, exc.field, str(exc)) from None
    now = time.time()
    if abs(now - headers.timestamp) > svc.settings.clock_skew_s:
        raise _auth_failure("expired", "auth_expired", "X-Cardsvc-Timestamp")
    term = svc.terminals.get(headers.terminal_id)
    key = term.keys.get(headers.key_id) if term is not None and not term.disabled else None
    if term is None or key is None or not key.valid_at(dt.datetime.fromtimestamp(now, dt.UTC)):
        raise _auth_failure("unknown_terminal", "auth_unknown_terminal", "X-Cardsvc-Terminal")
    canonical = terminal_auth.canonical_request(
        request.method,
        *request.raw_path.partition("?")[::2],
        headers.terminal_id,
        headers.key_id,
        headers.timestamp,
        headers.nonce,
        terminal_auth.body_digest(body),
    )
    expected = terminal_auth.expected_signature(key.secret, canonical)
    if not terminal_auth.signature_matches(expected, headers.signature):
        raise _auth_failure("bad_signature", "auth_bad_signature", "X-Cardsvc-Signature")
    op = spec if isinstance(spec, str) else spec(request)
    if op not in term.operations:
        raise _auth_failure(
            "forbidden", "forbidden_operation", detail=f"{term.kind} {term.terminal_id} may not {op}"
        )
    request[AUTH] = term
    if getattr(request.match_info.handler, "cardsvc_nonce_in_handler", False):
        request[NONCE] = headers.nonce
    elif not await svc.nonces.submit((headers.terminal_id, headers.nonce)):
        raise replayed()
    return await handler(request)


def replayed() -> ApiError:
    """The answer to a request whose nonce was already used (counted)."""
    return _auth_failure("replayed", "auth_replayed", "X-Cardsvc-Nonce")


async def consume_nonce(request: web.Request) -> None:
    """Record the nonce of a `nonce_in_handler` request on its own (a path that does not reach the
    handler's transaction, e.g. invalid input); raises `replayed()` if it was used before."""
    svc = request.app[SERVICES]
    if not await svc.nonces.submit((request[AUTH].terminal_id, request[NONCE])):
        raise replayed()


def json_body(request: web.Request) -> Any:
    import orjson

    body = request.get(BODY, b"")
    ctype = request.content_type
    if body and ctype not in ("application/json", "application/octet-stream", ""):
        raise ApiError("bad_content_type")
    try:
        return orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ApiError("bad_json", f"{exc}"[:200]) from None
