"""problem+json (RFC 9457) answers with a stable machine code, a title and the offending field."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from cardsvc.errors import ApiError

__all__ = ["PROBLEM_CONTENT_TYPE", "ApiError", "problem_response"]

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "https://cardsvc.example/problems/"


def problem_response(err: ApiError, request_id: str | None = None) -> web.Response:
    body: dict[str, Any] = {
        "type": TYPE_BASE + err.code,
        "title": err.title,
        "status": err.status,
        "code": err.code,
    }
    if err.detail:
        body["detail"] = err.detail
    if err.field is not None:
        body["field"] = err.field
    if request_id:
        body["request_id"] = request_id
    body.update(err.extra)
    return web.Response(
        status=err.status, body=orjson.dumps(body), content_type=PROBLEM_CONTENT_TYPE, headers=err.headers
    )
