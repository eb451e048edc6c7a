"""The fare engine (cardsvc/transit/fares.py; rules in docs/fares.md).

Concrete Chongqing examples on the shipped demo table, the loader's refusals, and property tests on
random small networks and random tap sequences checked against an independent model (Floyd–Warshall
distances over stations, a journey model, and per-ride bounds).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import itertools
import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardsvc.transit.fares import (
    DEMO_TABLE_PATH,
    EMPTY_STATE,
    NO_CONCESSION,
    RULE_NAMES,
    UNPAIRED_MAX,
    Concession,
    Decision,
    FareInputError,
    FareTable,
    FareTableError,
    JourneyState,
    OpenJourney,
    Penalty,
    Refund,
    Tap,
    TransferWindow,
    UnpairedTap,
    band_fare_fen,
    card_price_fen,
    charge_held_exits,
    close_open_journey,
    elderly_quota_for_year,
    fare,
    first_due,
    half_price_fen,
    load_demo_table,
    load_table,
    local_day,
    metro_distance_m,
    metro_fare_fen,
    parse_table,
)

# 2026-11-02 08:00:00 in Chongqing (UTC+8) = 00:00:00 UTC.
T0 = int(dt.datetime(2026, 11, 2, 0, 0, tzinfo=dt.UTC).timestamp())
MIN = 60


@pytest.fixture(scope="module")
def cq() -> FareTable:
    return load_demo_table()


def demo_dict() -> dict[str, Any]:
    return tomllib.loads(DEMO_TABLE_PATH.read_text(encoding="utf-8"))


def with_rules(**rules: Any) -> FareTable:
    data = demo_dict()
    data["rules"].update(rules)
    return parse_table(data, source="variant.toml")


def bus(t: int, line: str = "bus-105") -> Tap:
    return Tap(t, "bus", line)


def m_in(t: int, station: str) -> Tap:
    return Tap(t, "metro", station.split("-")[0].upper(), station, "in")


def m_out(t: int, station: str) -> Tap:
    return Tap(t, "metro", station.split("-")[0].upper(), station, "out")


def up(tap: Tap) -> Tap:
    """The tap as a gate's upload (a ride code verified offline): it may arrive after later taps."""
    return dataclasses.replace(tap, uploaded=True)


def run(
    table: FareTable,
    taps: list[Tap],
    concession: Concession = NO_CONCESSION,
    state: JourneyState = EMPTY_STATE,
) -> list[Decision]:
    out = []
    for tap in taps:
        d = fare(table, state, tap, concession)
        out.append(d)
        state = d.state
    return out


def sweep(table: FareTable, state: JourneyState, now: int, *, force: bool = False) -> tuple[int, JourneyState]:
    """What the service's sweep charges a card at `now` (its held exits, then its open journey) and the state after."""
    held, state = charge_held_exits(table, state, now)
    penalty, state = close_open_journey(table, state, now, force=force)
    return (penalty.amount_fen if penalty else 0) + sum(p.amount_fen for _, p in held), state


# --------------------------------------------------------------------------------------------------
# The demo table and Chongqing's numbers


def test_demo_table_loads_with_the_documented_contents(cq: FareTable) -> None:
    assert cq.version == "cq-2026-11"
    assert cq.effective_from == dt.date(2026, 11, 1)
    assert set(cq.operators) == {"cq-bus", "cq-metro"}
    assert sorted(b.fare_fen for b in cq.bus_lines.values()) == [100, 100, 200, 200, 200]
    assert set(cq.metro_lines) == {"L1", "L2", "L3"}
    assert all(12 <= len(m.stations) <= 20 for m in cq.metro_lines.values())
    assert cq.bands == ((6000, 200), (11000, 300), (17000, 400), (24000, 500), (32000, 600))
    assert cq.cap_fen == 700
    assert cq.rules.daily_cap_fen is None  # off by default
    assert cq.rules.transfer_pairs == {("bus", "bus"), ("bus", "metro"), ("metro", "bus")}
    assert elderly_quota_for_year(cq, extra_granted=False) == 1200
    assert elderly_quota_for_year(cq, extra_granted=True) == 1500


@pytest.mark.parametrize(
    ("km", "fen"),
    [
        (0, 200),
        (6, 200),
        (6.001, 300),
        (11, 300),
        (11.5, 400),
        (17, 400),
        (24, 500),
        (32, 600),
        (32.001, 700),
        (90, 700),
    ],
)
def test_metro_bands_are_inclusive_at_the_upper_limit(cq: FareTable, km: float, fen: int) -> None:
    assert band_fare_fen(cq, round(km * 1000)) == fen


def test_bus_two_yuan_with_the_card_is_180_fen(cq: FareTable) -> None:
    d = fare(cq, EMPTY_STATE, bus(T0))
    assert (d.amount_fen, d.full_fare_fen, d.operator, d.penalty) == (180, 200, "cq-bus", None)
    assert d.rules == ("bus_flat_fare", "card_discount")
    assert d.state.window == TransferWindow(T0, 180, "bus", False)
    assert d.state.day_charged_fen == 180
    assert fare(cq, EMPTY_STATE, bus(T0, "bus-261")).amount_fen == 90


def test_metro_fare_follows_the_shortest_path_through_interchanges(cq: FareTable) -> None:
    # Along line 1: 朝天门 0.0 km -> 沙坪坝 15.4 km: ¥4, ¥3.60 with the card.
    d = run(cq, [m_in(T0, "l1-chaotianmen"), m_out(T0 + 30 * MIN, "l1-shapingba")])
    assert (d[0].amount_fen, d[0].rules, d[0].operator) == (0, ("metro_entry",), "cq-metro")
    assert (d[1].amount_fen, d[1].full_fare_fen, d[1].distance_m) == (360, 400, 15400)
    # 新山村 (L2) -> 园博园 (L3): via 牛角沱 13.7 + 16.8 = 30.5 km, shorter than via 大坪/两路口 (31.3 km).
    assert metro_distance_m(cq, "l2-xinshancun", "l3-yuanboyuan") == 30500
    assert metro_fare_fen(cq, "l2-xinshancun", "l3-yuanboyuan") == 600
    # 赖家桥 (L1) -> 园博园 (L3): 37.6 km via 大坪 and 牛角沱 -> the ¥7 cap.
    assert metro_distance_m(cq, "l1-laijiaqiao", "l3-yuanboyuan") == 37600
    d = run(cq, [m_in(T0, "l1-laijiaqiao"), m_out(T0 + 70 * MIN, "l3-yuanboyuan")])
    assert (d[1].full_fare_fen, d[1].amount_fen) == (700, 630)
    # An interchange is one place: both 两路口 stations are 0 km apart.
    assert metro_distance_m(cq, "l1-lianglukou", "l3-lianglukou") == 0


def test_transfer_bus_two_yuan_then_metro_four_km_costs_nothing_more(cq: FareTable) -> None:
    # Bus ¥2 -> 180. Metro 小什字 -> 鹅岭 4.6 km: ¥2 -> 180 with the card, minus min(180, 180, 200) = 0.
    d = run(cq, [bus(T0), m_in(T0 + 20 * MIN, "l1-xiaoshizi"), m_out(T0 + 35 * MIN, "l1-eling")])
    assert [x.amount_fen for x in d] == [180, 0, 0]
    assert (d[2].full_fare_fen, d[2].transfer_discount_fen) == (200, 180)
    assert d[2].rules == ("metro_distance_fare", "card_discount", "transfer_discount")
    assert d[2].state.window == TransferWindow(T0, 180, "bus", True)


def test_transfer_discount_is_capped_by_the_first_fare_and_two_yuan(cq: FareTable) -> None:
    long_ride = [m_in(T0 + 10 * MIN, "l1-chaotianmen"), m_out(T0 + 40 * MIN, "l1-shapingba")]  # 360
    d = run(cq, [bus(T0), *long_ride])
    assert (d[2].amount_fen, d[2].transfer_discount_fen) == (180, 180)  # first fare 180 < 200
    d = run(cq, [bus(T0, "bus-261"), *long_ride])
    assert (d[2].amount_fen, d[2].transfer_discount_fen) == (270, 90)  # first fare 90
    # Metro 360 first, then bus 180: min(180, 360, 200) = 180 -> the bus is free.
    d = run(cq, [*long_ride, bus(T0 + 50 * MIN)])
    assert (d[2].amount_fen, d[2].transfer_discount_fen) == (0, 180)


def test_the_window_starts_at_the_metro_exit_and_at_the_bus_tap(cq: FareTable) -> None:
    # Metro in at 0, out at 50 min; bus at 1 h 45 min = 55 min after the exit: still in the window.
    d = run(cq, [m_in(T0, "l1-chaotianmen"), m_out(T0 + 50 * MIN, "l1-shapingba"), bus(T0 + 105 * MIN)])
    assert d[1].state.window == TransferWindow(T0 + 50 * MIN, 360, "metro", False)
    assert (d[2].amount_fen, d[2].transfer_discount_fen) == (0, 180)
    # Bus -> metro: the metro ride must ENTER within the hour; its exit may be later.
    d = run(cq, [bus(T0), m_in(T0 + 59 * MIN, "l1-chaotianmen"), m_out(T0 + 95 * MIN, "l1-shapingba")])
    assert d[2].transfer_discount_fen == 180
    d = run(cq, [bus(T0), m_in(T0 + 60 * MIN, "l1-chaotianmen"), m_out(T0 + 95 * MIN, "l1-shapingba")])
    assert d[2].transfer_discount_fen == 0


def test_window_edges_and_one_discount_per_window(cq: FareTable) -> None:
    assert run(cq, [bus(T0), bus(T0 + 3599)])[1].amount_fen == 0
    d = run(cq, [bus(T0), bus(T0 + 3600)])
    assert (d[1].amount_fen, d[1].state.window) == (180, TransferWindow(T0 + 3600, 180, "bus", False))
    # Bus, bus (discounted), bus (same window, spent: full), bus after the window ends (new window).
    d = run(cq, [bus(T0), bus(T0 + 10 * MIN), bus(T0 + 20 * MIN), bus(T0 + 61 * MIN), bus(T0 + 70 * MIN)])
    assert [x.amount_fen for x in d] == [180, 0, 180, 180, 0]
    assert d[2].state.window == TransferWindow(T0, 180, "bus", True)


def test_no_transfer_discount_from_metro_to_metro(cq: FareTable) -> None:
    taps = [
        m_in(T0, "l1-chaotianmen"),
        m_out(T0 + 10 * MIN, "l1-qixinggang"),
        m_in(T0 + 15 * MIN, "l1-qixinggang"),
        m_out(T0 + 25 * MIN, "l1-daping"),
        bus(T0 + 30 * MIN),
    ]
    d = run(cq, taps)
    assert [x.amount_fen for x in d] == [0, 180, 0, 180, 0]
    assert d[3].transfer_discount_fen == 0
    # The second metro ride opened its own window, and the bus transferred from it.
    assert d[3].state.window == TransferWindow(T0 + 25 * MIN, 180, "metro", False)
    assert d[4].transfer_discount_fen == 180


