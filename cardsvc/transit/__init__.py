"""Transit: fare tables and the pure fare engine (DOMAIN.md §5). See docs/fares.md."""

from __future__ import annotations

from .fares import (
    DEMO_TABLE_PATH,
    NO_CONCESSION,
    Concession,
    Decision,
    FareInputError,
    FareTable,
    FareTableError,
    JourneyState,
    OpenJourney,
    Penalty,
    Tap,
    TransferWindow,
    close_open_journey,
    fare,
    load_demo_table,
    load_table,
    metro_distance_m,
    metro_fare_fen,
    parse_table,
)

__all__ = [
    "DEMO_TABLE_PATH",
    "NO_CONCESSION",
    "Concession",
    "Decision",
    "FareInputError",
    "FareTable",
    "FareTableError",
    "JourneyState",
    "OpenJourney",
    "Penalty",
    "Tap",
    "TransferWindow",
    "close_open_journey",
    "fare",
    "load_demo_table",
    "load_table",
    "metro_distance_m",
    "metro_fare_fen",
    "parse_table",
]
