"""Operating errors answered to clients: a stable code from protocols.api.ERRORS, shown as problem+json
by the HTTP layer. Flows raise them; they know nothing of HTTP beyond the status in the table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocols.api import ERRORS

__all__ = ["RETRY_LATER", "ApiError"]

# The headers of a 503 whose request may simply be sent again (nothing was written, or idempotency holds).
RETRY_LATER = {"Retry-After": "2"}


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
