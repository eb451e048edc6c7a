"""The fare engine (cardsvc/transit/fares.py) against docs/fares.md where late uploads meet the sweep and a
card's stop: an exit after the stop (`Tap.entered_before`) beside the replacement card's rider's journey,
a sweep run days late, and the stored state's version. Each test failed before its fix (a review of the
engine found them). Pure engine calls on the shipped demo table, no database."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cardsvc.transit.fares import (
    EMPTY_STATE,
    FareInputError,
    FareTable,
    JourneyState,
    charge_held_exits,
    close_open_journey,
    fare,
    load_demo_table,
)
from tests.transit.test_fares import T0, m_in, m_out, run, up

H = 3600
DAY = 86400


@pytest.fixture(scope="module")
def cq() -> FareTable:
    return load_demo_table()


def _sweep(table: FareTable, state: JourneyState, now: int, *, force: bool = False) -> tuple[int, JourneyState]:
    """What the service's sweep (cardsvc/transit/sweep.py) does to a card at `now`: held exits, then the journey."""
    held, state = charge_held_exits(table, state, now)
    penalty, state = close_open_journey(table, state, now, force=force)
    return (penalty.amount_fen if penalty else 0) + sum(p.amount_fen for _, p in held), state


# --------------------------------------------------------------------------------------------------
# An exit taken after its card stopped does not end (or refund) a swept journey entered after the stop.


def test_an_exit_after_the_stop_does_not_end_a_swept_journey_entered_after_the_stop(cq: FareTable) -> None:
    """docs/fares.md "Held exits": an exit taken after its card stopped (`Tap.entered_before`) counts
    only as the end of a journey entered before the stop; it does not end a journey entered after the stop
    (another rider of the purse, on the replacement card), open or closed by the sweep. Before, `_in_order`
    checked this for an open journey only: once the sweep had closed it (`state.swept`), the exit went to
    `_exit_of_swept`, which gave the sweep's maximum fare back and priced B's journey to A's exit."""
    stop = T0 + 600
    b_in = m_in(T0 + 900, "l1-xiaoshizi")  # B, on the replacement card, after the stop; never taps out
    a_out = dataclasses.replace(up(m_out(T0 + 1200, "l1-daping")), entered_before=stop)  # A's exit, old card
    entered = fare(cq, EMPTY_STATE, b_in).state

    # Journey still open: A's exit leaves it alone (held for A's entry), as documented.
    unswept = fare(cq, entered, a_out)
    assert unswept.rules == ("exit_held", "late_upload") and unswept.state.journey == entered.journey

    # The sweep charged B's journey first: the same exit must not be taken as B's exit either.
    penalty, swept = close_open_journey(cq, entered, T0 + 900 + cq.rules.journey_timeout_s)
    assert penalty is not None and penalty.amount_fen == 700
    d = fare(cq, swept, a_out)
    assert "exit_of_swept_journey" not in d.rules, (d.rules, d.amount_fen, d.refund)
    assert d.refund is None, d.refund


# --------------------------------------------------------------------------------------------------
# A sweep that runs late keeps the charged entry: the exit arriving later gets the charge back.


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    exit_after=st.integers(60, 4 * H - 1),
    sweep_after=st.integers(4 * H, 30 * DAY),
)
@example(exit_after=30 * 60, sweep_after=8 * DAY)
def test_a_journey_swept_late_still_gets_its_charge_back_when_its_exit_arrives(
    exit_after: int, sweep_after: int
) -> None:
    """docs/fares.md "Given back": the exit of an entry charged by the sweep, uploaded with a time less
    than `journey_timeout_s` after the entry, gives the charge back and the ride is priced ("A journey
    whose two halves both arrive ... however far apart (with sweeps between them), costs its fare"). The
    card drops unpaired taps older than 7 days before *its newest tap*. Before, `close_open_journey` kept
    the charged entry as of the sweep's clock: a sweep more than 7 days after the entry (the retry of an
    unpriced station until the table is fixed, a service down) dropped the entry as soon as it was kept,
    and the exit then cost nothing and gave nothing back."""
    cq = load_demo_table()
    entry = up(m_in(T0, "l1-chaotianmen"))
    exit_ = up(m_out(T0 + exit_after, "l1-daping"))
    in_order = run(cq, [entry, exit_])[1].amount_fen  # 270
    state = fare(cq, EMPTY_STATE, entry).state
    charged, state = _sweep(cq, state, T0 + sweep_after)
    assert charged == 700
    d = fare(cq, state, exit_)
    assert d.refund is not None and d.refund.amount_fen == 700, (d.rules, d.refund)
    assert charged + d.net_fen == in_order


# --------------------------------------------------------------------------------------------------
# The replacement rider's journey costs its fare once, beside the old card's rider's exit after the stop.


def test_a_replacement_riders_journey_is_not_charged_twice_when_its_exit_arrives_after_an_exit_after_the_stop(
    cq: FareTable,
) -> None:
    """docs/fares.md "Late uploads": "in whatever order a card's uploaded rides arrive, with sweeps between
    them, each metro journey costs at most the maximum fare once". Two riders of one purse: A's old card
    stopped at `stop`; B enters with the replacement's ride code after it. A's exit (after the stop,
    `entered_before`) is held without ending B's journey. Before, it became the card's newest tap, so B's
    own exit, uploaded a little later with an earlier time, was a late tap: it could not close the open
    journey and was held as an exit without entry; the sweep charged B's journey `missing_tap_out` (700)
    and then B's exit `missing_tap_in` (700): 1,400 for a journey that costs its distance fare in order.
    A's exit (no entry before the stop) is dropped uncharged."""
    stop = T0 + 600
    b_in = up(m_in(T0 + 900, "l1-xiaoshizi"))
    a_out = dataclasses.replace(up(m_out(T0 + 1200, "l1-daping")), entered_before=stop)
    b_out = up(m_out(T0 + 1100, "l2-liziba"))
    decisions = run(cq, [b_in, a_out, b_out])
    total = sum(d.net_fen for d in decisions)
    state = decisions[-1].state
    for now in (T0 + 900 + 4 * H, T0 + 1100 + 4 * H, T0 + 30 * DAY):
        charged, state = _sweep(cq, state, now, force=now == T0 + 30 * DAY)
        total += charged
    # B's journey: its fare in order; A's exit after the stop: never charged on its own.
    assert total == sum(d.net_fen for d in run(cq, [b_in, b_out])), total


# --------------------------------------------------------------------------------------------------
# A stored state whose version is the boolean true (or 1.0) is refused.


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_a_stored_state_of_another_version_value_is_refused(version: str) -> None:
    """docs/fares.md "State JSON layout": `from_dict` / `from_json` refuse "any other `v`" than 1, and
    refuse wrong types. `data["v"] != 1` is False for `true` (and 1.0) in Python: they were accepted."""
    text = '{"v":' + version + ',"journey":null,"window":null,"day":null,"day_charged_fen":0}'
    with pytest.raises(FareInputError):
        JourneyState.from_json(text)