def test_daily_cap_and_its_reset_at_local_midnight() -> None:
    table = with_rules(daily_cap_fen=500)
    taps = [bus(T0 + i * 2 * 3600) for i in range(5)]  # 08:00, 10:00, ... 16:00 local: no transfers
    d = run(table, taps)
    assert [x.amount_fen for x in d] == [180, 180, 140, 0, 0]
    assert "daily_cap" in d[2].rules and "daily_cap" in d[3].rules
    # 23:59:59 local is the same day; 00:00:00 local (16:00 UTC) is a new day.
    midnight = T0 + 16 * 3600
    assert local_day(table, midnight - 1) == dt.date(2026, 11, 2)
    assert local_day(table, midnight) == dt.date(2026, 11, 3)
    late = fare(table, d[-1].state, bus(midnight - 1))
    assert late.amount_fen == 0
    nxt = fare(table, late.state, bus(midnight + 2 * 3600))
    assert (nxt.amount_fen, nxt.state.day_charged_fen) == (180, 180)
    assert nxt.state.to_dict()["day"] == "2026-11-03"


def test_concessions(cq: FareTable) -> None:
    ride = [m_in(T0, "l1-chaotianmen"), m_out(T0 + 30 * MIN, "l1-shapingba")]  # base 400
    elderly = Concession("elderly", elderly_rides_remaining=1)
    d = run(cq, [bus(T0 - 3 * 3600), *ride], elderly)
    assert [(x.amount_fen, x.quota_ride_consumed) for x in d] == [(0, True), (0, False), (0, True)]
    assert d[2].rules == ("metro_distance_fare", "elderly_free")
    exhausted = fare(cq, EMPTY_STATE, bus(T0), Concession("elderly", 0))
    assert (exhausted.amount_fen, exhausted.quota_ride_consumed) == (180, False)
    assert exhausted.rules == ("bus_flat_fare", "elderly_quota_exhausted", "card_discount")
    assert run(cq, ride, Concession("disabled_free"))[1].amount_fen == 0
    half = run(cq, ride, Concession("disabled_half"))[1]
    assert (half.amount_fen, half.rules) == (200, ("metro_distance_fare", "disabled_half"))
    assert fare(cq, EMPTY_STATE, bus(T0), Concession("disabled_half")).amount_fen == 100
    # A free first ride gives no transfer discount to the next paid one.
    d = run(cq, [bus(T0)], Concession("elderly", 1))
    assert fare(cq, d[0].state, bus(T0 + 60)).amount_fen == 180


def test_rounding_is_half_up_on_the_fen() -> None:
    assert card_price_fen(200, 10) == 180
    assert card_price_fen(155, 10) == 140  # 139.5 -> 140
    assert card_price_fen(154, 10) == 139  # 138.6 -> 139
    assert card_price_fen(1, 50) == 1  # 0.5 -> 1
    assert card_price_fen(16, 10) == 14  # 14.4 -> 14
    assert card_price_fen(0, 10) == 0
    for base in range(0, 1000):
        for pct in (0, 10, 15, 33, 50, 100):
            exact = Fraction(base * (100 - pct), 100)
            assert card_price_fen(base, pct) == math.floor(exact + Fraction(1, 2)) <= base
    assert half_price_fen(151) == 76 and half_price_fen(150) == 75


def test_odd_sequences(cq: FareTable) -> None:
    # Entering again while a journey is open: the open one is charged the maximum fare, a new one opens.
    d = run(cq, [m_in(T0, "l1-chaotianmen"), m_in(T0 + 90 * MIN, "l2-pingan")])
    assert d[1].penalty == Penalty(700, "cq-metro", "missing_tap_out", "l1-chaotianmen")
    assert (d[1].amount_fen, d[1].total_fen, d[1].rules) == (0, 700, ("missing_tap_out", "metro_entry"))
    assert d[1].state.journey == OpenJourney("l2-pingan", T0 + 90 * MIN, "cq-metro")
    assert d[1].state.day_charged_fen == 0  # penalties are not fares: not counted toward a daily cap
    # Boarding a bus with an open metro journey: penalty for the metro, then the bus fare.
    d = run(cq, [m_in(T0, "l1-chaotianmen"), bus(T0 + 90 * MIN)])
    assert (d[1].amount_fen, d[1].total_fen, d[1].operator) == (180, 880, "cq-bus")
    assert d[1].penalty == Penalty(700, "cq-metro", "missing_tap_out", "l1-chaotianmen")
    assert d[1].state.journey is None
    # Exit without entry: the maximum fare as a penalty, nothing else changes.
    d = run(cq, [bus(T0), m_out(T0 + 20 * MIN, "l1-shapingba")])
    assert (d[1].amount_fen, d[1].penalty) == (0, Penalty(700, "cq-metro", "missing_tap_in", "l1-shapingba"))
    assert d[1].state.window == d[0].state.window
    # Same station in and out: the minimum fare (0 km band), with the card.
    d = run(cq, [m_in(T0, "l1-shapingba"), m_out(T0 + 2 * MIN, "l1-shapingba")])
    assert (d[1].amount_fen, d[1].full_fare_fen, d[1].distance_m) == (180, 200, 0)
    assert d[1].rules == ("same_station_exit", "metro_distance_fare", "card_discount")
    # Exit after the journey timeout: one penalty, the journey is closed.
    d = run(cq, [m_in(T0, "l1-chaotianmen"), m_out(T0 + 4 * 3600, "l1-shapingba")])
    assert (d[1].amount_fen, d[1].penalty) == (0, Penalty(700, "cq-metro", "journey_timeout", "l1-chaotianmen"))
    assert d[1].state.journey is None


def test_close_open_journey(cq: FareTable) -> None:
    state = fare(cq, EMPTY_STATE, m_in(T0, "l1-chaotianmen")).state
    assert close_open_journey(cq, state, T0 + 4 * 3600 - 1) == (None, state)
    penalty, closed = close_open_journey(cq, state, T0 + 4 * 3600)
    assert penalty == Penalty(700, "cq-metro", "missing_tap_out", "l1-chaotianmen")
    assert closed.journey is None and closed.window == state.window
    assert close_open_journey(cq, state, T0 + 60, force=True)[0] == penalty
    assert close_open_journey(cq, closed, T0 + 9 * 3600, force=True) == (None, closed)
    # The closed journey is remembered until the next tap, through the stored form.
    assert closed.swept == state.journey
    assert JourneyState.from_json(closed.to_json()) == closed and "swept" in closed.to_dict()


def test_the_exit_of_a_swept_journey_is_not_charged_again(cq: FareTable) -> None:
    """The sweep charged the maximum fare for a journey left open; the rider's late exit then ends that
    journey: one maximum fare in all, as when the exit itself finds the journey timed out."""
    entered = fare(cq, EMPTY_STATE, m_in(T0, "l1-chaotianmen")).state
    late = m_out(T0 + 5 * 3600, "l1-xiaoshizi")
    unswept = fare(cq, entered, late)
    penalty, swept = close_open_journey(cq, entered, T0 + 4 * 3600)
    exit_ = fare(cq, swept, late)
    assert penalty is not None and unswept.penalty is not None
    assert penalty.amount_fen + exit_.total_fen == unswept.total_fen == cq.cap_fen
    assert exit_.penalty is None and exit_.rules == ("exit_of_swept_journey",) and exit_.operator == "cq-metro"
    assert exit_.state.swept is None and "swept" not in exit_.state.to_dict()
    # Any other tap first starts something new: an exit after it is an exit without entry again.
    after_bus = fare(cq, fare(cq, swept, bus(T0 + 5 * 3600)).state, late)
    assert after_bus.penalty is not None and after_bus.penalty.reason == "missing_tap_in"


# --------------------------------------------------------------------------------------------------
# Late uploads: gates upload on their own schedules (docs/fares.md "Late uploads")


def test_an_exit_uploaded_before_its_entry_is_held_and_priced_with_it(cq: FareTable) -> None:
    """The exit gate's record arrives first: held, nothing charged yet. The entry, when it arrives,
    prices the ride as it would have cost in order (but for a transfer discount) and opens no journey
    for the sweep to charge."""
    d = run(cq, [up(m_out(T0 + 30 * MIN, "l1-daping")), up(m_in(T0, "l1-chaotianmen"))])
    assert (d[0].total_fen, d[0].penalty, d[0].rules) == (0, None, ("exit_held",))
    assert d[0].state.unpaired == (UnpairedTap("out", "l1-daping", T0 + 30 * MIN, "cq-metro", charged=False),)
    assert JourneyState.from_json(d[0].state.to_json()) == d[0].state
    in_order = run(cq, [m_in(T0, "l1-chaotianmen"), m_out(T0 + 30 * MIN, "l1-daping")])[1]
    assert (
        (d[1].amount_fen, d[1].full_fare_fen, d[1].penalty)
        == (in_order.amount_fen, 300, None)
        == (270, 300, None)
    )
    assert d[1].rules == (*in_order.rules, "late_upload", "entry_of_held_exit") and d[1].distance_m == 6900
    assert d[1].state.journey is None and d[1].state.unpaired == ()
    assert d[1].state.day_charged_fen == 270
    assert sweep(cq, d[1].state, T0 + 86400, force=True)[0] == 0
    # The per-ride limits of both halves apply to the ride.
    exit_ = dataclasses.replace(up(m_out(T0 + 30 * MIN, "l1-daping")), max_fare_fen=200)
    both = run(cq, [exit_, up(m_in(T0, "l1-chaotianmen"))])
    assert both[1].amount_fen == 200 and both[1].rules[-2:] == ("ride_code_max_fare", "entry_of_held_exit")
    # An entry that the held exit does not fit (more than the journey timeout before it) is not its entry.
    far = fare(cq, d[0].state, up(m_in(T0 + 30 * MIN - 4 * 3600, "l1-chaotianmen")))
    assert far.rules == ("metro_entry", "late_upload") and far.state.unpaired[0].charged is False
    # An online entry is priced in arrival order, whatever the validator's clock says: it opens a
    # journey, and the held exit waits for its own entry.
    online = fare(cq, d[0].state, m_in(T0, "l1-chaotianmen"))
    assert online.state.journey is not None and online.state.unpaired == d[0].state.unpaired
    # An online exit without entry is charged at once, as always: the card's entry was online too.
    assert fare(cq, EMPTY_STATE, m_out(T0, "l1-daping")).penalty == Penalty(
        700, "cq-metro", "missing_tap_in", "l1-daping"
    )


