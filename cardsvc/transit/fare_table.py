"""Transit fare tables: the model, the loader and the fare lookups (DOMAIN.md §5; docs/fares.md).

A fare table is a versioned TOML file (`tables/*.toml`). `load_table()` parses it with `tomllib`,
validates every key and refuses a bad table with a `FareTableError` naming the file, the key path and
the problem. Loading precomputes the metro fare of every pair of stations (shortest path along the
lines through interchanges), so that the fare engine (`fares.fare`) does no search and no I/O.

Money is in integer fen everywhere; distances are integer metres (kilometres in the file are rounded
to the metre once, at load time). The local day uses the table's fixed UTC offset (UTC+8 for
Chongqing), no time-zone database. Everything here is re-exported by `cardsvc.transit.fares`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import math
import os
import re
import tomllib
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

from protocols.clearing import OPERATOR_ID_RE

# A journey open longer than a day is not one, and a charged entry must outlive its timeout in the card's
# memory of unpaired taps (fares.UNPAIRED_KEEP_S, 7 days), or its exit, arriving in time, would be charged
# a second time.
JOURNEY_TIMEOUT_S_MAX = 86400

__all__ = [
    "DEMO_TABLE_PATH",
    "JOURNEY_TIMEOUT_S_MAX",
    "BusLine",
    "FareInputError",
    "FareRules",
    "FareTable",
    "FareTableError",
    "MetroLine",
    "Operator",
    "Station",
    "band_fare_fen",
    "card_price_fen",
    "elderly_quota_for_year",
    "half_price_fen",
    "journey_place",
    "load_demo_table",
    "load_table",
    "local_day",
    "metro_distance_m",
    "metro_fare_fen",
    "parse_table",
    "station_line",
]

DEMO_TABLE_PATH = Path(__file__).resolve().parent / "tables" / "chongqing-demo.toml"

MODES: frozenset[str] = frozenset({"bus", "metro"})
# Line and station ids travel in validator records (protocols/transit.md: line_id, station_id).
_ID = re.compile(r"[A-Za-z0-9._-]{1,16}")
EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
KM_MAX = 10_000  # kilometres: a position or band limit beyond this is a typo (and would overflow as metres)


# --------------------------------------------------------------------------------------------------
# Errors


class FareTableError(ValueError):
    """A fare table file is refused: `file`, the key `path` inside it, and the `problem`."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        self.file = file
        self.path = path
        self.problem = problem
        super().__init__(f"{file}: {path}: {problem}")


class FareInputError(ValueError):
    """A tap, a concession or a stored state does not fit the fare table (unknown line, station...)."""


# --------------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True, slots=True)
class Operator:
    id: str
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class BusLine:
    id: str
    name: str
    operator: str
    fare_fen: int


@dataclasses.dataclass(frozen=True, slots=True)
class MetroLine:
    id: str
    name: str
    operator: str
    stations: tuple[str, ...]  # in route order, km strictly increasing


@dataclasses.dataclass(frozen=True, slots=True)
class Station:
    id: str
    name: str
    line: str
    km_m: int  # position along its line, metres
    interchange: str | None  # stations sharing an interchange id are the same place


@dataclasses.dataclass(frozen=True, slots=True)
class FareRules:
    card_discount_percent: int  # 10 -> the card holder pays 90 % of the base fare
    transfer_window_s: int
    transfer_discount_max_fen: int
    transfer_pairs: frozenset[tuple[str, str]]  # (mode of the first ride, mode of the next ride)
    journey_timeout_s: int  # an open metro journey older than this is a missing tap-out
    utc_offset_s: int  # fixed offset of local time (daily cap day), e.g. 8 * 3600
    daily_cap_fen: int | None  # None: no daily cap
    elderly_annual_quota: int
    elderly_extra_quota: int
    elderly_min_age: int = 65  # the card office registers the elderly concession from this age


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class FareTable:
    source: str
    version: str
    effective_from: dt.date
    rules: FareRules
    operators: Mapping[str, Operator]
    bus_lines: Mapping[str, BusLine]
    metro_lines: Mapping[str, MetroLine]
    stations: Mapping[str, Station]
    bands: tuple[tuple[int, int], ...]  # (up_to_m, fare_fen), ascending
    cap_fen: int  # metro fare beyond the last band = the maximum fare (missing tap-out charge)
    # Precomputed at load time.
    station_place: Mapping[str, int]  # station id -> place index (interchange groups share one)
    station_operator: Mapping[str, str]
    place_lines: tuple[frozenset[str], ...]  # metro lines serving each place
    distance_m: tuple[tuple[int, ...], ...]  # [place][place] shortest distance along the lines
    fare_matrix: tuple[tuple[int, ...], ...]  # [place][place] base metro fare, fen
    # Stations closed since an earlier table (`metro.retired`): id -> the station of this table that a
    # stored journey entered there is priced and cleared as. No tap is accepted at a retired station.
    retired: Mapping[str, str] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Loading and validation


