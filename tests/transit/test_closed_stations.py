"""Closing a metro station (docs/fares.md "Closing a station"): a fare table deployed without a station that
open journeys entered at. Listed under `metro.retired`, those journeys are priced and cleared as the station
it names, and no new tap is taken there; not listed, the card's exits are declined and the sweep leaves the
journey (counted `unpriced`, never an error that stops the sweep), and `cardsvc fares check` finds the
station before the table goes live.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import time
import tomllib
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cardsvc import app, metrics
from cardsvc.config import Settings
from cardsvc.store.pool import create_pool
from cardsvc.transit import fares, sweep
from cardsvc.transit.fare_table import DEMO_TABLE_PATH, FareTableError, parse_table
from tests.helpers import ServiceHarness
from tests.transit.test_clearing_audit import run_cli  # noqa: F401 (fixture)
from tests.transit.test_taps import funded_card, metro, tap, tap_body

OLD = fares.load_demo_table()
CLOSED, SUCCESSOR, EXIT = "l1-chaotianmen", "l1-xiaoshizi", "l1-shapingba"
OTHER = "l2-xinshancun"
TIMEOUT = OLD.rules.journey_timeout_s


def without_closed(*, retired: bool) -> dict[str, Any]:
    """The demo table with CLOSED gone from the network, listed under metro.retired or not."""
    data = tomllib.loads(DEMO_TABLE_PATH.read_text(encoding="utf-8"))
    data["version"] = "cq-2026-12"
    metro_ = data["metro"]
    metro_["stations"] = [s for s in metro_["stations"] if s["id"] != CLOSED]
    for line in metro_["lines"]:
        line["stations"] = [s for s in line["stations"] if s != CLOSED]
    if retired:
        metro_["retired"] = [{"id": CLOSED, "name": "朝天门", "priced_as": SUCCESSOR}]
    return data


def write(tmp_path: Path, data: dict[str, Any], name: str) -> Path:
    """The table as a TOML file (only what the demo table uses: tables, arrays, strings, numbers, a date)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, int | float | dt.date):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        assert isinstance(v, dict), v
        return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    lines += [f"{k} = {value(v)}" for k, v in data.items() if isinstance(v, list)]
    lines += [f"{k} = {value(v)}" for k, v in data.items() if isinstance(v, dict)]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert fares.load_table(path).version == data["version"]
    return path


async def harness(svc: ServiceHarness, table: Path, aiohttp_client: Any) -> ServiceHarness:
    """The service restarted on the same database with another fare table."""
    other = ServiceHarness(svc.dsn, svc.keys, dataclasses.replace(svc.settings, fare_table=table))
    await other.start(aiohttp_client)
    return other


# ------------------------------------------------------------------ the table file


def test_a_retired_station_loads_and_is_priced_as_the_station_it_names() -> None:
    new = parse_table(without_closed(retired=True), source="new.toml")
    assert CLOSED not in new.stations and new.retired == {CLOSED: SUCCESSOR}
    assert fares.station_line(new, CLOSED) == new.stations[SUCCESSOR].line
    assert fares.journey_place(new, CLOSED) == fares.place_of(new, SUCCESSOR)
    with pytest.raises(fares.FareInputError, match="unknown metro station"):
        fares.place_of(new, CLOSED)  # a tap there: refused
    bare = parse_table(without_closed(retired=False), source="bare.toml")
    assert fares.station_line(bare, CLOSED) is None
    with pytest.raises(fares.FareInputError, match=r"metro\.retired"):
        fares.journey_place(bare, CLOSED)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"id": "l1-xiaoshizi", "priced_as": "l1-jiaochangkou"}, "is in metro.stations"),
        ({"id": CLOSED, "priced_as": "l9-nowhere"}, "unknown station 'l9-nowhere'"),
        ({"id": CLOSED, "priced_as": CLOSED}, "unknown station"),
        ({"id": "bad id!", "priced_as": SUCCESSOR}, "must be 1-16 characters"),
        ({"id": CLOSED}, "missing"),
        ({"id": CLOSED, "priced_as": SUCCESSOR, "fare_fen": 300}, "unknown"),
    ],
)
def test_the_loader_refuses_a_retired_entry_that_cannot_price(entry: dict[str, Any], problem: str) -> None:
    data = without_closed(retired=False)
    data["metro"]["retired"] = [entry]
    with pytest.raises(FareTableError, match=problem) as exc:
        parse_table(copy.deepcopy(data), source="new.toml")
    assert exc.value.path.startswith("metro.retired[0]")
    dup = without_closed(retired=True)
    dup["metro"]["retired"].append(dict(dup["metro"]["retired"][0]))
    with pytest.raises(FareTableError, match="duplicate retired station"):
        parse_table(dup, source="dup.toml")