def test_a_held_exit_whose_entry_does_not_come_costs_the_maximum_fare_once(cq: FareTable) -> None:
    held = fare(cq, EMPTY_STATE, up(m_out(T0, "l1-xiaoshizi"))).state
    # The card's next tap in order within the journey timeout: the exit is still held.
    early = fare(cq, held, bus(T0 + 3600))
    assert (early.due, early.total_fen) == ((), 180) and early.state.unpaired == held.unpaired
    # A tap in order once the exit is journey_timeout_s old charges it, besides the tap's own fare.
    later = fare(cq, early.state, bus(T0 + 4 * 3600))
    assert later.due == (Penalty(700, "cq-metro", "missing_tap_in", "l1-xiaoshizi"),)
    assert later.total_fen == 700 + later.amount_fen == 880
    # Its penalty's journal row is dated at the tap that charged it: the state names it so.
    charged = UnpairedTap("out", "l1-xiaoshizi", T0, "cq-metro", charged_fen=700, charged_at=T0 + 4 * 3600)
    assert later.state.unpaired == (charged,)
    # Unless the caller keeps them for later (the purse can pay the ride, not them): still held, still due.
    kept = fare(cq, early.state, bus(T0 + 4 * 3600), charge_due=False)
    assert (kept.due, kept.total_fen) == ((), 180) and kept.state.unpaired == held.unpaired
    assert len(fare(cq, kept.state, bus(T0 + 5 * 3600)).due) == 1
    # It stays as a charged exit: its entry, arriving even later, gives the maximum fare back and pays
    # the ride (朝天门 → 小什字, 2.0 km: base 200, card 180), under the entry's operator.
    entry = fare(cq, later.state, up(m_in(T0 - 600, "l1-chaotianmen")))
    assert entry.refund == Refund(700, "cq-metro", "l1-xiaoshizi", T0, T0 + 4 * 3600)
    assert (entry.amount_fen, entry.total_fen, entry.net_fen, entry.operator) == (180, 180, -520, "cq-metro")
    assert entry.rules == ("metro_distance_fare", "card_discount", "late_upload", "entry_of_charged_exit")
    assert entry.state.unpaired == () and entry.state.day_charged_fen == later.state.day_charged_fen + 180
    # A caller that cannot give the charge back: nothing more, nothing back.
    kept_charge = fare(cq, later.state, up(m_in(T0 - 600, "l1-chaotianmen")), refund=False)
    assert (kept_charge.net_fen, kept_charge.refund, kept_charge.rules) == (0, None, ("entry_of_charged_exit",))
    # A state stored before the charge was kept (no `charged_fen`): nothing more, nothing back.
    legacy = dataclasses.replace(later.state, unpaired=(UnpairedTap("out", "l1-xiaoshizi", T0, "cq-metro"),))
    old = fare(cq, legacy, up(m_in(T0 - 600, "l1-chaotianmen")))
    assert (old.net_fen, old.refund, old.rules) == (0, None, ("entry_of_charged_exit",))
    # With another penalty at the same tap: both.
    entered = fare(cq, held, m_in(T0 + 3600, "l1-daping")).state
    both = fare(cq, entered, m_in(T0 + 5 * 3600, "l1-daping"))
    assert both.penalty is not None and both.penalty.reason == "missing_tap_out" and len(both.due) == 1
    assert both.total_fen == 1400
    # A late upload is not the card's newest tap: it charges no held exit.
    assert fare(cq, fare(cq, held, bus(T0 + 5 * 3600)).state, up(bus(T0 + 60))).due == ()
    # The sweep: within the ride code's limit, at the moment the exit became due, once.
    capped = fare(cq, EMPTY_STATE, dataclasses.replace(up(m_out(T0, "l1-xiaoshizi")), max_fare_fen=300)).state
    assert charge_held_exits(cq, capped, T0 + 4 * 3600 - 1) == ((), capped)
    charged, after = charge_held_exits(cq, capped, T0 + 5 * 3600)
    assert charged == ((T0 + 4 * 3600, Penalty(300, "cq-metro", "missing_tap_in", "l1-xiaoshizi")),)
    assert charge_held_exits(cq, after, T0 + 6 * 3600) == ((), after)
    assert fare(cq, after, bus(T0 + 6 * 3600)).due == ()
    assert JourneyState.from_json(after.to_json()) == after


def test_held_exits_are_kept_until_charged(cq: FareTable) -> None:
    """A card holds at most UNPAIRED_MAX exits: they are kept before any other unpaired tap, and one more
    is charged at once."""
    state = EMPTY_STATE
    for k in range(UNPAIRED_MAX):
        state = fare(cq, state, up(m_out(T0 + k * MIN, "l1-daping"))).state
    assert [u.charged for u in state.unpaired] == [False] * UNPAIRED_MAX
    # A late entry that fits none of them is not kept: the held exits come first.
    assert fare(cq, state, up(m_in(T0 - 5 * 3600, "l1-daping"))).state.unpaired == state.unpaired
    fifth = fare(cq, state, up(m_out(T0 + 10 * MIN, "l1-xiaoshizi")))
    assert fifth.penalty == Penalty(700, "cq-metro", "missing_tap_in", "l1-xiaoshizi")
    assert fifth.state.unpaired == state.unpaired
    # The card's next tap in order once they are due charges them all.
    due = fare(cq, state, bus(T0 + 5 * 3600))
    assert len(due.due) == UNPAIRED_MAX and due.total_fen == UNPAIRED_MAX * 700 + 180
    assert [u.charged for u in due.state.unpaired] == [True] * UNPAIRED_MAX


def test_the_exit_of_a_charged_journey_that_lasted_the_whole_timeout_costs_nothing_more(cq: FareTable) -> None:
    """In order, an exit exactly journey_timeout_s after the entry finds the journey timed out: one maximum
    fare. Arriving late, after a later entry charged that journey, it must not be charged again."""
    a_in, a_out = up(m_in(T0, "l1-chaotianmen")), up(m_out(T0 + 4 * 3600, "l1-daping"))
    d = run(cq, [a_in, up(m_in(T0 + 5 * 3600, "l2-daping")), a_out])
    assert d[1].penalty is not None and d[1].penalty.reason == "missing_tap_out"
    assert (d[2].total_fen, d[2].rules) == (0, ("exit_of_charged_journey",))
    assert charge_held_exits(cq, d[2].state, T0 + 86400)[0] == ()  # nothing held for later either
    online = run(cq, [a_in, a_out])
    assert online[1].penalty is not None and online[1].penalty.reason == "journey_timeout"


def test_an_exit_after_the_card_stopped_counts_only_for_an_entry_before_the_stop(cq: FareTable) -> None:
    """A loss report at `stop` between a ride's entry and exit, the exit uploaded first: held for an entry
    before the stop, priced with it, and never charged on its own (the card was stopped when it was taken)."""
    stop = T0 + 600
    exit_ = dataclasses.replace(up(m_out(T0 + 1800, "l1-daping")), entered_before=stop)
    held = fare(cq, EMPTY_STATE, exit_)
    assert (held.total_fen, held.rules) == (0, ("exit_held",))
    assert held.state.unpaired == (UnpairedTap("out", "l1-daping", T0 + 1800, "cq-metro", None, False, stop),)
    assert JourneyState.from_json(held.state.to_json()) == held.state
    ride = fare(cq, held.state, up(m_in(T0, "l1-chaotianmen")))
    assert (ride.amount_fen, ride.rules[-1]) == (270, "entry_of_held_exit")
    # An entry after the stop does not take it, nor is it judged against it (another rider's, on a
    # replacement card: it opens that rider's journey; a lost card's the service declines anyway).
    after_stop = fare(cq, held.state, up(m_in(T0 + 900, "l1-chaotianmen")))
    assert after_stop.rules == ("metro_entry",) and after_stop.state.unpaired == held.state.unpaired
    assert after_stop.state.journey is not None and after_stop.state.journey.time == T0 + 900
    # No entry before the stop: dropped once due, uncharged, by the sweep or the next tap.
    # Its time is remembered as of the stop: an entry before the stop coming even later is late (it opens
    # no journey for the sweep to charge the maximum fare), a tap of the rider after the stop is not.
    dropped, after = charge_held_exits(cq, held.state, T0 + 1800 + 4 * 3600)
    assert (dropped, after.unpaired, after.latest) == ((), (), stop)
    too_late = fare(cq, after, up(m_in(T0, "l1-chaotianmen")))
    assert (too_late.total_fen, too_late.state.journey) == (0, None), too_late
    assert fare(cq, after, up(m_out(T0 + 1700, "l1-daping"))).rules[0] != "late_upload"
    later = fare(cq, held.state, bus(T0 + 6 * 3600))
    assert (later.due, later.total_fen, later.state.unpaired) == ((), 180, ())
    # No room to hold it: nothing charged and nothing kept (rule exit_after_stop; the service declines it).
    full = EMPTY_STATE
    for k in range(UNPAIRED_MAX + 1):
        full = fare(cq, full, up(m_in(T0 - 10 * 3600 + k * 3600, "l1-daping"))).state
    full = fare(cq, full, bus(T0 - 5 * 3600)).state  # each entry and the bus charge the journey before
    assert [(u.direction, u.charged) for u in full.unpaired] == [("in", True)] * UNPAIRED_MAX
    refused = fare(cq, full, dataclasses.replace(up(m_out(T0 - 4 * 3600, "l1-xiaoshizi")), entered_before=stop))
    assert (refused.total_fen, refused.rules, refused.state.unpaired) == (0, ("exit_after_stop",), full.unpaired)


def test_an_exit_after_a_replacement_leaves_the_new_cards_own_journey_alone(cq: FareTable) -> None:
    """Two riders of one purse: A entered with the old card's ride code before the replacement and left
    after it; B entered with the new card after it. A's exit must not end B's journey."""
    stop = T0 + 600
    a_in = up(m_in(T0, "l1-chaotianmen"))
    a_out = dataclasses.replace(up(m_out(T0 + 1200, "l1-daping")), entered_before=stop)
    b_in, b_out = m_in(T0 + 900, "l1-xiaoshizi"), m_out(T0 + 1500, "l1-daping")
    d = run(cq, [b_in, a_out, b_out, a_in])
    assert d[1].rules == ("exit_held", "late_upload") and d[1].state.journey == d[0].state.journey
    assert d[2].penalty is None and d[2].distance_m == metro_distance_m(cq, "l1-xiaoshizi", "l1-daping")
    assert d[3].rules[-1] == "entry_of_held_exit"
    in_order = run(cq, [a_in, up(m_out(T0 + 1200, "l1-daping"))])[1].amount_fen + run(cq, [b_in, b_out])[1].amount_fen
    assert sum(x.net_fen for x in d) == in_order


