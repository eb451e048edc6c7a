"""The city's local calendar: a card's `expires_on` is a local date, valid to the end of that day in the
city, not in UTC. One fixed UTC offset (China has no daylight saving time): the setting
`CARDSVC_UTC_OFFSET_MINUTES`, default 480 (UTC+8, Chongqing), which must equal the fare table's
`utc_offset_minutes` (transit's business days; the service refuses to start otherwise).

It is set once per process when the settings are loaded (`configure`), before any request is served.
"""

from __future__ import annotations

import datetime as dt

from cardsvc import limits

__all__ = ["configure", "local_date", "utc_offset_minutes"]

_offset = dt.timedelta(minutes=limits.UTC_OFFSET_MINUTES)


def configure(minutes: int) -> None:
    """Use this offset for local dates in this process (`Settings.utc_offset_minutes`)."""
    global _offset
    _offset = dt.timedelta(minutes=minutes)


def utc_offset_minutes() -> int:
    return int(_offset.total_seconds()) // 60


def local_date(at: dt.datetime) -> dt.date:
    """The city's calendar date at the aware instant `at`."""
    return (at.astimezone(dt.UTC) + _offset).date()
