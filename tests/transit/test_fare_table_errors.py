"""Fare tables the loader refuses with a clear error: `FareTableError` naming the key path, for every refused
table (cardsvc/transit/fare_table.py; docs/fares.md "The table file")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardsvc.transit.fares import FareTableError, parse_table
from tests.transit.test_fares import demo_dict


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["station", "band"]),
    st.floats(min_value=1.8e305, max_value=1.7e308, allow_nan=False, allow_infinity=False),
)
def test_a_huge_kilometre_value_is_refused_with_a_fare_table_error(where: str, km: float) -> None:
    """A finite but huge `km` / `up_to_km` (a typo, 1e306) is refused as `<file>: <key path>: <problem>`
    (before, `round(km * 1000)` overflowed: a bare OverflowError with no key path, and `cardsvc fares check`
    died with a traceback)."""
    data = demo_dict()
    if where == "station":
        data["metro"]["stations"][3]["km"] = km
        path = "metro.stations[3].km"
    else:
        data["metro"]["bands"][4]["up_to_km"] = km
        path = "metro.bands[4].up_to_km"
    with pytest.raises(FareTableError) as err:
        parse_table(data, source="huge.toml")
    assert err.value.path == path


def test_a_metro_line_without_an_id_is_named_as_such() -> None:
    """A `[[metro.lines]]` entry missing its `id` must be refused as `metro.lines[1].id: missing required
    key` (docs/fares.md: the loader names the key path), not by the first station of that line (`unknown metro
    line`), which would send whoever edits the table to the wrong place."""
    data = demo_dict()
    del data["metro"]["lines"][1]["id"]
    with pytest.raises(FareTableError) as err:
        parse_table(data, source="noid.toml")
    assert (err.value.path, err.value.problem) == ("metro.lines[1].id", "missing required key")


@pytest.mark.parametrize("timeout_s", [86_401, 7 * 86_400, 30 * 86_400])
def test_a_journey_timeout_over_a_day_is_refused(timeout_s: int) -> None:
    """A card remembers a charged entry for 7 days (fares.UNPAIRED_KEEP_S); with a journey timeout of 7 days
    or more its exit, arriving within the timeout, found nothing to give back and the journey was charged
    twice. The loader took any timeout; it now refuses one over a day (JOURNEY_TIMEOUT_S_MAX)."""
    data = demo_dict()
    data["rules"]["journey_timeout_s"] = timeout_s
    with pytest.raises(FareTableError) as err:
        parse_table(data, source="long.toml")
    assert err.value.path == "rules.journey_timeout_s"
    data["rules"]["journey_timeout_s"] = 86_400
    assert parse_table(data, source="day.toml").rules.journey_timeout_s == 86_400