def test_a_full_memory_of_unpaired_taps_drops_what_costs_least(cq: FareTable) -> None:
    """Four journeys whose records arrive crossed fill the card's unpaired taps. A held exit must not push
    out the entry of a journey already charged the maximum fare: that journey's exit, arriving next,
    would be held and charged a second time. Charged entries are dropped last, held exits next, and the
    rest first."""
    h = 3600
    d = (up(m_in(T0, "l1-xiaoshizi")), up(m_out(T0 + 1800, "l1-daping")))
    a = (up(m_in(T0 + h, "l1-chaotianmen")), up(m_out(T0 + h + 1800, "l1-daping")))
    b = (up(m_in(T0 + 2 * h, "l2-daping")), up(m_out(T0 + 2 * h + 1800, "l2-liziba")))
    c = (up(m_in(T0 + 5 * h, "l1-xiaoshizi")), up(m_out(T0 + 7 * h + 2400, "l1-shapingba")))
    decisions = run(cq, [a[0], b[0], c[1], c[0], b[1], d[1], a[1], d[0]])
    assert decisions[5].rules == ("exit_held", "late_upload")  # D's exit: the late entry C in makes room
    # A's exit finds A's charged entry: the maximum fare given back, the ride paid.
    assert decisions[6].rules[-1] == "exit_of_charged_journey" and decisions[6].refund is not None
    assert decisions[7].rules[-1] == "entry_of_held_exit"
    total = sum(x.net_fen for x in decisions) + sweep(cq, decisions[-1].state, T0 + 86400, force=True)[0]
    assert total <= 4 * cq.cap_fen
    # A fifth exit without entry while four journeys wait on the card is charged at once instead.
    state = EMPTY_STATE
    for k in range(UNPAIRED_MAX):
        state = fare(cq, state, up(m_in(T0 + k * h, "l1-daping"))).state  # each entry charges the one before
    state = fare(cq, state, bus(T0 + 5 * h)).state
    assert [(u.direction, u.charged) for u in state.unpaired] == [("in", True)] * UNPAIRED_MAX
    extra = fare(cq, state, up(m_out(T0 + 6 * h, "l1-xiaoshizi")))
    assert extra.penalty is not None and extra.penalty.reason == "missing_tap_in"
    assert [(u.direction, u.charged) for u in extra.state.unpaired] == [("in", True)] * UNPAIRED_MAX


def test_a_late_entry_and_its_exit_price_the_ride_and_leave_the_open_journey_alone(cq: FareTable) -> None:
    open_ = fare(cq, EMPTY_STATE, m_in(T0 + 2 * 3600, "l2-daping")).state
    d = run(cq, [up(m_in(T0, "l1-chaotianmen")), up(m_out(T0 + 20 * MIN, "l1-daping"))], state=open_)
    assert (d[0].total_fen, d[0].rules) == (0, ("metro_entry", "late_upload"))
    assert d[0].state.journey == open_.journey
    # 6.9 km: 300 fen, card discount 10%: what the ride costs in order.
    in_order = run(cq, [m_in(T0, "l1-chaotianmen"), m_out(T0 + 20 * MIN, "l1-daping")])[1]
    assert (d[1].amount_fen, d[1].full_fare_fen, d[1].penalty) == (in_order.amount_fen, 300, None) == (270, 300, None)
    assert d[1].rules == (*in_order.rules, "late_upload") and d[1].distance_m == 6900
    assert d[1].state.journey == open_.journey and d[1].state.unpaired == ()
    assert d[1].state.day_charged_fen == in_order.amount_fen
    # The open journey still ends as it would have.
    assert fare(cq, d[1].state, m_out(T0 + 2 * 3600 + 600, "l2-yuanjiagang")).penalty is None


def test_a_journey_charged_for_a_missing_exit_gets_it_back_when_the_exit_arrives(cq: FareTable) -> None:
    """Entry gates upload before the exit gate: the second entry charges the first journey the maximum
    fare; that journey's exit, arriving later, is its end, not an exit without entry: the maximum fare is
    given back and the ride is charged its fare."""
    d = run(
        cq,
        [
            up(m_in(T0, "l1-chaotianmen")),
            up(m_in(T0 + 3600, "l2-daping")),
            up(m_out(T0 + 30 * MIN, "l1-daping")),
            up(m_out(T0 + 3600 + 20 * MIN, "l2-yuanjiagang")),
        ],
    )
    assert d[1].penalty == Penalty(700, "cq-metro", "missing_tap_out", "l1-chaotianmen")
    fare_a = run(cq, [up(m_in(T0, "l1-chaotianmen")), up(m_out(T0 + 30 * MIN, "l1-daping"))])[1].amount_fen
    assert d[2].rules == ("metro_distance_fare", "card_discount", "late_upload", "exit_of_charged_journey")
    assert (d[2].amount_fen, d[2].refund) == (fare_a, Refund(700, "cq-metro", "l1-chaotianmen", T0, T0 + 3600))
    assert d[3].penalty is None and d[3].amount_fen > 0
    assert sum(x.net_fen for x in d) == fare_a + d[3].amount_fen  # what the two rides cost
    # Given back once: a second exit of that journey arriving (a gate's duplicate) costs nothing more.
    again = fare(cq, d[3].state, up(m_out(T0 + 25 * MIN, "l1-daping")))
    assert again.refund is None and again.net_fen == 700 and again.rules[0] == "exit_of_charged_journey"
    # An exit at the journey timeout is the timed-out journey's: nothing more, nothing back; after the sweep
    # as the card's next tap, or after another tap.
    _, swept_a = close_open_journey(cq, fare(cq, EMPTY_STATE, up(m_in(T0, "l1-chaotianmen"))).state, T0 + 4 * 3600)
    at_timeout = up(m_out(T0 + cq.rules.journey_timeout_s, "l1-daping"))
    timed_out = fare(cq, swept_a, at_timeout)
    assert (timed_out.net_fen, timed_out.refund, timed_out.rules) == (0, None, ("exit_of_swept_journey",))
    timed_out = fare(cq, fare(cq, swept_a, bus(T0 + 5 * 3600)).state, at_timeout)
    assert (timed_out.net_fen, timed_out.refund, timed_out.rules) == (0, None, ("exit_of_charged_journey",))
    # An online exit gets nothing back (the card's exit was online too: it would have come in order).
    online = fare(cq, swept_a, m_out(T0 + 30 * MIN, "l1-daping"))
    assert (online.net_fen, online.refund) == (0, None)
    # The charged journey remembers the exit that ended it (an earlier exit of it could still arrive).
    [kept] = d[3].state.unpaired
    assert (kept.time, kept.until, kept.pair_station) == (T0, T0 + 30 * MIN, "l1-daping")
    # The same holds after the sweep and another tap: the sweep's journey keeps its entry for its exit.
    entered = fare(cq, EMPTY_STATE, m_in(T0, "l1-chaotianmen")).state
    _, swept = close_open_journey(cq, entered, T0 + 4 * 3600)
    after_bus = fare(cq, swept, bus(T0 + 5 * 3600)).state
    late_exit = fare(cq, after_bus, up(m_out(T0 + 30 * MIN, "l1-daping")))
    assert (late_exit.rules[-1], late_exit.amount_fen, late_exit.net_fen) == ("exit_of_charged_journey", fare_a, fare_a - 700)


def test_a_late_bus_ride_is_priced_on_its_own(cq: FareTable) -> None:
    d = run(cq, [bus(T0), m_in(T0 + 2 * 3600, "l1-chaotianmen"), up(bus(T0 + 3600, "bus-105"))])
    late = d[2]
    # No transfer discount (the rides around it are not known in order), no penalty for the journey
    # still open, the journey and the transfer window unchanged; the day's total counts it.
    assert (late.amount_fen, late.penalty, late.transfer_discount_fen) == (180, None, 0)
    assert late.rules == ("bus_flat_fare", "card_discount", "late_upload")
    assert late.state == dataclasses.replace(d[1].state, day_charged_fen=d[1].state.day_charged_fen + 180)
    # On an earlier local day than the card's: priced the same, no stored total to count it in.
    earlier = fare(cq, late.state, up(bus(T0 - 86400)))
    assert earlier.amount_fen == 180 and earlier.state == late.state


def test_per_ride_limit_of_the_entry_follows_its_journey(cq: FareTable) -> None:
    """A ride code's max_fare_fen is a promise for every ride entered with it: the ride, the penalty
    when it never taps out, charged at the next tap (by whatever credential) or by the sweep."""
    entry = dataclasses.replace(m_in(T0, "l1-chaotianmen"), max_fare_fen=300)
    state = fare(cq, EMPTY_STATE, entry).state
    assert state.journey is not None and state.journey.max_fare_fen == 300
    assert JourneyState.from_json(state.to_json()) == state and state.to_dict()["journey"]["max_fare_fen"] == 300
    long_ride = fare(cq, state, m_out(T0 + 3600, "l1-laijiaqiao"))
    assert (long_ride.amount_fen, long_ride.full_fare_fen) == (300, 600)
    assert long_ride.rules[-1] == "ride_code_max_fare"
    assert close_open_journey(cq, state, T0 + 4 * 3600)[0] == Penalty(300, "cq-metro", "missing_tap_out", "l1-chaotianmen")
    again = fare(cq, state, m_in(T0 + 3600, "l1-daping"))
    assert again.penalty == Penalty(300, "cq-metro", "missing_tap_out", "l1-chaotianmen") and "ride_code_max_fare" in again.rules
    timeout = fare(cq, state, m_out(T0 + 5 * 3600, "l1-daping"))
    assert timeout.penalty == Penalty(300, "cq-metro", "journey_timeout", "l1-chaotianmen")
    # A journey entered without a limit keeps the maximum fare.
    plain = fare(cq, EMPTY_STATE, m_in(T0, "l1-chaotianmen")).state
    assert close_open_journey(cq, plain, T0 + 4 * 3600)[0] == Penalty(700, "cq-metro", "missing_tap_out", "l1-chaotianmen")
    assert "max_fare_fen" not in plain.to_dict()["journey"]
    with pytest.raises(FareInputError, match="max_fare_fen"):
        fare(cq, EMPTY_STATE, dataclasses.replace(m_in(T0, "l1-chaotianmen"), max_fare_fen=-1))


_JOURNEY_STATIONS = ["l1-chaotianmen", "l1-xiaoshizi", "l1-daping", "l1-shapingba", "l2-daping", "l2-liziba"]


