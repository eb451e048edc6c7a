"""Who is acting: the authenticated terminal, the staff member at it, and the request id."""

from __future__ import annotations

import dataclasses

__all__ = ["SYSTEM", "Actor"]


@dataclasses.dataclass(frozen=True, slots=True)
class Actor:
    terminal_id: str
    operator: str | None = None
    request_id: str | None = None


SYSTEM = Actor("system")
