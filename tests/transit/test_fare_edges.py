"""Edges of the fare engine (docs/fares.md) that the other fare tests let a one-token change of the code
pass unnoticed: the transfer window's boundaries, the daily cap across midnight, which operator a metro
fare and its penalties are credited to (with two metro operators), the pairing of late uploads, the
order in which a full memory of unpaired taps drops them; and a property test of online taps against an
exact model of the documented rules. Each test's docstring names the change it catches.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardsvc.flows.actor import Actor
from cardsvc.transit import concessions, fares
from cardsvc.transit.fares import (
    EMPTY_STATE,
    Concession,
    FareTable,
    Penalty,
    charge_held_exits,
    fare,
    parse_table,
)
from tests.helpers import ServiceHarness
from tests.transit.test_concessions import EXTRA, QUOTA, TABLE, bus_tap, rider, url, years_ago
from tests.transit.test_fares import (
    MIN,
    T0,
    Net,
    action_tap,
    bus,
    concession_price,
    demo_dict,
    m_in,
    m_out,
    run,
    scenarios,
    up,
    with_rules,
)

H = 3600
MIDNIGHT = T0 + 16 * H  # 2026-11-03 00:00 local


@pytest.fixture(scope="module")
def cq() -> FareTable:
    return fares.load_demo_table()


def two_metro_operators() -> FareTable:
    """The demo table with line 2 run by a second metro operator."""
    data = demo_dict()
    data["operators"].append({"id": "cq-rail2", "name": "Line 2 operator"})
    for line in data["metro"]["lines"]:
        if line["id"] == "L2":
            line["operator"] = "cq-rail2"
    return parse_table(data, source="two-operators.toml")


# --------------------------------------------------------------------------------------------------
# Transfer window


def test_a_negative_elapsed_time_counts_as_inside_the_window(cq: FareTable) -> None:
    """M03. docs: 'a negative elapsed time counts as inside the window' (a validator's clock behind)."""
    d = run(cq, [bus(T0), bus(T0 - 30, "bus-111")])
    assert (d[1].amount_fen, d[1].transfer_discount_fen) == (0, 180)


def test_a_ride_whose_discount_would_be_zero_opens_a_new_window(cq: FareTable) -> None:
    """M07. docs: a ride in a live, unused window whose discount would be 0 (a free first ride) opens a
    new window that replaces the old one; the next ride transfers from it."""
    free = fare(cq, EMPTY_STATE, bus(T0), Concession("elderly", 1))
    paid = fare(cq, free.state, bus(T0 + 10 * MIN, "bus-111"), Concession("elderly", 0))
    third = fare(cq, paid.state, bus(T0 + 20 * MIN, "bus-421"), Concession("elderly", 0))
    assert (free.amount_fen, paid.amount_fen) == (0, 180)
    assert "transfer_discount" not in paid.rules and paid.transfer_discount_fen == 0
    assert (third.amount_fen, third.transfer_discount_fen) == (0, 180)


def test_the_window_records_the_fare_charged_after_the_daily_cap() -> None:
    """M15. docs: the window records the opening ride's *charged* amount; a ride capped at 23:50 local
    bounds the discount of a transfer just after midnight."""
    table = with_rules(daily_cap_fen=500)
    taps = [bus(T0), bus(T0 + 2 * H), bus(MIDNIGHT - 10 * MIN), bus(MIDNIGHT + 10 * MIN, "bus-111")]
    d = run(table, taps)
    assert [x.amount_fen for x in d[:3]] == [180, 180, 140]
    assert d[2].state.window is not None and d[2].state.window.first_fare_fen == 140
    # New local day: 180 - min(180, 140, 200) = 40.
    assert (d[3].amount_fen, d[3].transfer_discount_fen) == (40, 140)


def test_a_journey_timeout_does_not_touch_the_transfer_window() -> None:
    """M28. docs: 'Metro entries, penalties and exits without an entry do not touch the window.'"""
    table = with_rules(journey_timeout_s=1800)
    d = run(
        table,
        [bus(T0), m_in(T0 + 5 * MIN, "l1-chaotianmen"), m_out(T0 + 40 * MIN, "l1-shapingba"), bus(T0 + 50 * MIN)],
    )
    assert d[2].penalty is not None and d[2].penalty.reason == "journey_timeout"
    assert d[2].state.window == d[0].state.window
    assert (d[3].amount_fen, d[3].transfer_discount_fen) == (0, 180)


def test_a_missing_tap_out_does_not_touch_the_transfer_window(cq: FareTable) -> None:
    """M29. Entering again (penalty for the open journey) keeps the bus's window: the new journey entered
    within the hour gets the transfer discount."""
    d = run(
        cq,
        [
            bus(T0),
            m_in(T0 + 5 * MIN, "l1-chaotianmen"),
            m_in(T0 + 10 * MIN, "l1-chaotianmen"),
            m_out(T0 + 30 * MIN, "l1-shapingba"),
        ],
    )
    assert d[2].penalty is not None and d[2].penalty.reason == "missing_tap_out"
    assert (d[3].amount_fen, d[3].transfer_discount_fen) == (180, 180)  # 360 - min(360, 180, 200)


# --------------------------------------------------------------------------------------------------
# Daily cap


def test_a_skewed_tap_dated_before_the_stored_day_counts_toward_that_day() -> None:
    """M18. docs: 'a tap dated before the state's day counts toward that day'. A validator 5 s behind
    just after midnight must not reopen yesterday's cap."""
    table = with_rules(daily_cap_fen=200)
    d = run(table, [bus(MIDNIGHT + 10), bus(MIDNIGHT + 20, "bus-111"), bus(MIDNIGHT - 5, "bus-421")])
    assert [x.amount_fen for x in d[:2]] == [180, 0]  # the second is the window's one transfer
    assert d[2].amount_fen == 20 and "daily_cap" in d[2].rules  # 180 full, capped at 200 - 180
    assert d[2].state.day_charged_fen == 200 and d[2].state.to_dict()["day"] == "2026-11-03"


def test_a_late_ride_from_an_earlier_day_does_not_count_toward_todays_cap() -> None:
    """M31. A late upload on an earlier local day than the card's counts toward no stored daily total:
    today's cap being reached does not make yesterday's ride free."""
    table = with_rules(daily_cap_fen=500)
    d = run(table, [bus(T0), bus(T0 + 2 * H), bus(T0 + 4 * H), up(bus(T0 - 86400))])
    assert [x.amount_fen for x in d[:3]] == [180, 180, 140]
    assert (d[3].amount_fen, d[3].rules) == (180, ("bus_flat_fare", "card_discount", "late_upload"))
    assert d[3].state.day_charged_fen == 500


# --------------------------------------------------------------------------------------------------
# Operators credited


def test_a_metro_journey_and_its_penalties_are_credited_to_the_entry_line_operator() -> None:
    """M27, M30, M55. docs: 'A metro journey is credited to the operator of its entry station's line';
    missing_tap_out and journey_timeout go to the open journey's operator."""
    t = two_metro_operators()
    ride = run(t, [m_in(T0, "l1-chaotianmen"), m_out(T0 + 30 * MIN, "l2-liziba")])[1]
    assert (ride.operator, ride.penalty) == ("cq-metro", None)
    back = run(t, [m_in(T0, "l2-liziba"), m_out(T0 + 30 * MIN, "l1-chaotianmen")])[1]
    assert back.operator == "cq-rail2"
    timeout = run(t, [m_in(T0, "l1-chaotianmen"), m_out(T0 + 5 * H, "l2-liziba")])[1]
    assert timeout.penalty == Penalty(700, "cq-metro", "journey_timeout", "l1-chaotianmen")
    again = run(t, [m_in(T0, "l1-chaotianmen"), m_in(T0 + H, "l2-liziba")])[1]
    assert again.penalty == Penalty(700, "cq-metro", "missing_tap_out", "l1-chaotianmen")
    assert again.operator == "cq-rail2"


# --------------------------------------------------------------------------------------------------
# Late uploads: which halves pair


def test_an_exit_takes_the_latest_late_entry_that_fits(cq: FareTable) -> None:
    """M36. docs: an exit with no open journey 'takes the latest unpaired entry' that fits."""
    d = run(
        cq,
        [
            bus(T0 + 5 * H),
            up(m_in(T0, "l1-chaotianmen")),
            up(m_in(T0 + 30 * MIN, "l1-shapingba")),
            up(m_out(T0 + 60 * MIN, "l1-laijiaqiao")),
        ],
    )
    ride = d[3]
    assert (ride.distance_m, ride.full_fare_fen, ride.amount_fen) == (9200, 300, 270)  # 沙坪坝 -> 赖家桥
    assert [(u.direction, u.station) for u in ride.state.unpaired] == [("in", "l1-chaotianmen")]


def test_a_late_entry_takes_the_earliest_held_exit_that_fits(cq: FareTable) -> None:
    """M37. docs: 'The earliest such exit is used, once'."""
    d = run(
        cq,
        [
            up(m_out(T0 + 30 * MIN, "l1-daping")),
            up(m_out(T0 + 60 * MIN, "l1-laijiaqiao")),
            up(m_in(T0, "l1-chaotianmen")),
        ],
    )
    assert [x.rules for x in d[:2]] == [("exit_held",), ("exit_held",)]
    ride = d[2]
    assert ride.rules[-1] == "entry_of_held_exit"
    assert (ride.distance_m, ride.amount_fen) == (6900, 270)  # 朝天门 -> 大坪, not -> 赖家桥 (540)
    assert [(u.station, u.charged) for u in ride.state.unpaired] == [("l1-laijiaqiao", False)]


def test_an_exit_exactly_the_timeout_after_a_late_entry_is_not_its_ride(cq: FareTable) -> None:
    """M34. docs: an exit takes an entry with 'entry <= exit < entry + journey_timeout_s' ('<=' only for a
    charged entry). Online, such a journey times out (the maximum fare); late, it must not cost the
    distance fare."""
    d = run(cq, [bus(T0 + 5 * H), up(m_in(T0, "l1-chaotianmen")), up(m_out(T0 + 4 * H, "l1-daping"))])
    assert d[1].rules == ("metro_entry", "late_upload")
    assert (d[2].total_fen, d[2].rules) == (0, ("exit_held", "late_upload"))
    charged, _ = charge_held_exits(cq, d[2].state, T0 + 8 * H)
    assert [p.amount_fen for _, p in charged] == [700]


def test_a_late_entry_and_exit_in_the_same_second_are_one_ride(cq: FareTable) -> None:
    """M41. 'entry <= exit': in and out in the same second at one station is the minimum fare."""
    d = run(cq, [bus(T0 + 5 * H), up(m_in(T0, "l1-daping")), up(m_out(T0, "l1-daping"))])
    assert (d[2].amount_fen, d[2].penalty, d[2].distance_m) == (180, None, 0)
    assert d[2].rules[-1] == "late_upload" and d[2].state.unpaired == ()


def test_an_upload_stamped_the_same_second_as_the_newest_tap_is_in_order(cq: FareTable) -> None:
    """M40. docs: a late tap is one 'whose time is *before* the card's newest tap'. A ride code's entry and
    exit in the same second (one station) close the journey at the minimum fare."""
    d = run(cq, [up(m_in(T0, "l1-daping")), up(m_out(T0, "l1-daping"))])
    assert (d[1].amount_fen, d[1].penalty, d[1].distance_m) == (180, None, 0)
    assert "late_upload" not in d[1].rules and d[1].state.journey is None and d[1].state.unpaired == ()


def test_an_exit_at_the_very_second_of_the_tap_that_charged_a_journey_is_not_its_exit(cq: FareTable) -> None:
    """M58. docs: a charged entry 'also needs exit < until' (the tap that charged it came after the rider
    left)."""
    d = run(
        cq,
        [
            up(m_in(T0, "l1-chaotianmen")),
            up(m_in(T0 + 600, "l1-xiaoshizi")),
            up(m_out(T0 + 1200, "l1-daping")),
            up(m_out(T0 + 600, "l1-eling")),
        ],
    )
    assert d[1].penalty is not None and d[1].penalty.reason == "missing_tap_out"
    assert d[3].rules == ("exit_held", "late_upload")


def test_a_held_exit_is_dropped_before_a_charged_entry(cq: FareTable) -> None:
    """M42. docs: with more than four taps waiting the card drops '... then held exits (their ride goes
    unpaid), and charged entries last (their exit, coming unpaired, would be charged a second time)'.
    Dropping the oldest charged entry instead charges journey A twice (700 + 700)."""
    d = run(
        cq,
        [
            m_in(T0, "l1-chaotianmen"),  # A
            m_in(T0 + H, "l1-xiaoshizi"),  # B: A charged (missing tap-out)
            bus(T0 + 70 * MIN),  # B charged
            up(m_out(T0 + 80 * MIN, "l1-eling")),  # X: held
            m_in(T0 + 90 * MIN, "l1-daping"),  # C
            m_in(T0 + 100 * MIN, "l1-shapingba"),  # D: C charged
            m_in(T0 + 110 * MIN, "l1-majiayan"),  # E: D charged -> five waiting
        ],
    )
    assert d[3].rules == ("exit_held",)
    waiting = d[-1].state.unpaired
    assert [(u.direction, u.time - T0, u.charged) for u in waiting] == [
        ("in", 0, True), ("in", H, True), ("in", 90 * MIN, True), ("in", 100 * MIN, True)
    ]
    # A's exit, uploaded late, ends A: the maximum fare back, the ride paid.
    a_exit = fare(cq, d[-1].state, up(m_out(T0 + 20 * MIN, "l1-daping")))
    assert (a_exit.rules[-1], a_exit.refund is not None, a_exit.net_fen) == (
        "exit_of_charged_journey", True, a_exit.amount_fen - 700
    )


# --------------------------------------------------------------------------------------------------
# An exact model of online, in-order pricing (docs/fares.md "How a ride is priced")


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1_700_000_000, 1_900_000_000))
def test_online_sequences_match_an_exact_model_of_the_documented_rules(
    scenario: tuple[Net, Any, list[Any]], start: int
) -> None:
    """M07, M15, M27, M28, M29, M30, M55 (and the rules in general): the existing invariant test bounds
    the transfer discount from above only and never checks the operators of metro rides and penalties.
    This model computes the exact amount, discount, operator and penalty of every online tap."""
    net, concession, actions = scenario
    t, r = net.table, net.table.rules
    stations = {s["id"]: s for s in net.data["metro"]["stations"]}
    line_operator = {line["id"]: line["operator"] for line in net.data["metro"]["lines"]}
    bus_operator = {b["id"]: b["operator"] for b in net.data["bus_lines"]}
    state, now, remaining = EMPTY_STATE, start, concession.elderly_rides_remaining
    open_j: tuple[str, int, str] | None = None  # station, time, operator
    window: tuple[int, int, str, bool] | None = None  # start, first fare, mode, used
    day: int | None = None
    charged = 0
    for act in actions:
        now += act.gap_s
        tap = action_tap(act, now, stations)
        c = Concession(concession.kind, remaining)
        d = fare(t, state, tap, c)
        today = (now + r.utc_offset_s) // 86400
        if day is None or today > day:
            day, charged = today, 0
        penalty = None
        ride = None  # (start, base, mode, operator)
        if act.kind == "bus":
            if open_j is not None:
                penalty = Penalty(t.cap_fen, open_j[2], "missing_tap_out", open_j[0])
            open_j = None
            ride = (now, t.bus_lines[act.target].fare_fen, "bus", bus_operator[act.target])
        elif act.kind == "in":
            if open_j is not None:
                penalty = Penalty(t.cap_fen, open_j[2], "missing_tap_out", open_j[0])
            open_j = (act.target, now, line_operator[stations[act.target]["line"]])
        elif open_j is None:
            penalty = Penalty(t.cap_fen, line_operator[stations[act.target]["line"]], "missing_tap_in", act.target)
        elif now - open_j[1] >= r.journey_timeout_s:
            penalty = Penalty(t.cap_fen, open_j[2], "journey_timeout", open_j[0])
            open_j = None
        else:
            dist = net.oracle[open_j[0], act.target]
            base = next((f for lim, f in t.bands if dist <= lim), t.cap_fen)
            ride = (open_j[1], base, "metro", open_j[2])
            open_j = None
        assert d.penalty == penalty
        if ride is None:
            assert (d.amount_fen, d.transfer_discount_fen, d.quota_ride_consumed) == (0, 0, False)
        else:
            ride_start, base, mode, operator = ride
            price = concession_price(t, c, remaining, base)
            if c.kind == "elderly" and remaining > 0:
                remaining -= 1
            discount, new_window = 0, None
            if window is not None and ride_start - window[0] < r.transfer_window_s:
                if window[3]:
                    new_window = window
                elif (window[2], mode) in r.transfer_pairs:
                    discount = min(price, window[1], r.transfer_discount_max_fen)
                    if discount > 0:
                        price -= discount
                        new_window = (window[0], window[1], window[2], True)
            if r.daily_cap_fen is not None and price > r.daily_cap_fen - charged:
                price = max(0, r.daily_cap_fen - charged)
            window = new_window if new_window is not None else (now, price, mode, False)
            charged += price
            assert (d.amount_fen, d.transfer_discount_fen, d.operator) == (price, discount, operator)
            assert d.state.day_charged_fen == charged
        state = d.state