@st.composite
def journeys(draw: st.DrawFn) -> list[tuple[Tap, ...]]:
    """1-6 trips one after the other: complete metro journeys, each within the journey timeout, and
    (when drawn) bus rides, all uploaded by gates, each trip's ride code with or without a per-ride limit.
    Five or more journeys arriving crossed fill the card's memory of unpaired taps (UNPAIRED_MAX)."""
    out: list[tuple[Tap, ...]] = []
    t = T0
    buses = draw(st.booleans())
    for _ in range(draw(st.integers(1, 6))):
        t += draw(st.integers(60, 5 * 3600))
        limit = draw(st.sampled_from([None, None, 300, 500]))
        if buses and draw(st.booleans()):
            tap = up(bus(t, draw(st.sampled_from(["bus-105", "bus-261"]))))
            out.append((dataclasses.replace(tap, max_fare_fen=limit),))
            continue
        a, b = draw(st.sampled_from(_JOURNEY_STATIONS)), draw(st.sampled_from(_JOURNEY_STATIONS))
        end = t + draw(st.integers(60, 4 * 3600 - 1))
        out.append(tuple(dataclasses.replace(x, max_fare_fen=limit) for x in (up(m_in(t, a)), up(m_out(end, b)))))
        t = end
    return out


@settings(max_examples=1000, deadline=None)
@given(journeys(), st.randoms(use_true_random=False), st.lists(st.tuples(st.integers(0, 11), st.booleans()), max_size=3))
def test_uploads_in_any_order_charge_each_journey_once(
    trips: list[tuple[Tap, ...]], rnd: Any, sweeps: list[tuple[int, bool]]
) -> None:
    """Nothing twice: whatever order the gates' records arrive in, with sweeps between them, each metro
    journey costs at most the maximum fare once (within its ride code's limit), each bus ride at most
    its card fare; in time order, exactly what it costs online."""
    cq = load_demo_table()
    in_order = run(cq, [tap for trip in trips for tap in trip])
    rides = [d for d in in_order if d.full_fare_fen]
    assert len(rides) == len(trips) and not any(d.penalty for d in in_order)
    taps = [tap for trip in trips for tap in trip]
    rnd.shuffle(taps)
    state, total, seen = EMPTY_STATE, 0, T0
    at = dict(sweeps)  # after the n-th record, a sweep (forced: an end-of-day run) 4 h after the newest ride
    for n, tap in enumerate(taps):
        d = fare(cq, state, tap)
        assert d.total_fen >= 0 and set(d.rules) <= RULE_NAMES
        assert JourneyState.from_json(d.state.to_json()) == d.state
        state, total, seen = d.state, total + d.net_fen, max(seen, tap.time)
        if n in at:
            charged, state = sweep(cq, state, seen + 4 * 3600, force=at[n])
            total += charged
            assert JourneyState.from_json(state.to_json()) == state
    total += sweep(cq, state, T0 + 30 * 86400, force=True)[0]
    most = 0
    for trip in trips:
        limit = cq.cap_fen if trip[0].max_fare_fen is None else min(cq.cap_fen, trip[0].max_fare_fen)
        most += limit if len(trip) == 2 else min(limit, card_price_fen(cq.bus_lines[trip[0].line].fare_fen, 10))
    assert total <= most
    if taps == sorted(taps, key=lambda tap: tap.time) and not sweeps:
        assert total == sum(d.amount_fen for d in rides)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_JOURNEY_STATIONS), st.sampled_from(_JOURNEY_STATIONS), st.integers(60, 4 * 3600 - 1),
            st.sampled_from([None, None, 300, 500]), st.booleans(), st.integers(60, 3 * 86400),
        ),
        min_size=1, max_size=5,
    ),
    st.lists(st.integers(0, 9), max_size=4),
)  # fmt: skip
def test_a_journey_whose_halves_arrive_hours_apart_costs_its_fare(
    trips: list[tuple[str, str, int, int | None, bool, int]], sweeps: list[int]
) -> None:
    """Gates upload a metro journey's two halves in either order and hours apart, with the service's
    sweeps between them: whatever was charged for the missing half meanwhile (the maximum fare, by the
    sweep or by the card's next tap) is given back when the other half comes, so each journey costs its
    fare, as in order. (Journeys one after another; metro to metro has no transfer discount.)"""
    cq = load_demo_table()
    taps: list[Tap] = []
    in_order: list[Tap] = []
    t = T0
    for a, b, length, limit, exit_first, gap in trips:
        entry = dataclasses.replace(up(m_in(t, a)), max_fare_fen=limit)
        exit_ = dataclasses.replace(up(m_out(t + length, b)), max_fare_fen=limit)
        taps += [exit_, entry] if exit_first else [entry, exit_]
        in_order += [entry, exit_]
        t += length + gap
    fares_in_order = sum(d.net_fen for d in run(cq, in_order))
    state, total, seen = EMPTY_STATE, 0, T0
    for n, tap in enumerate(taps):
        d = fare(cq, state, tap)
        state, total, seen = d.state, total + d.net_fen, max(seen, tap.time)
        assert d.refund is None or d.refund.amount_fen <= cq.cap_fen
        if n in sweeps:  # a sweep once the half that came is past the journey timeout
            charged, state = sweep(cq, state, seen + cq.rules.journey_timeout_s)
            total += charged
    assert total == fares_in_order


@settings(max_examples=300, deadline=None)
@given(journeys(), st.randoms(use_true_random=False))
def test_first_due_is_when_the_sweep_first_finds_something_to_do(trips: list[tuple[Tap, ...]], rnd: Any) -> None:
    """The service hands a card to the sweep by `first_due` (an upload that came after the sweep read its
    time): before it, a sweep changes nothing; at it, a sweep charges (or drops) something."""
    cq = load_demo_table()
    taps = [tap for trip in trips for tap in trip]
    rnd.shuffle(taps)
    state = EMPTY_STATE
    for tap in taps:
        state = fare(cq, state, tap).state
        due = first_due(cq, state)
        if due is None:
            assert sweep(cq, state, T0 + 30 * 86400) == (0, state)
            continue
        assert sweep(cq, state, due - 1) == (0, state)
        assert sweep(cq, state, due)[1] != state


def test_first_due_counts_a_held_exit_that_will_be_dropped(cq: FareTable) -> None:
    """A held exit taken after its card stopped (`until`) is dropped, not charged, when due: that is a
    change the sweep must make too, or every later look would find it due again."""
    held = UnpairedTap("out", "l1-daping", T0, "cq-metro", charged=False, until=T0 - 60)
    state = JourneyState(None, None, None, 0, unpaired=(held,))
    due = first_due(cq, state)
    assert due == T0 + cq.rules.journey_timeout_s
    assert sweep(cq, state, due - 1) == (0, state)
    charged, after = sweep(cq, state, due)
    assert charged == 0 and after.unpaired == () and first_due(cq, after) is None


def test_an_earlier_exit_arriving_late_takes_its_journey_back(cq: FareTable) -> None:
    """A journey charged the maximum fare keeps the exit that ended it. If an earlier exit that fits
    arrives later from a gate, it is the journey's: the exit it displaces belonged to another journey
    and is charged as an exit without entry, until its own entry arrives."""
    a_in, a_out = up(m_in(T0, "l1-chaotianmen")), up(m_out(T0 + 30 * MIN, "l1-daping"))
    b_in, b_out = up(m_in(T0 + 16000, "l2-daping")), up(m_out(T0 + 16600, "l2-liziba"))
    # B's exit comes first and times A out; A's exit, then B's entry arrive later.
    d = run(cq, [a_in, b_out, a_out, b_in])
    ride = ("metro_distance_fare", "card_discount", "late_upload")
    assert [x.rules for x in d] == [
        ("metro_entry",),
        ("journey_timeout",),
        (*ride, "exit_of_charged_journey", "missing_tap_in"),
        (*ride, "entry_of_charged_exit"),
    ]
    # A's exit gives A's timeout back and pays A's ride; B's exit, displaced, is charged the maximum fare,
    # which B's entry gives back, paying B's ride: each journey costs its fare, as in order.
    assert d[2].penalty == Penalty(700, "cq-metro", "missing_tap_in", "l2-liziba")
    # (A's timeout dated at B's exit, which charged it; B's exit's penalty at A's exit, which displaced it.)
    assert d[2].refund == Refund(700, "cq-metro", "l1-chaotianmen", T0, T0 + 16600)
    assert d[3].refund == Refund(700, "cq-metro", "l2-liziba", T0 + 16600, T0 + 30 * MIN)
    fare_a, fare_b = run(cq, [a_in, a_out])[1].amount_fen, run(cq, [b_in, b_out])[1].amount_fen
    assert (d[2].amount_fen, d[3].amount_fen) == (fare_a, fare_b)
    assert sum(x.net_fen for x in d) == fare_a + fare_b
    # The same with the sweep charging A and B's exit taken for A's (past A's timeout: nothing back).
    _, swept = close_open_journey(cq, fare(cq, EMPTY_STATE, a_in).state, T0 + 15000)
    d = run(cq, [b_out, a_out, b_in], state=swept)
    assert [x.net_fen for x in d] == [0, fare_a, fare_b - 700] and d[0].rules == ("exit_of_swept_journey",)
    assert d[1].rules == (*ride, "exit_of_charged_journey", "missing_tap_in")
    # An exit uploaded after the sweep but within the timeout: the sweep could not know it; given back.
    d = run(cq, [a_out], state=swept)
    assert (d[0].rules, d[0].amount_fen, d[0].refund) == (
        ("metro_distance_fare", "card_discount", "exit_of_swept_journey"), fare_a, Refund(700, "cq-metro", "l1-chaotianmen", T0, T0 + cq.rules.journey_timeout_s)
    )  # fmt: skip
    assert d[0].state.swept is None and d[0].state.unpaired[0].charged_fen is None
    # An online exit after the tap that charged a journey is not that journey's exit.
    d = run(cq, [m_in(T0, "l1-chaotianmen"), m_in(T0 + 600, "l2-daping"), m_out(T0 + 1200, "l2-liziba")])
    assert fare(cq, d[2].state, m_out(T0 + 2000, "l1-daping")).rules == ("missing_tap_in",)
    # Nor after a tap that came after the sweep (an end-of-day run may close a journey within its timeout).
    _, swept = close_open_journey(cq, fare(cq, EMPTY_STATE, a_in).state, T0 + 60, force=True)
    after_bus = fare(cq, swept, bus(T0 + 120)).state
    assert fare(cq, after_bus, m_out(T0 + 600, "l1-daping")).rules == ("missing_tap_in",)
    late_exit = fare(cq, after_bus, up(m_out(T0 + 100, "l1-daping")))
    assert (late_exit.rules[-1], late_exit.refund) == ("exit_of_charged_journey", Refund(
        700, "cq-metro", "l1-chaotianmen", T0, T0 + cq.rules.journey_timeout_s  # the sweep's row: at the timeout
    ))