class _Checker:
    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, problem: str) -> FareTableError:
        return FareTableError(self.file, path or "(top level)", problem)

    def table(self, value: object, path: str) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a table, got {_kind(value)}")
        return cast(dict[str, object], value)

    def keys(
        self, d: Mapping[str, object], path: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> None:
        for key in required:
            if key not in d:
                raise self.fail(_join(path, key), "missing required key")
        allowed = set(required) | set(optional)
        for key in d:
            if key not in allowed:
                raise self.fail(_join(path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def array(self, value: object, path: str) -> list[object]:
        if not isinstance(value, list):
            raise self.fail(path, f"must be an array, got {_kind(value)}")
        return cast(list[object], value)

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"must be a non-empty string, got {_kind(value)}")
        return value

    def ident(self, value: object, path: str) -> str:
        text = self.string(value, path)
        if not _ID.fullmatch(text):
            raise self.fail(
                path, f"must be 1-16 characters of A-Z a-z 0-9 . _ - (as in validator records), got {text!r}"
            )
        return text

    def integer(
        self, value: object, path: str, *, minimum: int, maximum: int | None = None, unit: str
    ) -> int:
        if isinstance(value, float):
            raise self.fail(path, f"must be an integer number of {unit}, got the float {value!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer number of {unit}, got {_kind(value)}")
        if value < minimum:
            raise self.fail(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(path, f"must be <= {maximum}, got {value}")
        return value

    def metres(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, f"must be a number of kilometres, got {_kind(value)}")
        if not math.isfinite(value) or not 0 <= value <= KM_MAX:
            raise self.fail(path, f"must be a number of kilometres from 0 to {KM_MAX}, got {value!r}")
        return round(value * 1000)


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load_table(path: str | os.PathLike[str]) -> FareTable:
    """Read, parse and validate one fare table file; `FareTableError` when it is refused."""
    file = os.fspath(path)
    try:
        raw = Path(file).read_bytes()
    except OSError as e:
        raise FareTableError(file, "(file)", f"cannot read: {e.strerror or e}") from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FareTableError(file, "(file)", f"not UTF-8: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise FareTableError(file, "(syntax)", f"invalid TOML: {e}") from e
    return parse_table(data, source=file)


def load_demo_table() -> FareTable:
    """The Chongqing demo table shipped with the project (tables/chongqing-demo.toml)."""
    return load_table(DEMO_TABLE_PATH)


def parse_table(data: Mapping[str, object], source: str = "<memory>") -> FareTable:
    """Validate an already parsed table (the TOML document as a dict); `source` names it in errors."""
    c = _Checker(source)
    top = c.table(dict(data), "")
    c.keys(top, "", ["version", "effective_from", "rules", "operators", "bus_lines", "metro"], ["name"])
    if "name" in top:
        c.string(top["name"], "name")
    version = c.string(top["version"], "version")
    eff = top["effective_from"]
    if not isinstance(eff, dt.date) or isinstance(eff, dt.datetime):
        raise c.fail("effective_from", f"must be a TOML local date (2026-11-01), got {_kind(eff)}")
    rules = _parse_rules(c, top["rules"])

    operators: dict[str, Operator] = {}
    for i, item in enumerate(c.array(top["operators"], "operators")):
        p = f"operators[{i}]"
        o = c.table(item, p)
        c.keys(o, p, ["id", "name"])
        oid = c.string(o["id"], f"{p}.id")
        if not OPERATOR_ID_RE.fullmatch(oid):  # else no clearing file could carry its money
            raise c.fail(f"{p}.id", f"must be 1-16 characters of A-Z a-z 0-9 _ - (as in clearing files), got {oid!r}")
        if oid in operators:
            raise c.fail(f"{p}.id", f"duplicate operator id {oid!r}")
        operators[oid] = Operator(oid, c.string(o["name"], f"{p}.name"))
    if not operators:
        raise c.fail("operators", "at least one operator is required")

    def operator_ref(value: object, path: str) -> str:
        oid = c.string(value, path)
        if oid not in operators:
            raise c.fail(path, f"unknown operator {oid!r} (declared: {', '.join(sorted(operators))})")
        return oid

    line_ids: set[str] = set()
    bus_lines: dict[str, BusLine] = {}
    for i, item in enumerate(c.array(top["bus_lines"], "bus_lines")):
        p = f"bus_lines[{i}]"
        b = c.table(item, p)
        c.keys(b, p, ["id", "name", "operator", "fare_fen"])
        lid = c.ident(b["id"], f"{p}.id")
        if lid in line_ids:
            raise c.fail(f"{p}.id", f"duplicate line id {lid!r}")
        line_ids.add(lid)
        bus_lines[lid] = BusLine(
            lid,
            c.string(b["name"], f"{p}.name"),
            operator_ref(b["operator"], f"{p}.operator"),
            c.integer(b["fare_fen"], f"{p}.fare_fen", minimum=0, unit="fen"),
        )

    metro = c.table(top["metro"], "metro")
    c.keys(metro, "metro", ["cap_fen", "bands", "lines", "stations"], ["retired"])
    cap_fen = c.integer(metro["cap_fen"], "metro.cap_fen", minimum=1, unit="fen")
    bands: list[tuple[int, int]] = []
    for i, item in enumerate(c.array(metro["bands"], "metro.bands")):
        p = f"metro.bands[{i}]"
        b = c.table(item, p)
        c.keys(b, p, ["up_to_km", "fare_fen"])
        up_to = c.metres(b["up_to_km"], f"{p}.up_to_km")
        band_fare = c.integer(b["fare_fen"], f"{p}.fare_fen", minimum=0, unit="fen")
        if up_to <= 0:
            raise c.fail(f"{p}.up_to_km", "must be > 0")
        if bands and up_to <= bands[-1][0]:
            raise c.fail(
                f"{p}.up_to_km",
                f"bands must be strictly ascending: {up_to / 1000:g} km after {bands[-1][0] / 1000:g} km",
            )
        if bands and band_fare < bands[-1][1]:
            raise c.fail(f"{p}.fare_fen", f"band fares must not decrease: {band_fare} after {bands[-1][1]}")
        if band_fare > cap_fen:
            raise c.fail(f"{p}.fare_fen", f"band fare {band_fare} exceeds metro.cap_fen {cap_fen}")
        bands.append((up_to, band_fare))
    if not bands:
        raise c.fail("metro.bands", "at least one band is required")

    # Stations first (lines refer to them), then lines.
    stations: dict[str, Station] = {}
    station_paths: dict[str, str] = {}
    raw_stations = c.array(metro["stations"], "metro.stations")
    raw_lines = c.array(metro["lines"], "metro.lines")
    metro_line_ids: set[str] = set()
    for i, item in enumerate(raw_lines):
        p = f"metro.lines[{i}]"
        line_item = c.table(item, p)
        c.keys(line_item, p, ["id", "name", "operator", "stations"])
        lid = c.ident(line_item["id"], f"{p}.id")
        if lid in line_ids or lid in metro_line_ids:
            raise c.fail(f"{p}.id", f"duplicate line id {lid!r}")
        metro_line_ids.add(lid)
    for i, item in enumerate(raw_stations):
        p = f"metro.stations[{i}]"
        s = c.table(item, p)
        c.keys(s, p, ["id", "name", "line", "km"], ["interchange"])
        sid = c.ident(s["id"], f"{p}.id")
        if sid in stations:
            raise c.fail(f"{p}.id", f"duplicate station id {sid!r}")
        line = c.string(s["line"], f"{p}.line")
        if line not in metro_line_ids:
            raise c.fail(f"{p}.line", f"unknown metro line {line!r}")
        group = c.string(s["interchange"], f"{p}.interchange") if "interchange" in s else None
        stations[sid] = Station(
            sid, c.string(s["name"], f"{p}.name"), line, c.metres(s["km"], f"{p}.km"), group
        )
        station_paths[sid] = p

    metro_lines: dict[str, MetroLine] = {}
    listed: dict[str, str] = {}
    for i, item in enumerate(raw_lines):
        p = f"metro.lines[{i}]"
        m = c.table(item, p)
        c.keys(m, p, ["id", "name", "operator", "stations"])
        lid = c.string(m["id"], f"{p}.id")
        if lid in line_ids:
            raise c.fail(f"{p}.id", f"duplicate line id {lid!r}")
        line_ids.add(lid)
        ids: list[str] = []
        for j, ref in enumerate(c.array(m["stations"], f"{p}.stations")):
            sp = f"{p}.stations[{j}]"
            sid = c.string(ref, sp)
            if sid not in stations:
                raise c.fail(sp, f"unknown station {sid!r}")
            if sid in listed:
                raise c.fail(sp, f"station {sid!r} is already listed by line {listed[sid]!r}")
            if stations[sid].line != lid:
                raise c.fail(sp, f"station {sid!r} declares line {stations[sid].line!r}, not {lid!r}")
            if ids and stations[sid].km_m <= stations[ids[-1]].km_m:
                raise c.fail(
                    sp,
                    f"km must increase along the line: {sid!r} at {stations[sid].km_m / 1000:g} km "
                    f"after {ids[-1]!r} at {stations[ids[-1]].km_m / 1000:g} km",
                )
            listed[sid] = lid
            ids.append(sid)
        if len(ids) < 2:
            raise c.fail(f"{p}.stations", "a metro line needs at least two stations")
        metro_lines[lid] = MetroLine(
            lid, c.string(m["name"], f"{p}.name"), operator_ref(m["operator"], f"{p}.operator"), tuple(ids)
        )
    if not metro_lines:
        raise c.fail("metro.lines", "at least one metro line is required")
    for sid, st in stations.items():
        if sid not in listed:
            raise c.fail(f"{station_paths[sid]}.id", f"station {sid!r} is not listed in line {st.line!r}")

    # Places: an interchange group is one place.
    groups: dict[str, list[str]] = {}
    for sid, st in stations.items():
        if st.interchange is not None:
            groups.setdefault(st.interchange, []).append(sid)
    for gid, members in groups.items():
        first = station_paths[members[0]]
        if len(members) < 2:
            raise c.fail(f"{first}.interchange", f"interchange group {gid!r} has only one station")
        seen_lines: set[str] = set()
        for sid in members:
            if stations[sid].line in seen_lines:
                raise c.fail(
                    f"{station_paths[sid]}.interchange",
                    f"interchange group {gid!r} has two stations on line {stations[sid].line!r}",
                )
            seen_lines.add(stations[sid].line)
    station_place: dict[str, int] = {}
    place_of_group: dict[str, int] = {}
    place_lines_l: list[set[str]] = []
    for sid, st in stations.items():
        if st.interchange is None:
            idx = len(place_lines_l)
            place_lines_l.append(set())
        elif st.interchange in place_of_group:
            idx = place_of_group[st.interchange]
        else:
            idx = place_of_group[st.interchange] = len(place_lines_l)
            place_lines_l.append(set())
        station_place[sid] = idx
        place_lines_l[idx].add(st.line)

    n = len(place_lines_l)
    adjacency: list[dict[int, int]] = [{} for _ in range(n)]
    for mline in metro_lines.values():
        for sa, sb in zip(mline.stations, mline.stations[1:], strict=False):
            pa, pb = station_place[sa], station_place[sb]
            w = stations[sb].km_m - stations[sa].km_m
            if pa == pb:  # cannot happen: an interchange group has one station per line
                continue
            if w < adjacency[pa].get(pb, w + 1):
                adjacency[pa][pb] = w
                adjacency[pb][pa] = w
    distance = _all_pairs(adjacency)
    for sid, p_idx in station_place.items():
        if distance[0][p_idx] < 0:
            origin = next(s for s, q in station_place.items() if q == 0)
            raise c.fail(
                f"{station_paths[sid]}.id",
                f"metro network is not connected: station {sid!r} cannot be reached from {origin!r}",
            )
    retired = _parse_retired(c, metro.get("retired", []), stations)
    band_limits = [b[0] for b in bands]
    fare_matrix = tuple(tuple(_band(bands, band_limits, cap_fen, d) for d in row) for row in distance)

    return FareTable(
        source=source,
        version=version,
        effective_from=eff,
        rules=rules,
        operators=operators,
        bus_lines=bus_lines,
        metro_lines=metro_lines,
        stations=stations,
        bands=tuple(bands),
        cap_fen=cap_fen,
        station_place=station_place,
        station_operator={sid: metro_lines[st.line].operator for sid, st in stations.items()},
        place_lines=tuple(frozenset(s) for s in place_lines_l),
        distance_m=tuple(tuple(row) for row in distance),
        fare_matrix=fare_matrix,
        retired=retired,
    )


def _parse_retired(c: _Checker, value: object, stations: Mapping[str, Station]) -> dict[str, str]:
    """`metro.retired`: stations an earlier table had, each priced as a station of this one."""
    retired: dict[str, str] = {}
    for i, item in enumerate(c.array(value, "metro.retired")):
        p = f"metro.retired[{i}]"
        r = c.table(item, p)
        c.keys(r, p, ["id", "priced_as"], ["name"])
        rid = c.ident(r["id"], f"{p}.id")
        if rid in stations:
            raise c.fail(f"{p}.id", f"station {rid!r} is in metro.stations: a retired station is not served")
        if rid in retired:
            raise c.fail(f"{p}.id", f"duplicate retired station {rid!r}")
        if "name" in r:
            c.string(r["name"], f"{p}.name")
        target = c.string(r["priced_as"], f"{p}.priced_as")
        if target not in stations:
            raise c.fail(f"{p}.priced_as", f"unknown station {target!r}: it must be a station of this table")
        retired[rid] = target
    return retired


def _parse_rules(c: _Checker, value: object) -> FareRules:
    r = c.table(value, "rules")
    c.keys(
        r,
        "rules",
        [
            "card_discount_percent",
            "transfer_window_s",
            "transfer_discount_max_fen",
            "transfer_pairs",
            "journey_timeout_s",
            "utc_offset_minutes",
            "elderly_annual_quota",
            "elderly_extra_quota",
        ],
        ["daily_cap_fen", "elderly_min_age"],
    )
    pairs: set[tuple[str, str]] = set()
    for i, item in enumerate(c.array(r["transfer_pairs"], "rules.transfer_pairs")):
        p = f"rules.transfer_pairs[{i}]"
        text = c.string(item, p)
        first, sep, second = text.partition("-")
        if not sep or first not in MODES or second not in MODES:
            raise c.fail(p, f"must be 'mode-mode' with modes bus or metro (e.g. 'bus-metro'), got {text!r}")
        if (first, second) in pairs:
            raise c.fail(p, f"duplicate transfer pair {text!r}")
        pairs.add((first, second))
    cap = r.get("daily_cap_fen")
    return FareRules(
        card_discount_percent=c.integer(
            r["card_discount_percent"], "rules.card_discount_percent", minimum=0, maximum=100, unit="percent"
        ),
        transfer_window_s=c.integer(
            r["transfer_window_s"], "rules.transfer_window_s", minimum=1, unit="seconds"
        ),
        transfer_discount_max_fen=c.integer(
            r["transfer_discount_max_fen"], "rules.transfer_discount_max_fen", minimum=0, unit="fen"
        ),
        transfer_pairs=frozenset(pairs),
        journey_timeout_s=c.integer(
            r["journey_timeout_s"], "rules.journey_timeout_s", minimum=1, maximum=JOURNEY_TIMEOUT_S_MAX,
            unit="seconds"
        ),
        utc_offset_s=60
        * c.integer(
            r["utc_offset_minutes"], "rules.utc_offset_minutes", minimum=-720, maximum=840, unit="minutes"
        ),
        daily_cap_fen=None if cap is None else c.integer(cap, "rules.daily_cap_fen", minimum=1, unit="fen"),
        elderly_annual_quota=c.integer(
            r["elderly_annual_quota"], "rules.elderly_annual_quota", minimum=0, unit="rides"
        ),
        elderly_extra_quota=c.integer(
            r["elderly_extra_quota"], "rules.elderly_extra_quota", minimum=0, unit="rides"
        ),
        elderly_min_age=c.integer(
            r.get("elderly_min_age", 65), "rules.elderly_min_age", minimum=0, maximum=130, unit="years"
        ),
    )


def _all_pairs(adjacency: list[dict[int, int]]) -> list[list[int]]:
    """Dijkstra from every place (the graph is sparse: a few edges per place). -1 = unreachable."""
    n = len(adjacency)
    edges = [tuple(a.items()) for a in adjacency]
    result: list[list[int]] = []
    push, pop = heapq.heappush, heapq.heappop
    for source in range(n):
        dist = [-1] * n
        heap = [(0, source)]
        while heap:
            d, u = pop(heap)
            if dist[u] >= 0:
                continue
            dist[u] = d
            for v, w in edges[u]:
                if dist[v] < 0:
                    push(heap, (d + w, v))
        result.append(dist)
    return result


def _band(bands: Sequence[tuple[int, int]], limits: Sequence[int], cap_fen: int, distance_m: int) -> int:
    i = bisect_left(limits, distance_m)  # first band whose upper limit is >= the distance (inclusive)
    return bands[i][1] if i < len(bands) else cap_fen


def band_fare_fen(table: FareTable, distance_m: int) -> int:
    """The metro fare for a distance: the first band with distance <= up_to (inclusive), else the cap."""
    return _band(table.bands, [b[0] for b in table.bands], table.cap_fen, distance_m)


def place_of(table: FareTable, station: str) -> int:
    """The index of a station's place (an interchange's stations share one) in the fare matrices."""
    try:
        return table.station_place[station]
    except KeyError:
        raise FareInputError(f"unknown metro station {station!r} in fare table {table.version}") from None


def journey_place(table: FareTable, station: str) -> int:
    """The place of a station a stored journey or unpaired tap refers to: a station of the table, or a
    retired one (`metro.retired`), priced as its `priced_as` station."""
    try:
        return table.station_place[table.retired.get(station, station)]
    except KeyError:
        raise FareInputError(
            f"metro station {station!r} of a stored journey is not in fare table {table.version}: "
            "list it under metro.retired (docs/fares.md \"Closing a station\")"
        ) from None


def station_line(table: FareTable, station: str) -> str | None:
    """The line a journey at a station (current or retired) is cleared under; None if the table does
    not know the station."""
    st = table.stations.get(table.retired.get(station, station))
    return None if st is None else st.line


def metro_distance_m(table: FareTable, a: str, b: str) -> int:
    """Shortest distance in metres between two stations, along the lines and through interchanges."""
    return table.distance_m[place_of(table, a)][place_of(table, b)]


def metro_fare_fen(table: FareTable, a: str, b: str) -> int:
    """The base (full) metro fare between two stations, before any discount."""
    return table.fare_matrix[place_of(table, a)][place_of(table, b)]


def card_price_fen(base_fen: int, discount_percent: int) -> int:
    """Base fare with the card discount: base * (100 - p) / 100, rounded half up to the fen."""
    return (base_fen * (100 - discount_percent) + 50) // 100


def half_price_fen(base_fen: int) -> int:
    """Half fare, rounded half up to the fen (151 -> 76)."""
    return (base_fen + 1) // 2


def local_day(table: FareTable, time_s: int) -> dt.date:
    """The local calendar date of a unix time under the table's fixed UTC offset."""
    return dt.date.fromordinal(EPOCH_ORDINAL + (time_s + table.rules.utc_offset_s) // 86400)


def elderly_quota_for_year(table: FareTable, *, extra_granted: bool) -> int:
    """A holder's elderly free rides for a calendar year (the caller keeps and resets the counter)."""
    r = table.rules
    return r.elderly_annual_quota + (r.elderly_extra_quota if extra_granted else 0)