def test_the_fare_engine_prices_stored_taps_at_a_retired_station_as_its_successor() -> None:
    new = parse_table(without_closed(retired=True), source="new.toml")
    t0 = 1_790_000_000
    exit_ = fares.Tap(t0 + 1800, "metro", "L1", EXIT, "out")
    # An open journey entered under the old table.
    entered = fares.fare(OLD, fares.EMPTY_STATE, fares.Tap(t0, "metro", "L1", CLOSED, "in"), fares.NO_CONCESSION)
    from_successor = fares.fare(
        new, fares.EMPTY_STATE, fares.Tap(t0, "metro", "L1", SUCCESSOR, "in"), fares.NO_CONCESSION
    )
    got = fares.fare(new, entered.state, exit_, fares.NO_CONCESSION)
    want = fares.fare(new, from_successor.state, exit_, fares.NO_CONCESSION)
    assert (got.amount_fen, got.distance_m) == (want.amount_fen, want.distance_m)
    assert got.amount_fen > 0 and got.distance_m is not None
    # A gate's exit uploaded first (held), then its entry at the closed station, under the new table.
    held = fares.fare(OLD, fares.EMPTY_STATE, dataclasses.replace(exit_, uploaded=True), fares.NO_CONCESSION)
    assert held.amount_fen == 0 and held.state.unpaired
    late_in = fares.Tap(t0, "metro", "L1", SUCCESSOR, "in", uploaded=True)
    priced = fares.fare(new, held.state, late_in, fares.NO_CONCESSION)
    assert priced.amount_fen == want.amount_fen


# ------------------------------------------------------------------ the service


async def test_a_journey_entered_at_a_closed_station_is_priced_once_the_table_retires_it(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, aiohttp_client: Any
) -> None:
    rider, control = await funded_card(svc, 2000), await funded_card(svc, 2000)
    now = int(time.time())
    entry = await tap(svc, tap_body(svc, rider["card_sn"], at=now - 60, **metro(CLOSED, "in")))
    assert entry["result"] == "approved", entry

    # Deployed without listing the station: the exit cannot be priced, and nothing is charged.
    bare = await harness(svc, write(tmp_path, without_closed(retired=False), "bare"), aiohttp_client)
    out = tap_body(bare, rider["card_sn"], at=now, **metro(EXIT, "out"))
    declined = await tap(bare, out)
    assert (declined["result"], declined["reason"]) == ("declined", "fare_input_invalid"), declined
    assert await bare.balance(rider["card_no"]) == 2000

    # Listed under metro.retired: the same exit is priced from the successor, as a rider entering there
    # would pay; a new tap at the closed station is refused.
    new = await harness(svc, write(tmp_path, without_closed(retired=True), "new"), aiohttp_client)
    got = await tap(new, tap_body(new, rider["card_sn"], at=now, **metro(EXIT, "out")))
    await tap(new, tap_body(new, control["card_sn"], at=now - 60, **metro(SUCCESSOR, "in")))
    want = await tap(new, tap_body(new, control["card_sn"], at=now, **metro(EXIT, "out")))
    assert got["result"] == want["result"] == "approved", (got, want)
    assert got["fare_fen"] == want["fare_fen"] > 0
    assert await new.balance(rider["card_no"]) == 2000 - want["fare_fen"]
    refused = await new.post(
        "/v1/transit/taps", tap_body(new, rider["card_sn"], **metro(CLOSED, "in")), as_="transit_validator"
    )
    assert refused.status == 400 and refused.body["code"] == "invalid_field", refused.body