def test_every_order_of_two_journeys(cq: FareTable) -> None:
    """The four records of two journeys in each of their 24 orders (the property above, exhaustively).
    When the two journeys' records do not interleave, whichever half of each comes first (a held exit),
    the card pays exactly what the rides cost in order."""
    trips = [
        (up(m_in(T0, "l1-chaotianmen")), up(m_out(T0 + 30 * MIN, "l1-daping"))),
        (up(m_in(T0 + 3600, "l2-daping")), up(m_out(T0 + 3600 + 20 * MIN, "l2-liziba"))),
    ]
    fares_in_order = sum(d.amount_fen for d in run(cq, [tap for trip in trips for tap in trip]))
    for order in itertools.permutations([tap for trip in trips for tap in trip]):
        decisions = run(cq, list(order))
        total = sum(d.net_fen for d in decisions) + sweep(cq, decisions[-1].state, T0 + 86400, force=True)[0]
        assert fares_in_order <= total <= 2 * cq.cap_fen, [tap.time - T0 for tap in order]
        if {order[0], order[1]} in ({*trips[0]}, {*trips[1]}):  # one journey's records, then the other's
            assert total == fares_in_order, [tap.time - T0 for tap in order]


@pytest.mark.parametrize(
    ("tap", "message"),
    [
        (Tap(T0, "bus", "bus-999"), "unknown bus line 'bus-999'"),
        (Tap(T0, "bus", "bus-105", direction="in"), "direction 'single'"),
        (Tap(T0, "metro", "L1", "l1-nowhere", "in"), "unknown metro station 'l1-nowhere'"),
        (Tap(T0, "metro", "L2", "l1-shapingba", "in"), "does not serve station"),
        (Tap(T0, "metro", "L1", None, "in"), "needs a station"),
        (Tap(T0, "metro", "L1", "l1-shapingba", "single"), "'in' or 'out'"),
    ],
)
def test_taps_that_do_not_fit_the_table_are_refused(cq: FareTable, tap: Tap, message: str) -> None:
    with pytest.raises(FareInputError, match=message):
        fare(cq, EMPTY_STATE, tap)


def test_a_metro_tap_may_name_any_line_of_an_interchange(cq: FareTable) -> None:
    d = run(cq, [Tap(T0, "metro", "L3", "l1-lianglukou", "in"), m_out(T0 + 600, "l3-guanyinqiao")])
    assert d[1].distance_m == 8700 - 5300


def test_state_json_layout(cq: FareTable) -> None:
    d = run(cq, [bus(T0), m_in(T0 + 600, "l1-xiaoshizi")])
    assert json.loads(d[1].state.to_json()) == {
        "v": 1,
        "journey": {"station": "l1-xiaoshizi", "time": T0 + 600, "operator": "cq-metro"},
        "window": {"start": T0, "first_fare_fen": 180, "mode": "bus", "discount_used": False},
        "day": "2026-11-02",
        "day_charged_fen": 180,
    }
    assert EMPTY_STATE.to_dict() == {
        "v": 1,
        "journey": None,
        "window": None,
        "day": None,
        "day_charged_fen": 0,
    }
    assert JourneyState.from_json(d[1].state.to_json()) == d[1].state
    # Optional keys of the same version, stored only when set: an entry's limit, unpaired taps.
    late = run(
        cq, [dataclasses.replace(up(m_in(T0, "l1-daping")), max_fare_fen=300), up(m_out(T0 - 60, "l1-xiaoshizi"))]
    )
    assert json.loads(late[1].state.to_json())["unpaired"] == [
        {"direction": "out", "station": "l1-xiaoshizi", "time": T0 - 60, "operator": "cq-metro", "charged": False},
    ]  # a held exit
    assert json.loads(late[0].state.to_json())["journey"]["max_fare_fen"] == 300
    assert JourneyState.from_json(late[1].state.to_json()) == late[1].state


_UNPAIRED = {"direction": "out", "station": "l1-daping", "time": T0, "operator": "cq-metro", "charged": True}


def test_a_penalty_stored_without_its_rows_time_is_never_given_back(cq: FareTable) -> None:
    """A charged exit stored with its amount but not its journal row's time (as written for a day before
    the time was kept) loads as a penalty of unknown row: its entry costs nothing more, nothing back."""
    data = json.loads(fare(cq, EMPTY_STATE, m_out(T0, "l1-daping")).state.to_json())
    del data["unpaired"][0]["charged_at"]
    state = JourneyState.from_dict(data)
    assert (state.unpaired[0].charged_fen, state.unpaired[0].charged_at) == (None, None)
    entry = fare(cq, state, up(m_in(T0 - 600, "l1-chaotianmen")))
    assert (entry.net_fen, entry.refund, entry.rules) == (0, None, ("entry_of_charged_exit",))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("day"),
        lambda s: s.update(v=2),
        lambda s: s.update(day_charged_fen=-1),
        lambda s: s.update(day_charged_fen=1.5),
        lambda s: s.update(day="2026-13-01"),
        lambda s: s["window"].update(mode="tram"),
        lambda s: s["window"].update(discount_used="no"),
        lambda s: s["journey"].update(time="1"),
        lambda s: s["journey"].pop("operator"),
        lambda s: s.update(swept={"station": "l1-xiaoshizi"}),
        lambda s: s.update(swept="l1-xiaoshizi"),
        lambda s: s.update(sweep=None),
        lambda s: s["journey"].update(max_fare_fen=-1),
        lambda s: s["journey"].update(max_fare_fen="300"),
        lambda s: s.update(unpaired=[]),
        lambda s: s.update(unpaired={"direction": "out"}),
        lambda s: s.update(unpaired=[_UNPAIRED | {"direction": "up"}]),
        lambda s: s.update(unpaired=[_UNPAIRED | {"charged": 1}]),
        lambda s: s.update(unpaired=[{k: v for k, v in _UNPAIRED.items() if k != "time"}]),
        lambda s: s.update(unpaired=[_UNPAIRED] * 5),
        lambda s: s.update(unpaired=[_UNPAIRED | {"until": T0 + 60}]),  # a pairing on an exit
        lambda s: s.update(unpaired=[_UNPAIRED | {"direction": "in", "pair_station": "l1-daping"}]),  # no until
        lambda s: s.update(unpaired=[_UNPAIRED | {"direction": "in", "until": T0, "pair_max_fare_fen": 1}]),
        lambda s: s.update(unpaired=[_UNPAIRED | {"direction": "in", "charged": False, "until": T0}]),
        lambda s: s.update(unpaired=[_UNPAIRED | {"direction": "in", "until": "soon"}]),
        lambda s: s.update(unpaired=[_UNPAIRED | {"charged": False, "charged_fen": 700, "charged_at": T0}]),
        lambda s: s.update(unpaired=[_UNPAIRED | {"charged_fen": -1, "charged_at": T0}]),
        lambda s: s.update(unpaired=[_UNPAIRED | {"charged_fen": 700, "charged_at": "T0"}]),
    ],
)
def test_malformed_stored_states_are_refused(
    cq: FareTable, mutate: Callable[[dict[str, Any]], object]
) -> None:
    d = run(cq, [bus(T0), m_in(T0 + 600, "l1-xiaoshizi")])
    data = json.loads(d[1].state.to_json())
    mutate(data)
    with pytest.raises(FareInputError):
        JourneyState.from_dict(data)


