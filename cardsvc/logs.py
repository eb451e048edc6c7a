"""Structured JSON logs, one object per line, with the request id of the request being handled.

Personal data never reaches a log line: handlers log identifiers of our own (card_id, holder_id,
terminal ids, request ids), never ID numbers, names, card numbers or bank accounts. As a second line
of defence, the formatter redacts anything that looks like an ID number, a bank card number or a
mobile phone number, in the message and in every extra (lists and dicts included).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

from protocols.strict import PERSONAL_DATA_PATTERNS, looks_personal

__all__ = ["REQUEST_ID", "JsonFormatter", "redact", "setup_logging"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("cardsvc_request_id", default=None)


_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


def redact(text: str) -> str:
    for pattern in PERSONAL_DATA_PATTERNS:  # ID, bank card and mobile numbers (protocols.strict)
        text = pattern.sub("[redacted]", text)
    return text


def _redacted(value: Any) -> Any:
    """A log extra with every string in it redacted, in lists and dicts too; a large integer shaped like
    an ID, card or phone number becomes "[redacted]"."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**10 or not looks_personal(str(value)) else "[redacted]"
    if isinstance(value, dict):
        return {redact(str(k)): _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redacted(v) for v in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        rid = REQUEST_ID.get()
        if rid:
            out["request_id"] = redact(rid)
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = _redacted(value)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _UnparsedRequestFilter) for f in server.filters):
        server.addFilter(_UnparsedRequestFilter())


class _UnparsedRequestFilter(logging.Filter):
    """aiohttp logs a request its HTTP parser refused (a control character in the request line or a
    header, a bad method) with a traceback whose message quotes the raw bytes: the path and headers, card
    numbers in them. The client got its 400; the log keeps the error's kind and status only."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "a request the HTTP parser refused: %s (status %s)", (type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