async def test_a_journey_the_sweep_could_not_price_is_charged_by_the_first_sweep_after_the_fix(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, aiohttp_client: Any
) -> None:
    """The sweep's watermark moves past a journey at an unknown station; the card is kept in
    journey_sweep_retry and looked at by every sweep (counted `unpriced` each time, so the alert holds)
    until the table is fixed: the first sweep on the fixed table charges it, once. A card whose journey a
    tap ended meanwhile leaves the list with nothing charged."""
    stuck, gone = await funded_card(svc, 2000), await funded_card(svc, 2000)
    for rider in (stuck, gone):
        await tap(svc, tap_body(svc, rider["card_sn"], **metro(CLOSED, "in")))
    bare = parse_table(without_closed(retired=False), source="bare.toml")
    new = parse_table(without_closed(retired=True), source="new.toml")
    pool = await create_pool(svc.dsn, svc.settings)
    try:
        first = await sweep.sweep_timed_out_journeys(pool, bare, 0, now=later(TIMEOUT + 60))
        assert (first.closed, first.unpriced, first.unknown_stations) == (0, 2, (CLOSED,)), first
        retried = "SELECT card_id FROM journey_sweep_retry ORDER BY 1"
        assert [r["card_id"] for r in await db.fetch(retried)] == sorted([stuck["card_id"], gone["card_id"]])
        # Past the watermark, and still unpriced: counted again, nothing charged.
        again = await sweep.sweep_timed_out_journeys(pool, bare, 0, now=later(TIMEOUT + 600))
        assert (again.closed, again.unpriced) == (0, 2), again
        assert await svc.balance(stuck["card_no"]) == 2000
        # The service restarts on the fixed table; one rider taps out (in time) before the next sweep.
        fixed = await harness(svc, write(tmp_path, without_closed(retired=True), "new"), aiohttp_client)
        out = await tap(fixed, tap_body(fixed, gone["card_sn"], **metro(EXIT, "out")))
        assert out["result"] == "approved" and 0 < out["fare_fen"] < new.cap_fen, out
        done = await sweep.sweep_timed_out_journeys(pool, new, 0, now=later(TIMEOUT + 900))
        assert (done.closed, done.unpriced, done.charged_fen) == (1, 0, new.cap_fen), done
        assert await svc.balance(stuck["card_no"]) == 2000 - new.cap_fen
        assert await svc.balance(gone["card_no"]) == 2000 - out["fare_fen"]
        assert await db.fetch(retried) == []
        after = await sweep.sweep_timed_out_journeys(pool, new, 0, now=later(TIMEOUT + 1200))
        assert (after.closed, after.unpriced, after.charged_fen) == (0, 0, 0), after
        assert await svc.balance(stuck["card_no"]) == 2000 - new.cap_fen
    finally:
        await pool.close()