# --------------------------------------------------------------------------------------------------
# The loader refuses broken tables


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def f(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return f


def _del(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def f(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]

    return f


def _swap_bands(d: dict[str, Any]) -> None:
    b = d["metro"]["bands"]
    b[1], b[2] = b[2], b[1]


def _append(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def f(d: dict[str, Any]) -> None:
        for k in path:
            d = d[k]
        d.append(value)  # type: ignore[attr-defined]

    return f


def _disconnect(d: dict[str, Any]) -> None:
    for s in d["metro"]["stations"]:
        if s["line"] == "L3":
            s.pop("interchange", None)
    d["metro"]["stations"] = [
        s
        for s in d["metro"]["stations"]
        if not (s["line"] != "L3" and s.get("interchange") in ("lianglukou", "niujiaotuo"))
    ]
    for line in d["metro"]["lines"]:
        if line["id"] != "L3":
            line["stations"] = [x for x in line["stations"] if not x.endswith(("lianglukou", "niujiaotuo"))]


BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    (
        "negative fare",
        _set(["bus_lines", 0, "fare_fen"], -100),
        "bus_lines[0].fare_fen",
        "must be >= 0, got -100",
    ),
    ("float fare", _set(["bus_lines", 1, "fare_fen"], 2.0), "bus_lines[1].fare_fen", "got the float 2.0"),
    (
        "boolean fare",
        _set(["bus_lines", 1, "fare_fen"], True),
        "bus_lines[1].fare_fen",
        "got the boolean true",
    ),
    ("float band fare", _set(["metro", "bands", 0, "fare_fen"], 1.5), "metro.bands[0].fare_fen", "float 1.5"),
    ("float cap", _set(["metro", "cap_fen"], 700.0), "metro.cap_fen", "float"),
    (
        "unknown station in a line",
        _append(["metro", "lines", 1, "stations"], "l2-nowhere"),
        "metro.lines[1].stations[18]",
        "unknown station 'l2-nowhere'",
    ),
    ("bands not ascending", _swap_bands, "metro.bands[2].up_to_km", "bands must be strictly ascending"),
    (
        "band fares decreasing",
        _set(["metro", "bands", 1, "fare_fen"], 150),
        "metro.bands[1].fare_fen",
        "must not decrease",
    ),
    (
        "band above cap",
        _set(["metro", "cap_fen"], 500),
        "metro.bands[4].fare_fen",
        "exceeds metro.cap_fen 500",
    ),
    (
        "duplicate operator",
        _set(["operators", 1, "id"], "cq-bus"),
        "operators[1].id",
        "duplicate operator id 'cq-bus'",
    ),
    (  # a clearing file could not carry its money (protocols/clearing.md: 1-16 x [A-Za-z0-9_-])
        "operator id not for clearing",
        _set(["operators", 1, "id"], "cq.rail-transit-group"),
        "operators[1].id",
        "must be 1-16 characters of A-Z a-z 0-9 _ - (as in clearing files), got 'cq.rail-transit-group'",
    ),
    (
        "duplicate bus line",
        _set(["bus_lines", 3, "id"], "bus-105"),
        "bus_lines[3].id",
        "duplicate line id 'bus-105'",
    ),
    (
        "metro line id = bus id",
        _set(["metro", "lines", 0, "id"], "bus-105"),
        "metro.lines[0].id",
        "duplicate line id 'bus-105'",
    ),
    (
        "duplicate metro line",
        _set(["metro", "lines", 2, "id"], "L1"),
        "metro.lines[2].id",
        "duplicate line id 'L1'",
    ),
    (
        "duplicate station",
        _set(["metro", "stations", 5, "id"], "l1-chaotianmen"),
        "metro.stations[5].id",
        "duplicate station id",
    ),
    (
        "unknown operator",
        _set(["bus_lines", 2, "operator"], "cq-tram"),
        "bus_lines[2].operator",
        "unknown operator 'cq-tram'",
    ),
    (
        "unknown metro operator",
        _set(["metro", "lines", 2, "operator"], "x"),
        "metro.lines[2].operator",
        "unknown operator 'x'",
    ),
    ("missing version", _del(["version"]), "version", "missing required key"),
    ("missing cap", _del(["metro", "cap_fen"]), "metro.cap_fen", "missing required key"),
    (
        "missing line operator",
        _del(["bus_lines", 2, "operator"]),
        "bus_lines[2].operator",
        "missing required key",
    ),
    ("missing rule", _del(["rules", "transfer_window_s"]), "rules.transfer_window_s", "missing required key"),
    (
        "missing station km",
        _del(["metro", "stations", 3, "km"]),
        "metro.stations[3].km",
        "missing required key",
    ),
    ("unknown key (typo)", _set(["bus_lines", 0, "fare"], 200), "bus_lines[0].fare", "unknown key"),
    ("empty version", _set(["version"], " "), "version", "non-empty string"),
    ("date as string", _set(["effective_from"], "2026-11-01"), "effective_from", "TOML local date"),
    (
        "km not increasing",
        _set(["metro", "stations", 3, "km"], 1.0),
        "metro.lines[0].stations[3]",
        "km must increase",
    ),
    ("negative km", _set(["metro", "stations", 0, "km"], -1), "metro.stations[0].km", "from 0 to 10000"),
    (
        "station on the wrong line",
        _set(["metro", "stations", 3, "line"], "L2"),
        "metro.lines",
        "declares line 'L2'",
    ),
    (
        "station on an unknown line",
        _set(["metro", "stations", 3, "line"], "L9"),
        "metro.stations[3].line",
        "unknown metro line 'L9'",
    ),
    (
        "lonely interchange",
        _set(["metro", "stations", 0, "interchange"], "nowhere"),
        "metro.stations[0].interchange",
        "only one station",
    ),
    ("disconnected network", _disconnect, "metro.stations", "not connected"),
    (
        "bad transfer pair",
        _set(["rules", "transfer_pairs"], ["bus-tram"]),
        "rules.transfer_pairs[0]",
        "'mode-mode'",
    ),
    (
        "discount over 100 %",
        _set(["rules", "card_discount_percent"], 110),
        "rules.card_discount_percent",
        "<= 100",
    ),
    ("zero daily cap", _set(["rules", "daily_cap_fen"], 0), "rules.daily_cap_fen", ">= 1"),
    ("no operators", _set(["operators"], []), "operators", "at least one operator"),
    (
        "station id too long for a validator record",
        _set(["metro", "stations", 0, "id"], "l1-chaotianmen-north"),
        "metro.stations[0].id",
        "1-16 characters",
    ),
    ("line id with a space", _set(["bus_lines", 0, "id"], "bus 105"), "bus_lines[0].id", "1-16 characters"),
]


@pytest.mark.parametrize(("case", "mutate", "path", "problem"), BROKEN, ids=[b[0] for b in BROKEN])
def test_loader_refuses_broken_tables(
    case: str, mutate: Callable[[dict[str, Any]], None], path: str, problem: str
) -> None:
    data = demo_dict()
    parse_table(copy.deepcopy(data), source="ok.toml")  # the unmutated table loads
    mutate(data)
    with pytest.raises(FareTableError) as info:
        parse_table(data, source="broken.toml")
    e = info.value
    assert isinstance(e, ValueError)
    assert e.file == "broken.toml" and e.path.startswith(path) and problem in e.problem, str(e)
    assert str(e) == f"broken.toml: {e.path}: {e.problem}"


def test_loader_names_the_file(tmp_path: Path) -> None:
    text = DEMO_TABLE_PATH.read_text(encoding="utf-8").replace("fare_fen = 100", "fare_fen = 1.0", 1)
    bad = tmp_path / "cq-2027-01.toml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(
        FareTableError, match="^" + re.escape(f"{bad}: bus_lines[2].fare_fen: ") + ".*float 1.0"
    ):
        load_table(bad)
    bad.write_text("version = \n", encoding="utf-8")
    with pytest.raises(FareTableError, match="^" + re.escape(f"{bad}: (syntax): invalid TOML")):
        load_table(bad)
    with pytest.raises(FareTableError, match="cannot read"):
        load_table(tmp_path / "missing.toml")


# --------------------------------------------------------------------------------------------------
# Random networks


@dataclass
class Net:
    data: dict[str, Any]
    table: FareTable
    lines: dict[str, list[str]]  # metro line -> station ids
    oracle: dict[tuple[str, str], int]  # Floyd–Warshall over stations, metres


def floyd(data: dict[str, Any]) -> dict[tuple[str, str], int]:
    stations = {s["id"]: s for s in data["metro"]["stations"]}
    ids = list(stations)
    inf = 10**12
    d = {(a, b): (0 if a == b else inf) for a in ids for b in ids}
    for line in data["metro"]["lines"]:
        for a, b in zip(line["stations"], line["stations"][1:], strict=False):
            w = round(stations[b]["km"] * 1000) - round(stations[a]["km"] * 1000)
            d[a, b] = d[b, a] = min(d[a, b], w)
    for a in ids:
        for b in ids:
            ga, gb = stations[a].get("interchange"), stations[b].get("interchange")
            if ga is not None and ga == gb:
                d[a, b] = 0
    for k in ids:
        for i in ids:
            dik = d[i, k]
            for j in ids:
                if dik + d[k, j] < d[i, j]:
                    d[i, j] = dik + d[k, j]
    return d


@st.composite
def networks(draw: st.DrawFn) -> Net:
    n_lines = draw(st.integers(1, 4))
    lines: dict[str, list[str]] = {}
    stations: list[dict[str, Any]] = []
    for li in range(n_lines):
        lid = f"M{li}"
        km = draw(st.integers(0, 2000))
        ids = []
        for si in range(draw(st.integers(2, 7))):
            if si:
                km += draw(st.integers(1, 4000))
            sid = f"m{li}s{si}"
            ids.append(sid)
            stations.append({"id": sid, "name": f"S{li}.{si}", "line": lid, "km": km / 1000})
        lines[lid] = ids
    by_id = {s["id"]: s for s in stations}
    group_lines: dict[str, set[str]] = {}

    def join(a: str, b: str) -> None:
        sa, sb = by_id[a], by_id[b]
        if "interchange" in sa and "interchange" in sb:
            return
        if "interchange" in sa:
            sa, sb = sb, sa
        gid = sb.get("interchange") or f"x-{sb['id']}"
        members = group_lines.setdefault(gid, {sb["line"]})
        if sa["line"] in members:
            return
        sa["interchange"] = sb["interchange"] = gid
        members.add(sa["line"])

    for li in range(1, n_lines):  # a spanning tree of interchanges keeps the network connected
        a = draw(st.sampled_from(lines[f"M{li}"]))
        b = draw(st.sampled_from(lines[f"M{draw(st.integers(0, li - 1))}"]))
        if "interchange" in by_id[a]:
            continue  # already linked to an earlier line
        join(a, b)
    for _ in range(draw(st.integers(0, 3))):  # extra interchanges make cycles (real shortest paths)
        la, lb = draw(st.sampled_from(sorted(lines))), draw(st.sampled_from(sorted(lines)))
        if la != lb:
            join(draw(st.sampled_from(lines[la])), draw(st.sampled_from(lines[lb])))
    n_bands = draw(st.integers(1, 5))
    limits = sorted(draw(st.sets(st.integers(1, 30_000), min_size=n_bands, max_size=n_bands)))
    fares = sorted(draw(st.lists(st.integers(0, 900), min_size=n_bands, max_size=n_bands)))
    cap = draw(st.integers(fares[-1], 1200)) or 1
    rules: dict[str, Any] = {
        "card_discount_percent": draw(st.integers(0, 100)),
        "transfer_window_s": draw(st.integers(60, 7200)),
        "transfer_discount_max_fen": draw(st.integers(0, 500)),
        "transfer_pairs": draw(
            st.lists(st.sampled_from(["bus-bus", "bus-metro", "metro-bus", "metro-metro"]), unique=True)
        ),
        "journey_timeout_s": draw(st.integers(600, 20_000)),
        "utc_offset_minutes": 480,
        "elderly_annual_quota": 1200,
        "elderly_extra_quota": 300,
    }
    if draw(st.booleans()):
        rules["daily_cap_fen"] = draw(st.integers(1, 3000))
    data: dict[str, Any] = {
        "version": "rand-1",
        "effective_from": dt.date(2026, 1, 1),
        "rules": rules,
        "operators": [
            {"id": "bus-co", "name": "Bus"},
            {"id": "metro-a", "name": "A"},
            {"id": "metro-b", "name": "B"},
        ],
        "bus_lines": [
            {"id": f"b{i}", "name": f"B{i}", "operator": "bus-co", "fare_fen": draw(st.integers(0, 500))}
            for i in range(draw(st.integers(1, 3)))
        ],
        "metro": {
            "cap_fen": cap,
            "bands": [{"up_to_km": lim / 1000, "fare_fen": f} for lim, f in zip(limits, fares, strict=True)],
            "lines": [
                {
                    "id": lid,
                    "name": lid,
                    "operator": draw(st.sampled_from(["metro-a", "metro-b"])),
                    "stations": ids,
                }
                for lid, ids in lines.items()
            ],
            "stations": stations,
        },
    }
    table = parse_table(copy.deepcopy(data), source="random.toml")
    return Net(data, table, lines, floyd(data))


@settings(max_examples=150, deadline=None)
@given(networks())
def test_random_networks_load_and_match_the_shortest_path_oracle(net: Net) -> None:
    t = net.table
    for (a, b), dist in net.oracle.items():
        assert metro_distance_m(t, a, b) == dist
        f = metro_fare_fen(t, a, b)
        assert f == band_fare_fen(t, dist) <= t.cap_fen
        assert isinstance(f, int)
        expected = next((fen for lim, fen in t.bands if dist <= lim), t.cap_fen)
        assert f == expected


@dataclass
class Action:
    gap_s: int
    kind: str  # bus | in | out
    target: str  # bus line or station


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Net, Concession, list[Action]]:
    net = draw(networks())
    bus_ids = [b["id"] for b in net.data["bus_lines"]]
    all_stations = [s for ids in net.lines.values() for s in ids]
    kind_st = st.sampled_from(["elderly", "none", "none", "disabled_free", "disabled_half"])
    concession = Concession(draw(kind_st), draw(st.integers(0, 4)))  # type: ignore[arg-type]
    actions = []
    for _ in range(draw(st.integers(1, 25))):
        gap = draw(st.one_of(st.integers(0, 5400), st.integers(0, 3 * 86400)))
        kind = draw(st.sampled_from(["bus", "in", "out", "in", "out"]))
        target = draw(st.sampled_from(bus_ids if kind == "bus" else all_stations))
        actions.append(Action(gap, kind, target))
    return net, concession, actions


@dataclass
class Ride:
    start: int
    end: int
    mode: str
    amount: int
    discount: int