# --------------------------------------------------------------------------------------------------
# The quota year (docs/transit.md "Concessions": "a quota's year never goes back")


async def test_an_extra_rides_grant_clocked_before_local_new_year_does_not_move_the_quota_year_back(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The office's request reads its clock (`dt.datetime.now` in transit_routes) before it waits for the
    holder's purse locks. Clocked at 23:59:59 on 31 December, it waits while a tap after midnight counts
    a ride in the new year's quota and commits. `_rides_left` then sees `quota_year != year` and returns a
    fresh base quota, and the grant writes `quota_year` = the old year: the new year's rides are forgotten
    (the holder rides free again) and the extra rides vanish at the next tap."""
    c = await rider(svc, db, years_ago(80))
    assert (await svc.put(url(c), {"kind": "elderly"})).status == 200
    assert (await bus_tap(svc, c["card_sn"]))["fare_fen"] == 0  # this year: QUOTA - 1 left
    # This year is the one that tap counted in, as recorded (a clock read now may be past New Year).
    year = await db.fetchval("SELECT quota_year FROM concession WHERE holder_id = $1", c["holder_id"])
    clocked = dt.datetime(year, 1, 1, tzinfo=dt.UTC) - dt.timedelta(seconds=TABLE.rules.utc_offset_s + 1)
    await concessions.grant_extra_quota(db, TABLE, c["holder_id"], Actor("office"), clocked)
    row = await db.fetchrow("SELECT quota_year, rides_left FROM concession WHERE holder_id = $1", c["holder_id"])
    assert row["quota_year"] == year, dict(row)  # was year - 1
    assert row["rides_left"] == QUOTA - 1 + EXTRA, dict(row)  # was QUOTA + EXTRA: the ride taken forgotten
    # Read with the same clock, the concession shows the new year's count, not a fresh quota.
    shown = await concessions.get_concession(db, TABLE, c["holder_id"], clocked)
    assert (shown["year"], shown["elderly_rides_left"]) == (year, QUOTA - 1 + EXTRA), shown