async def test_the_sweep_charges_a_retired_station_and_counts_an_unknown_one_without_failing(
    svc: ServiceHarness, db: asyncpg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    at_closed, elsewhere = await funded_card(svc, 2000), await funded_card(svc, 2000)
    await tap(svc, tap_body(svc, at_closed["card_sn"], **metro(CLOSED, "in")))
    await tap(svc, tap_body(svc, elsewhere["card_sn"], **metro(OTHER, "in")))
    bare = parse_table(without_closed(retired=False), source="bare.toml")
    new = parse_table(without_closed(retired=True), source="new.toml")
    pool = await create_pool(svc.dsn, svc.settings)
    try:
        # Without the station: the other journey is charged, this one left and counted, and the
        # maintenance round that runs the sweep does not fail.
        before = metrics.JOURNEYS_SWEPT.labels("unpriced")._value.get()
        hours_later = functools.partial(sweep.sweep_timed_out_journeys, now=later(TIMEOUT + 60))
        monkeypatch.setattr(app, "sweep_timed_out_journeys", hours_later)
        await app.maintenance_once(pool, settings, bare)  # raises MaintenanceFailed if a step failed
        assert metrics.JOURNEYS_SWEPT.labels("unpriced")._value.get() == before + 1
        rows = await db.fetch("SELECT card_id, station_id FROM txn_journal WHERE source = $1", sweep.SOURCE_SWEEP)
        assert [(r["card_id"], r["station_id"]) for r in rows] == [(elsewhere["card_id"], OTHER)]
        assert await svc.balance(at_closed["card_no"]) == 2000

        # With it retired: a later sweep charges the maximum fare, cleared under the successor's line.
        await tap(svc, tap_body(svc, at_closed["card_sn"], **metro(CLOSED, "in")))  # a journey after the fix
        await db.execute("UPDATE journey_sweep SET swept_to = now() - interval '1 minute'")
        done = await sweep.sweep_timed_out_journeys(pool, new, 0, now=later(TIMEOUT + 120))
        assert (done.closed, done.unpriced) == (1, 0), done
        row = await db.fetchrow(
            "SELECT amount_fen, line_id, station_id, counterparty FROM txn_journal WHERE card_id = $1 AND source = $2",
            at_closed["card_id"], sweep.SOURCE_SWEEP,
        )  # fmt: skip
        assert row is not None and row["amount_fen"] == -new.cap_fen
        assert (row["station_id"], row["line_id"]) == (CLOSED, new.stations[SUCCESSOR].line)
        assert row["counterparty"] == OLD.station_operator[CLOSED]
    finally:
        await pool.close()


def later(seconds: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


async def test_fares_check_lists_the_stations_stored_journeys_need_before_a_table_goes_live(
    svc: ServiceHarness, tmp_path: Path, run_cli: Any  # noqa: F811
) -> None:
    a, b = await funded_card(svc, 2000), await funded_card(svc, 2000)
    await tap(svc, tap_body(svc, a["card_sn"], **metro(CLOSED, "in")))
    await tap(svc, tap_body(svc, b["card_sn"], **metro(EXIT, "in")))
    bare = write(tmp_path, without_closed(retired=False), "bare")
    res = await run_cli("fares", "check", "--table", str(bare), "--chunk-cards", "1")
    assert res.status == 1, (res.out, res.err)
    assert f"{CLOSED}: 1 card\n" in res.err and EXIT not in res.err
    assert "stored journeys name 2 stations" in res.out

    res = await run_cli("fares", "check", "--table", str(write(tmp_path, without_closed(retired=True), "new")))
    assert res.status == 0, (res.out, res.err)
    assert f"1 of them retired: {CLOSED}" in res.out and "every one is priced" in res.out

    res = await run_cli("fares", "check")  # the configured (demo) table serves both
    assert res.status == 0 and "every one is priced" in res.out, (res.out, res.err)

    broken = tmp_path / "broken.toml"
    broken.write_text((tmp_path / "new.toml").read_text().replace(f'"{SUCCESSOR}"}}', '"l9-nowhere"}'))
    res = await run_cli("fares", "check", "--no-database", "--table", str(broken))
    assert res.status == 1, (res.out, res.err)
    assert res.err.strip() == (  # one line naming the file, the key and the problem; no traceback
        f"fare table error: {broken}: metro.retired[0].priced_as: unknown station 'l9-nowhere': "
        "it must be a station of this table"
    )


async def test_uploads_made_at_a_station_before_it_closed_are_priced_and_paid_after_the_table_retires_it(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, aiohttp_client: Any
) -> None:
    """Validators and gates upload up to 30 days late, so a closed station's last records arrive after the
    new table is live. An offline debit there (the chip already paid) was refused `unknown_station`, and a
    ride-code exit there `fare_input_invalid`, leaving its journey to the sweep's maximum fare. Both are
    priced as the retired station's `priced_as` now; a new online tap there is still refused (above)."""
    from tests.transit.test_offline import debit, funded, tid
    from tests.transit.test_offline import upload as offline_upload
    from tests.transit.test_rides import backdated_phone, gate_record, rider
    from tests.transit.test_rides import upload as ride_upload

    new = await harness(svc, write(tmp_path, without_closed(retired=True), "new"), aiohttp_client)
    c, chip = await funded(new, 1000)  # (new's own terminals: the helpers' sequence counters differ)
    made = int(time.time()) - 3600  # an hour ago, while the station was open
    rec = debit(chip, tid(new), 300, txn_time=made, place={"line_id": "L1", "station_id": CLOSED, "direction": "out"})
    [answer] = await offline_upload(new, [rec])
    assert (answer["result"], answer["reason"]) == ("accepted", None), answer
    assert await new.balance(c["card_no"]) == 700
    row = await db.fetchrow(
        "SELECT j.counterparty, j.line_id FROM txn_journal j JOIN card c USING (card_id) WHERE c.card_no = $1 AND j.kind = 5",
        c["card_no"],
    )
    assert row is not None and (row["counterparty"], row["line_id"]) == (OLD.station_operator[CLOSED], "L1")

    r, _, _ = await rider(svc, 2000)
    now = int(time.time())
    phone = await backdated_phone(svc, r["card_no"], now - 3600)
    entry = gate_record(svc, phone.next_code(now - 1500), now - 1500, line_id="L1", station_id=EXIT, direction="in")
    [a] = await ride_upload(svc, [entry], batch_id=1)
    assert a["result"] == "approved", a
    exit_ = gate_record(new, phone.next_code(now - 900), now - 900, line_id="L1", station_id=CLOSED, direction="out")
    [b] = await ride_upload(new, [exit_], batch_id=2)
    successor = parse_table(without_closed(retired=True), source="new.toml")
    distance = fares.metro_fare_fen(successor, EXIT, SUCCESSOR)
    want = fares.card_price_fen(distance, successor.rules.card_discount_percent)
    assert (b["result"], b["fare_fen"]) == ("approved", want), b


async def test_an_operator_gone_from_the_table_is_found_by_fares_check_and_swept_once_registered(
    svc: ServiceHarness, db: asyncpg.Connection, tmp_path: Path, run_cli: Any  # noqa: F811
) -> None:
    """The metro passes to another operator: journeys still open are credited to the old one. The sweep
    looks for entries credited to the table's metro operators, so it did not see them at all (neither
    charged nor counted). `fares check` names the operator; once it is registered (`clearing register`)
    the sweep charges the journey, credited to it."""
    rider = await funded_card(svc, 2000)
    assert (await tap(svc, tap_body(svc, rider["card_sn"], **metro(CLOSED, "in"))))["result"] == "approved"
    data = without_closed(retired=True)
    data["operators"] = [o for o in data["operators"] if o["id"] != "cq-metro"] + [{"id": "cq-rail", "name": "rail"}]
    for line in data["metro"]["lines"]:
        line["operator"] = "cq-rail"
    res = await run_cli("fares", "check", "--table", str(write(tmp_path, data, "rail")))
    assert res.status == 1 and "cq-metro: 1 card\n" in res.err and "clearing register" in res.err, res.err
    new = parse_table(data, source="rail.toml")
    pool = await create_pool(svc.dsn, svc.settings)
    try:
        assert (await run_cli("clearing", "register", "--operator", "cq-metro", "--name", "old metro")).status == 0
        done = await sweep.sweep_timed_out_journeys(pool, new, 0, now=later(TIMEOUT + 60))
        assert (done.closed, done.unpriced) == (1, 0), done
        row = await db.fetchrow(
            "SELECT counterparty, line_id FROM txn_journal WHERE source = $1 AND card_id = $2",
            sweep.SOURCE_SWEEP, rider["card_id"],
        )  # fmt: skip
        assert row is not None and (row["counterparty"], row["line_id"]) == ("cq-metro", new.stations[SUCCESSOR].line)
    finally:
        await pool.close()
    res = await run_cli("fares", "check", "--table", str(tmp_path / "rail.toml"))
    assert res.status == 0, res.err


async def test_fares_check_names_an_operator_that_kept_only_buses(
    svc: ServiceHarness, tmp_path: Path, run_cli: Any  # noqa: F811
) -> None:
    """The metro passes to cq-rail and cq-metro stays in the table for a bus line. The sweep looks for entries
    credited to the table's metro operators (and registered ones), so `fares check` must name cq-metro: it
    passed, since cq-metro was still in the table, and the open journey was never swept."""
    rider = await funded_card(svc, 2000)
    assert (await tap(svc, tap_body(svc, rider["card_sn"], **metro(CLOSED, "in"))))["result"] == "approved"
    data = without_closed(retired=True)
    data["operators"] = data["operators"] + [{"id": "cq-rail", "name": "rail"}]
    for line in data["metro"]["lines"]:
        line["operator"] = "cq-rail"
    data["bus_lines"][0]["operator"] = "cq-metro"
    res = await run_cli("fares", "check", "--table", str(write(tmp_path, data, "buses")))
    assert res.status == 1 and "running no metro line" in res.err and "cq-metro: 1 card\n" in res.err, res.err