def concession_price(t: FareTable, c: Concession, remaining: int, base: int) -> int:
    if c.kind == "disabled_free" or (c.kind == "elderly" and remaining > 0):
        return 0
    if c.kind == "disabled_half":
        return (base + 1) // 2
    return math.floor(Fraction(base * (100 - t.rules.card_discount_percent), 100) + Fraction(1, 2))


def action_tap(act: Action, now: int, stations: dict[str, Any]) -> Tap:
    """The tap a generated action makes at `now`."""
    if act.kind == "bus":
        return Tap(now, "bus", act.target)
    return Tap(now, "metro", stations[act.target]["line"], act.target, "in" if act.kind == "in" else "out")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1_700_000_000, 1_900_000_000))
def test_random_tap_sequences_keep_every_invariant(
    scenario: tuple[Net, Concession, list[Action]], start: int
) -> None:
    net, concession, actions = scenario
    t, r = net.table, net.table.rules
    stations = {s["id"]: s for s in net.data["metro"]["stations"]}
    state = EMPTY_STATE
    now = start
    remaining = concession.elderly_rides_remaining
    open_entry: tuple[str, int] | None = None  # the model's own view of the open journey
    # Unpaired metro taps: the entries of journeys charged for a missing exit, the exits without entry
    # (at most 4 within 7 days; over 4, the exits go first, then the oldest). Online taps come in order:
    # an exit never pairs with a journey charged before it (its rider had left before the tap that
    # charged it).
    unpaired: list[tuple[str, int]] = []

    def keep(*tap: tuple[str, int]) -> None:
        recent = [u for u in (*unpaired, *tap) if now - u[1] < 7 * 86400]
        # Taps of the same second stay in the order they came, unless some had to go (the engine's order).
        kept = sorted(recent, key=lambda u: (u[0] == "in", u[1]))[-4:] if len(recent) > 4 else recent
        unpaired[:] = sorted(kept, key=lambda u: u[1])
    rides: list[Ride] = []
    per_day: dict[int, int] = {}
    for act in actions:
        now += act.gap_s
        tap = action_tap(act, now, stations)
        c = Concession(concession.kind, remaining)
        d = fare(t, state, tap, c)

        # Integer fen everywhere, never negative, the card/concession never increases a fare.
        for v in (d.amount_fen, d.full_fare_fen, d.transfer_discount_fen, d.state.day_charged_fen):
            assert type(v) is int and v >= 0
        assert d.amount_fen <= d.full_fare_fen
        assert set(d.rules) <= RULE_NAMES
        assert d.total_fen == d.amount_fen + (d.penalty.amount_fen if d.penalty else 0)
        if d.penalty is not None:
            assert type(d.penalty.amount_fen) is int and d.penalty.amount_fen == t.cap_fen

        # Journey model: which taps price a ride, and which penalty each broken journey gets.
        ride_start: int | None = None
        expected_penalty = None
        if act.kind == "bus":
            if open_entry is not None:
                expected_penalty = "missing_tap_out"
                keep(("in", open_entry[1]))
            open_entry = None
            ride_start = now
            assert d.full_fare_fen == t.bus_lines[act.target].fare_fen
            assert d.operator == "bus-co"
        elif act.kind == "in":
            if open_entry is not None:
                expected_penalty = "missing_tap_out"
                keep(("in", open_entry[1]))
            open_entry = (act.target, now)
            assert (d.amount_fen, d.full_fare_fen) == (0, 0)
        elif open_entry is None:
            expected_penalty = "missing_tap_in"
            keep(("out", now))
        elif now - open_entry[1] >= r.journey_timeout_s:
            expected_penalty = "journey_timeout"
            keep(("in", open_entry[1]))
            open_entry = None
        else:
            entry, ride_start = open_entry
            dist = net.oracle[entry, act.target]
            assert d.distance_m == dist
            assert d.full_fare_fen == next((f for lim, f in t.bands if dist <= lim), t.cap_fen) <= t.cap_fen
            open_entry = None
        assert (d.penalty.reason if d.penalty else None) == expected_penalty
        assert "exit_of_charged_journey" not in d.rules
        assert [(u.direction, u.time) for u in d.state.unpaired] == unpaired
        assert (d.state.journey.station if d.state.journey else None) == (
            open_entry[0] if open_entry else None
        )

        if ride_start is None:
            assert (d.amount_fen, d.transfer_discount_fen, d.quota_ride_consumed) == (0, 0, False)
        else:
            # Concession and card discount, then the transfer discount, then the daily cap.
            price = concession_price(t, c, remaining, d.full_fare_fen)
            assert d.amount_fen + d.transfer_discount_fen <= price
            if "daily_cap" not in d.rules:
                assert d.amount_fen + d.transfer_discount_fen == price
            # Elderly with quota left: free, and exactly one quota ride consumed.
            assert d.quota_ride_consumed == (c.kind == "elderly" and remaining > 0)
            if d.quota_ride_consumed:
                assert d.amount_fen == 0
                remaining -= 1
            # Transfer: only from the previous ride, within the window, for an allowed pair, bounded,
            # and never twice in a row (one discount per window).
            if d.transfer_discount_fen:
                assert rides, "a transfer discount needs a previous ride"
                prev = rides[-1]
                assert ride_start - prev.end < r.transfer_window_s
                assert (prev.mode, tap.mode) in r.transfer_pairs
                assert d.transfer_discount_fen <= min(prev.amount, r.transfer_discount_max_fen)
                assert prev.discount == 0
                assert "transfer_discount" in d.rules
            rides.append(Ride(ride_start, now, tap.mode, d.amount_fen, d.transfer_discount_fen))
            local = (now + 8 * 3600) // 86400
            per_day[local] = per_day.get(local, 0) + d.amount_fen
            if r.daily_cap_fen is not None:
                assert per_day[local] <= r.daily_cap_fen
            assert d.state.day_charged_fen == per_day[local]

        # The state survives its storage form.
        assert JourneyState.from_dict(json.loads(json.dumps(d.state.to_dict()))) == d.state
        assert JourneyState.from_json(d.state.to_json()) == d.state
        state = d.state

    penalty, closed = close_open_journey(t, state, now, force=True)
    assert closed.journey is None
    assert (penalty is not None) == (open_entry is not None) == (closed.swept is not None)
    if penalty is not None:
        assert penalty.amount_fen == t.cap_fen and penalty.reason == "missing_tap_out"
        # The journey's exit, if it comes, costs nothing more than what the sweep charged.
        station = next(iter(stations))
        exit_ = fare(t, closed, Tap(now + 60, "metro", stations[station]["line"], station, "out"), concession)
        assert exit_.total_fen == 0 and exit_.penalty is None


def big_network(n_lines: int = 12, per_line: int = 30) -> dict[str, Any]:
    """A deterministic grid-like network: every line crosses the next two (n_lines * per_line stations)."""
    stations: list[dict[str, Any]] = []
    lines = []
    for li in range(n_lines):
        ids = [f"g{li}-{si}" for si in range(per_line)]
        lines.append({"id": f"G{li}", "name": f"G{li}", "operator": "m", "stations": ids})
        for si, sid in enumerate(ids):
            stations.append({"id": sid, "name": sid, "line": f"G{li}", "km": si * 1.2 + (li % 3) * 0.1})
    by_id = {s["id"]: s for s in stations}
    for li in range(n_lines - 1):
        for step, si in ((1, (li * 7) % per_line), (2, (li * 11 + 5) % per_line)):
            lj = li + step
            if lj >= n_lines:
                continue
            a, b = by_id[f"g{li}-{si}"], by_id[f"g{lj}-{(si + 13) % per_line}"]
            if "interchange" not in a and "interchange" not in b:
                a["interchange"] = b["interchange"] = f"x{li}-{lj}"
    data = demo_dict()
    data["operators"].append({"id": "m", "name": "M"})
    data["metro"]["lines"] = lines
    data["metro"]["stations"] = stations
    return data


def test_a_network_of_hundreds_of_stations_loads() -> None:
    table = parse_table(big_network(), source="big.toml")
    assert len(table.stations) == 360
    n = len(table.place_lines)
    assert all(
        table.distance_m[i][j] == table.distance_m[j][i] >= 0 for i in range(n) for j in range(0, n, 17)
    )
    d = run(table, [Tap(T0, "metro", "G0", "g0-0", "in"), Tap(T0 + 3000, "metro", "G11", "g11-29", "out")])
    assert d[1].full_fare_fen == band_fare_fen(table, d[1].distance_m or 0)


def _no_limits(state: JourneyState) -> JourneyState:
    """`state` as if no tap had carried a per-ride limit."""
    j = state.journey
    return dataclasses.replace(
        state,
        journey=None if j is None else dataclasses.replace(j, max_fare_fen=None),
        unpaired=tuple(
            dataclasses.replace(u, max_fare_fen=None, pair_max_fare_fen=None, charged_fen=None)
            for u in state.unpaired
        ),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1_700_000_000, 1_900_000_000), st.integers(0, 1_500))
def test_a_ride_code_limit_caps_each_ride_and_nothing_else(
    scenario: tuple[Net, Concession, list[Action]], start: int, max_fare: int
) -> None:
    net, concession, actions = scenario
    t = net.table
    stations = {s["id"]: s for s in net.data["metro"]["stations"]}
    state, now = EMPTY_STATE, start
    for act in actions:
        now += act.gap_s
        tap = action_tap(act, now, stations)
        d = fare(t, state, tap, concession)
        capped = fare(t, state, dataclasses.replace(tap, max_fare_fen=max_fare), concession)
        penalty = d.penalty.amount_fen if d.penalty else 0
        capped_penalty = capped.penalty.amount_fen if capped.penalty else 0
        # Each ride (the one priced now, the broken one before it) costs at most the limit, and exactly
        # what it cost without the limit when that was within it; nothing else about the decision changes
        # but the entry's journey, which carries the limit on.
        assert capped.amount_fen == min(d.amount_fen, max_fare)
        assert capped_penalty == min(penalty, max_fare)
        assert (capped.penalty is None) == (d.penalty is None)
        assert 0 <= capped.total_fen <= d.total_fen
        assert ("ride_code_max_fare" in capped.rules) == (d.amount_fen > max_fare or penalty > max_fare)
        assert set(capped.rules) <= RULE_NAMES
        assert (_no_limits(capped.state), capped.operator, capped.full_fare_fen) == (
            _no_limits(d.state), d.operator, d.full_fare_fen
        )
        if act.kind == "in":
            assert capped.state.journey is not None and capped.state.journey.max_fare_fen == max_fare
        # Entered with the limit, the journey's penalty, whoever charges it, is within it too.
        if act.kind == "in":
            swept, _ = close_open_journey(t, capped.state, now, force=True)
            assert swept is not None and swept.amount_fen == min(t.cap_fen, max_fare)
        state = d.state
