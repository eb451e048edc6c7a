"""Before a new fare table is deployed: the stations the stored journeys refer to (docs/fares.md
"Closing a station").

A card's journey state (`purse.journey`) names metro stations: its open journey's entry, the journey the
sweep charged, and its unpaired taps (and the exit that paired a charged entry). Those are priced and
cleared with the table running when the card's next tap or the sweep comes, possibly a newer one. A
station the new table neither serves nor lists under `metro.retired` cannot be priced: such a card's
metro exits are declined `fare_input_invalid`, and the sweep leaves its timed-out journey (counted
`unpriced`). `cardsvc fares check` finds them before the table goes live.

Read-only: one statement per `chunk_cards` card ids (the progress step), each an index range scan of
`purse`, so the check runs beside the live service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import asyncpg

from . import fares

# Every station a stored state names, with the number of cards naming it, for a range of card ids.
_STATIONS_SQL = """
SELECT s.station, count(DISTINCT p.card_id) AS cards
FROM purse p
CROSS JOIN LATERAL (
    SELECT p.journey -> 'journey' ->> 'station'
    UNION ALL SELECT p.journey -> 'swept' ->> 'station'
    UNION ALL SELECT u ->> 'station' FROM jsonb_array_elements(coalesce(p.journey -> 'unpaired', '[]')) u
    UNION ALL SELECT u ->> 'pair_station' FROM jsonb_array_elements(coalesce(p.journey -> 'unpaired', '[]')) u
) AS s (station)
WHERE p.card_id >= $1 AND p.card_id < $2 AND p.journey IS NOT NULL AND s.station IS NOT NULL
GROUP BY s.station
"""

CHUNK_CARDS = 1_000_000


async def stations_in_use(
    conn: asyncpg.Connection,
    *,
    chunk_cards: int = CHUNK_CARDS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Every metro station the stored journey states name -> the number of cards naming it."""
    hi = await conn.fetchval("SELECT coalesce(max(card_id), 0) FROM purse")
    used: dict[str, int] = {}
    start = 0
    while start <= hi:
        for r in await conn.fetch(_STATIONS_SQL, start, start + chunk_cards):
            used[r["station"]] = used.get(r["station"], 0) + r["cards"]
        start += chunk_cards
        if progress is not None:
            progress(f"journey states: {min(start, hi + 1):,}/{hi + 1:,} card ids read")
    return used


def unknown_stations(table: fares.FareTable, used: Mapping[str, int]) -> dict[str, int]:
    """The stations in `used` that `table` can neither price nor clear (not served, not retired)."""
    return {s: n for s, n in sorted(used.items()) if fares.station_line(table, s) is None}
