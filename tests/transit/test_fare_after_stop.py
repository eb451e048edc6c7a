"""An exit the old card's rider took after the card stopped (docs/fares.md "Held exits") is not the newest
tap of the rider after the stop: held, or dropped when due, it must not change what that rider pays. It
made their uploaded exit or bus ride late (no transfer discount, a swept journey's exit taken for another
journey's); the explicit examples are the shrunk cases of the property at the end.

Pure engine calls on the shipped demo table, no database.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardsvc.transit.fares import (
    EMPTY_STATE,
    Decision,
    FareTable,
    JourneyState,
    Tap,
    charge_held_exits,
    close_open_journey,
    fare,
    load_demo_table,
)
from tests.transit.test_fares import T0, bus, m_in, m_out, up

H = 3600
DAY = 86400


def _sweep(table: FareTable, state: JourneyState, now: int) -> tuple[int, JourneyState]:
    """What the service's sweep does to a card at `now`: its held exits, then its open journey."""
    held, state = charge_held_exits(table, state, now)
    penalty, state = close_open_journey(table, state, now)
    return (penalty.amount_fen if penalty else 0) + sum(p.amount_fen for _, p in held), state


def _after_stop(tap: Tap, stop: int) -> Tap:
    """An exit the service took after its card stopped (a loss report or a replacement at `stop`)."""
    return dataclasses.replace(up(tap), entered_before=stop)


# --------------------------------------------------------------------------------------------------
# An exit after the stop, dropped uncharged, must not change what the replacement card's rider pays.


def _b_with_and_without_a(with_a: bool) -> tuple[int, list[Decision], JourneyState]:
    cq = load_demo_table()
    stop = T0 + 600
    a_out = _after_stop(m_out(T0 + 1200, "l1-daping"), stop)  # A's exit, old card; A's entry never comes
    b_bus = bus(T0 + 700)  # B, replacement card, after the stop: 180
    b_in = m_in(T0 + 900, "l1-xiaoshizi")
    b_out = up(m_out(T0 + 1100, "l1-daping"))  # 6.0 km: 200, card 180, bus->metro transfer -180 = 0
    c_in = up(m_in(T0 + 6 * H, "l1-chaotianmen"))  # B's next ride code journey, its exit uploaded first
    c_out = up(m_out(T0 + 6 * H + 1800, "l1-shapingba"))  # 15.4 km: 400, card 360
    state, total = EMPTY_STATE, 0
    for tap in [b_bus, b_in, *([a_out] if with_a else [])]:
        d = fare(cq, state, tap)
        state, total = d.state, total + d.net_fen
    charged, state = _sweep(cq, state, T0 + 1200 + 4 * H)  # B's journey timed out; A's exit due (dropped)
    total += charged
    later = []
    for tap in [b_out, c_out, c_in]:
        d = fare(cq, state, tap)
        later.append(d)
        state, total = d.state, total + d.net_fen
    charged, state = _sweep(cq, state, T0 + 40 * DAY)
    return total + charged, later, state


def test_an_exit_after_the_stop_dropped_by_the_sweep_does_not_make_the_replacement_riders_exit_late() -> None:
    """docs/fares.md "Held exits": an exit the service took after its card stopped (`entered_before`) is
    held for an entry before the stop, "when due it is dropped, not charged", and it is not "the card's
    newest tap" for the replacement card's rider. B (replacement card) takes a bus (180) and enters the
    metro; B's journey is swept (700). B's exit, uploaded after the sweep, is the card's next tap after
    the sweep: `exit_of_swept_journey`, the 700 given back and the ride "priced in order, transfer
    discount included" (0 after the bus): B pays 180 in all, and B's next ride code journey (exit
    uploaded first, then its entry) costs its 360.

    With A's exit after the stop on the card (held, then dropped uncharged by the same sweep),
    `charge_held_exits` stores the dropped exit's time as the card's `latest`, so B's exit (earlier
    than A's) becomes a late upload: priced on its own without the transfer discount (B pays 180 more),
    and, a late tap leaving `swept`, the swept journey stays on the card: B's next journey's exit is
    then taken as the swept journey's (0, `exit_of_swept_journey`) instead of being held, and its entry
    finds nothing: that 360 ride is never charged (the operator loses it). An exit that was never
    charged and was thrown away changes what the other rider pays and what the operator is paid."""
    total_without, later_without, _ = _b_with_and_without_a(False)
    assert total_without == 180 + 0 + 360
    assert later_without[0].rules[-1] == "exit_of_swept_journey"
    total_with, later_with, _ = _b_with_and_without_a(True)
    assert (total_with, [d.rules[-1] for d in later_with], [d.net_fen for d in later_with]) == (
        total_without,
        [d.rules[-1] for d in later_without],
        [d.net_fen for d in later_without],
    )


