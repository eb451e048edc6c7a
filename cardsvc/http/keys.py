"""Typed keys for the app and the request."""

from __future__ import annotations

from aiohttp import web

from cardsvc.security.terminals import TerminalRecord
from cardsvc.services import Services

__all__ = ["AUTH", "BODY", "CLEARING_GAUGE_READ", "NONCE", "SERVICES"]

SERVICES = web.AppKey("services", Services)
# When this worker last read the clearing reports for its gauge (time.monotonic()), in a one-item list.
CLEARING_GAUGE_READ = web.AppKey("clearing_gauge_read", list[float])
AUTH = web.RequestKey("auth", TerminalRecord)
BODY = web.RequestKey("body", bytes)
# The request nonce, when the handler consumes it itself (see middlewares.nonce_in_handler).
NONCE = web.RequestKey("nonce", str)
