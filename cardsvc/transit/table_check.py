"""Before a new fare table is deployed: the stations the stored journeys refer to (docs/fares.md
"Closing a station").

A card's journey state (`purse.journey`) names metro stations: its open journey's entry, the journey the
sweep charged, and its unpaired taps (and the exit that paired a charged entry). Those are priced and
cleared with the table running when the card's next tap or the sweep comes, possibly a newer one. A
station the new table neither serves nor lists under `metro.retired` cannot be priced: such a card's
metro exits are declined `fare_input_invalid`, and the sweep leaves its timed-out journey (counted
`unpriced`). Likewise an operator the stored states credit that is neither the table's nor registered
(`transit_operator`): the sweep would not find its open journeys. `cardsvc fares check` finds both before
the table goes live.

Read-only: one statement per `chunk_cards` card ids (the progress step), each an index range scan of
`purse`, so the check runs beside the live service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import asyncpg

from . import clearing, fares

# Every station and every operator a stored state names ('s' / 'o'), with the number of cards naming it,
# for a range of card ids: the open journey's entry, the journey the sweep charged, the unpaired taps (and
# the exit that paired a charged entry).
_NAMED_SQL = """
SELECT n.kind, n.name, count(DISTINCT p.card_id) AS cards
FROM purse p
CROSS JOIN LATERAL (
    SELECT 's', p.journey -> 'journey' ->> 'station' UNION ALL SELECT 'o', p.journey -> 'journey' ->> 'operator'
    UNION ALL SELECT 's', p.journey -> 'swept' ->> 'station' UNION ALL SELECT 'o', p.journey -> 'swept' ->> 'operator'
    UNION ALL SELECT v.kind, v.name
    FROM jsonb_array_elements(coalesce(p.journey -> 'unpaired', '[]')) u,
         LATERAL (VALUES ('s', u ->> 'station'), ('s', u ->> 'pair_station'), ('o', u ->> 'operator')) v (kind, name)
) AS n (kind, name)
WHERE p.card_id >= $1 AND p.card_id < $2 AND p.journey IS NOT NULL AND n.name IS NOT NULL
GROUP BY n.kind, n.name
"""

CHUNK_CARDS = 1_000_000


async def stations_in_use(
    conn: asyncpg.Connection,
    *,
    chunk_cards: int = CHUNK_CARDS,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Every metro station, and every operator, the stored journey states name -> the number of cards
    naming it."""
    hi = await conn.fetchval("SELECT coalesce(max(card_id), 0) FROM purse")
    stations: dict[str, int] = {}
    operators: dict[str, int] = {}
    start = 0
    while start <= hi:
        for r in await conn.fetch(_NAMED_SQL, start, start + chunk_cards):
            into = stations if r["kind"] == "s" else operators
            into[r["name"]] = into.get(r["name"], 0) + r["cards"]
        start += chunk_cards
        if progress is not None:
            progress(f"journey states: {min(start, hi + 1):,}/{hi + 1:,} card ids read")
    return stations, operators


def unknown_stations(table: fares.FareTable, used: Mapping[str, int]) -> dict[str, int]:
    """The stations in `used` that `table` can neither price nor clear (not served, not retired)."""
    return {s: n for s, n in sorted(used.items()) if fares.station_line(table, s) is None}


async def unknown_operators(
    conn: asyncpg.Connection, table: fares.FareTable, used: Mapping[str, int]
) -> dict[str, int]:
    """The operators in `used` (credited with stored metro journeys) that run no metro line in the table and
    are not registered (transit_operator): the sweep, which looks for entries credited to those, would not
    find their open journeys."""
    known = set(table.station_operator.values()) | await clearing.registered_operators(conn)
    return {o: n for o, n in sorted(used.items()) if o not in known}