def test_an_exit_after_the_stop_does_not_make_the_replacement_riders_bus_ride_late() -> None:
    """docs/fares.md "Held exits": an exit after the stop "is not the card's newest tap for that rider"
    (the replacement card's; only an entry is judged against it, so that one before the stop finds it).
    B (replacement card) boards a bus at 0:11:40 (180), then a second bus at 0:16:40 with a ride code
    whose validator uploads it: in order, a bus->bus transfer, 0. A's exit after the stop, stamped
    0:20:00, arrived in between and is held: `fare` judges the bus upload against it (only a metro exit
    skips it, `_newest(after_stop=False)`), so B's bus is a late upload, priced on its own without the
    transfer discount: B pays 180 instead of 0 because of another rider's exit."""
    cq = load_demo_table()
    stop = T0 + 600
    a_out = _after_stop(m_out(T0 + 1200, "l1-daping"), stop)
    b1, b2 = bus(T0 + 700), up(bus(T0 + 1000))
    state = fare(cq, EMPTY_STATE, b1).state
    alone = fare(cq, state, b2)
    assert (alone.amount_fen, alone.rules[-1]) == (0, "transfer_discount")
    held = fare(cq, state, a_out)
    assert held.rules == ("exit_held",)
    d = fare(cq, held.state, b2)
    assert (d.amount_fen, d.rules) == (alone.amount_fen, alone.rules)


# --------------------------------------------------------------------------------------------------
# The property: exits after the stop that no entry before the stop takes cost the other rider nothing.

_STATIONS = ["l1-chaotianmen", "l1-xiaoshizi", "l1-daping", "l1-shapingba", "l2-daping", "l2-liziba"]


def _line(station: str) -> str:
    return station.split("-")[0].upper()


@st.composite
def _b_rides(draw: st.DrawFn) -> list[tuple[int, int, Tap]]:
    """(arrival, order, tap): B's rides after the stop (T0), one after another, each bus ride or metro
    journey online (arriving at its time) or by a ride code (uploaded, arriving up to two days late)."""
    out: list[tuple[int, int, Tap]] = []
    t = T0
    for _ in range(draw(st.integers(1, 4))):
        t += draw(st.integers(60, 3 * H))
        uploaded = draw(st.booleans())
        if draw(st.booleans()):
            taps = [Tap(t, "bus", draw(st.sampled_from(["bus-105", "bus-261"])), uploaded=uploaded)]
        else:
            a, b = draw(st.sampled_from(_STATIONS)), draw(st.sampled_from(_STATIONS))
            end = t + draw(st.integers(60, 4 * H - 1))
            taps = [Tap(t, "metro", _line(a), a, "in", uploaded=uploaded), Tap(end, "metro", _line(b), b, "out", uploaded=uploaded)]
            t = end
        for tap in taps:
            out.append((tap.time + (draw(st.integers(0, 2 * DAY)) if uploaded else 0), len(out), tap))
    return out


def _play(table: FareTable, events: list[tuple[int, int, Tap | None]]) -> int:
    state, total = EMPTY_STATE, 0
    for arrival, _, tap in sorted(events, key=lambda e: (e[0], e[1])):
        if tap is None:
            charged, state = _sweep(table, state, arrival)
            total += charged
            continue
        d = fare(table, state, tap)
        state, total = d.state, total + d.net_fen
    held, state = charge_held_exits(table, state, T0 + 40 * DAY)
    penalty, _ = close_open_journey(table, state, T0 + 40 * DAY, force=True)
    return total + sum(p.amount_fen for _, p in held) + (penalty.amount_fen if penalty else 0)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    _b_rides(),
    st.lists(st.integers(0, 3 * DAY), max_size=3),
    st.lists(st.tuples(st.integers(60, 12 * H), st.integers(0, 2 * DAY), st.sampled_from(_STATIONS)), min_size=1, max_size=2),
)
def test_exits_after_the_stop_never_change_what_the_replacement_rider_pays(
    rides: list[tuple[int, int, Tap]], sweeps: list[int], a_exits: list[tuple[int, int, str]]
) -> None:
    """docs/fares.md "Held exits": an exit after the card stopped counts only as the end of a journey
    entered before the stop; with none, it is dropped when due, never charged, and it is not the newest
    tap of the replacement card's rider. So adding such exits (A's, after a stop at T0, with no entry
    before the stop) to the replacement rider B's taps, whatever the arrival order and sweeps, must
    leave what the purse pays unchanged (the two examples above were shrunk cases of its failures)."""
    cq = load_demo_table()
    events: list[tuple[int, int, Tap | None]] = [*rides, *((T0 + s, 1000 + k, None) for k, s in enumerate(sweeps))]
    extra = [
        (T0 + off + delay, 2000 + k, _after_stop(m_out(T0 + off, station), T0))
        for k, (off, delay, station) in enumerate(a_exits)
    ]
    assert _play(cq, [*events, *extra]) == _play(cq, events)
