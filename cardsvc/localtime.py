"""The city's local calendar: a card's `expires_on` is a local date, valid to the end of that day in the
city, not in UTC. One fixed UTC offset (China has no daylight saving time): the setting
`CARDSVC_UTC_OFFSET_MINUTES`, default 480 (UTC+8, Chongqing), which must equal the fare table's
`utc_offset_minutes` (transit's business days; the service refuses to start otherwise).

It is set once per process when the settings are loaded (`configure`), before any request is served.
"""

from __future__ import annotations

import datetime as dt

from cardsvc import limits
from protocols import idnumber

__all__ = ["configure", "day_end", "local_date", "today", "utc_offset_minutes"]

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


def day_end(day: dt.date) -> dt.datetime:
    """The last second of the city's calendar date `day` (a card expiring on `day` is valid to it), aware UTC."""
    try:
        return dt.datetime.combine(day, dt.time(23, 59, 59), dt.UTC) - _offset
    except OverflowError:  # 9999-12-31 west of UTC: as late as a datetime goes
        return dt.datetime.max.replace(tzinfo=dt.UTC)


def today() -> dt.date:
    """The city's calendar date now."""
    return local_date(dt.datetime.now(dt.UTC))


idnumber.use_calendar(today)  # an ID number's birth date is checked against the city's date
