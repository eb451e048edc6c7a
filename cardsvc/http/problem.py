"""problem+json (RFC 9457) answers with a stable machine code, a title and the offending field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from protocols.api import ERRORS

__all__ = ["PROBLEM_CONTENT_TYPE", "ApiError", "problem_response"]

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "https://cardsvc.example/problems/"


class ApiError(Exception):
    """An operating error answered to the client; `code` is a key of protocols.api.ERRORS."""

    def __init__(
        self,
        code: str,
        detail: str | None = None,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        assert code in ERRORS, code
        super().__init__(detail or ERRORS[code][1])
        self.code = code
        self.status = ERRORS[code][0]
        self.title = ERRORS[code][1]
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def problem_response(err: ApiError, request_id: str | None = None) -> web.Response:
    body: dict[str, Any] = {
        "type": TYPE_BASE + err.code,
        "title": err.title,
        "status": err.status,
        "code": err.code,
    }
    if err.detail:
        body["detail"] = err.detail
    if err.field:
        body["field"] = err.field
    if request_id:
        body["request_id"] = request_id
    body.update(err.extra)
    return web.Response(
        status=err.status, body=orjson.dumps(body), content_type=PROBLEM_CONTENT_TYPE, headers=err.headers
    )
