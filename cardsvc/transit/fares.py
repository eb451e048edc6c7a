"""The fare engine (DOMAIN.md §5; the rules are specified in docs/fares.md); the fare tables it reads
are in `fare_table.py`, whose names this module re-exports.

`fare(table, state, tap, concession) -> Decision` is a pure function: the holder's journey state
before the tap goes in, the amount to charge and the new state come out. The caller stores the state
(`JourneyState.to_dict()` / `to_json()`, one small JSON value per card) and the holder's elderly ride
quota, which is shared by all of the holder's credentials and therefore not part of a card's state.

Money is in integer fen everywhere. Times are unix seconds; the local day (daily cap) uses the table's
fixed UTC offset (UTC+8 for Chongqing), no time-zone database.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal, cast

from .fare_table import (
    DEMO_TABLE_PATH,
    EPOCH_ORDINAL,
    JOURNEY_TIMEOUT_S_MAX,
    MODES,
    BusLine,
    FareInputError,
    FareRules,
    FareTable,
    FareTableError,
    MetroLine,
    Operator,
    Station,
    band_fare_fen,
    card_price_fen,
    elderly_quota_for_year,
    half_price_fen,
    journey_place,
    load_demo_table,
    load_table,
    local_day,
    metro_distance_m,
    metro_fare_fen,
    parse_table,
    place_of,
    station_line,
)

__all__ = [
    "DEMO_TABLE_PATH",
    "EMPTY_STATE",
    "NO_CONCESSION",
    "RULE_NAMES",
    "BusLine",
    "Concession",
    "ConcessionKind",
    "Decision",
    "Direction",
    "FareInputError",
    "FareRules",
    "FareTable",
    "FareTableError",
    "JourneyState",
    "MetroLine",
    "Mode",
    "OpenJourney",
    "Operator",
    "Penalty",
    "Refund",
    "Station",
    "Tap",
    "TransferWindow",
    "UnpairedTap",
    "band_fare_fen",
    "card_price_fen",
    "charge_held_exits",
    "close_open_journey",
    "elderly_quota_for_year",
    "fare",
    "first_due",
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

Mode = Literal["bus", "metro"]
Direction = Literal["single", "in", "out"]
ConcessionKind = Literal["none", "elderly", "disabled_free", "disabled_half"]

# Rule names reported in Decision.rules (stable strings: receipts and statistics use them).
R_BUS = "bus_flat_fare"
R_METRO = "metro_distance_fare"
R_ENTRY = "metro_entry"
R_SAME_STATION = "same_station_exit"
R_CARD = "card_discount"
R_TRANSFER = "transfer_discount"
R_CAP = "daily_cap"
R_ELDERLY = "elderly_free"
R_ELDERLY_EXHAUSTED = "elderly_quota_exhausted"
R_DISABLED_FREE = "disabled_free"
R_DISABLED_HALF = "disabled_half"
R_MISSING_OUT = "missing_tap_out"
R_MISSING_IN = "missing_tap_in"
R_TIMEOUT = "journey_timeout"
R_AFTER_SWEEP = "exit_of_swept_journey"  # the exit of a journey the sweep already charged: nothing more
R_RIDE_MAX = "ride_code_max_fare"
# An uploaded tap older than the card's newest known tap (docs/fares.md "Late uploads"):
R_LATE = "late_upload"  # priced on its own: no transfer, no effect on the open journey
R_ENTRY_OF_CHARGED_EXIT = "entry_of_charged_exit"  # the entry of an exit already charged the maximum fare
R_EXIT_OF_CHARGED_JOURNEY = "exit_of_charged_journey"  # the exit of a journey already charged the maximum fare
R_EXIT_HELD = "exit_held"  # an uploaded exit without entry: held for its entry, charged nothing yet
R_ENTRY_OF_HELD_EXIT = "entry_of_held_exit"  # the entry of a held exit: the ride is priced from the two
R_EXIT_AFTER_STOP = "exit_after_stop"  # an exit after its card stopped that no journey before the stop can take
RULE_NAMES = frozenset(
    {
        R_BUS,
        R_METRO,
        R_ENTRY,
        R_SAME_STATION,
        R_CARD,
        R_TRANSFER,
        R_CAP,
        R_ELDERLY,
        R_ELDERLY_EXHAUSTED,
        R_DISABLED_FREE,
        R_DISABLED_HALF,
        R_MISSING_OUT,
        R_MISSING_IN,
        R_TIMEOUT,
        R_AFTER_SWEEP,
        R_RIDE_MAX,
        R_LATE,
        R_ENTRY_OF_CHARGED_EXIT,
        R_EXIT_OF_CHARGED_JOURNEY,
        R_EXIT_HELD,
        R_ENTRY_OF_HELD_EXIT,
        R_EXIT_AFTER_STOP,
    }
)

_STATE_VERSION = 1
# Unpaired metro taps a card's state keeps (see JourneyState.unpaired): at most this many, the newest,
# and none older than UNPAIRED_KEEP_S before the card's newest tap.
UNPAIRED_MAX = 4
UNPAIRED_KEEP_S = 7 * 86400
assert JOURNEY_TIMEOUT_S_MAX < UNPAIRED_KEEP_S  # a charged entry outlives its journey's timeout


# --------------------------------------------------------------------------------------------------
# Journey state


@dataclasses.dataclass(frozen=True, slots=True)
class OpenJourney:
    station: str  # entry station id
    time: int  # entry time, unix seconds
    operator: str  # operator credited for the journey (the entry station's line operator)
    # The entry credential's per-ride limit (a ride code's max_fare_fen): the journey, and a penalty
    # for it (even the sweep's), is never charged more. Stored only when set.
    max_fare_fen: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class UnpairedTap:
    """A metro tap whose other half has not been seen, kept for that half arriving late (gates upload
    independently; docs/fares.md "Late uploads"):

    - `out`, charged: an exit without entry, charged the maximum fare (`missing_tap_in`, `charged_fen`);
      its entry, uploaded later, gives that charge back and prices the ride from the two (`Refund`);
    - `out`, not charged (**held**): an uploaded exit without entry, charged nothing yet. Its entry,
      uploaded later within the journey timeout before it, prices the ride. Once the exit is
      `journey_timeout_s` old (`charge_held_exits`: the card's next tap in order, or the sweep) it is
      charged the maximum fare and becomes a charged `out`;
    - `in`, charged: the entry of a journey charged the maximum fare without its exit (missing tap-out
      at the card's next tap, a timed-out exit, or the sweep); its exit, uploaded later within the
      journey timeout, gives that charge back and prices the ride (`Refund`; at the timeout or after, it
      costs nothing more). Its exit must come before `until` (the tap that charged it: the rider left before that
      tap) and within the journey timeout. Once an exit has ended it (`pair_station`: the exit at
      `until`), an earlier exit that fits is the better one: it takes the journey, and the exit it
      displaces is charged as an exit without entry;
    - `in`, not charged: an uploaded entry older than the card's newest tap, which could not open the
      journey (the card had moved on); its exit, arriving later, prices the ride."""

    direction: Literal["in", "out"]
    station: str
    time: int
    operator: str
    max_fare_fen: int | None = None  # an `in`'s credential limit (see OpenJourney)
    charged: bool = True
    until: int | None = None  # a charged `in`: its exit is before this time; a held `out`: its entry is
    pair_station: str | None = None  # a charged `in`: the station of the exit at `until` that ended it
    pair_max_fare_fen: int | None = None  # that exit's credential limit
    # A charged tap: what its penalty cost (an `out`'s `missing_tap_in`; an `in`'s `missing_tap_out` or
    # `journey_timeout`), given back when its other half comes in time (`Refund`), and the time its journal
    # row is dated (`charged_at`: the tap that charged it, or for the sweep the moment it fell due), which
    # names that row. Both None once given back, and in states stored before they were kept: the other
    # half then costs nothing more and gets nothing back.
    charged_fen: int | None = None
    charged_at: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TransferWindow:
    start: int  # bus tap time or metro exit time of the ride that opened the window
    first_fare_fen: int  # what that ride was charged
    mode: Mode  # mode of that ride
    discount_used: bool


def _journey_dict(j: OpenJourney) -> dict[str, object]:
    out: dict[str, object] = {"station": j.station, "time": j.time, "operator": j.operator}
    if j.max_fare_fen is not None:
        out["max_fare_fen"] = j.max_fare_fen
    return out


_JOURNEY_KEYS = {"station", "time", "operator"}


def _limit_from(j: Mapping[str, object], name: str) -> int | None:
    return None if "max_fare_fen" not in j else _int(j["max_fare_fen"], f"{name}.max_fare_fen", minimum=0)


def _journey_from(data: object, name: str) -> OpenJourney:
    j = _obj(data, name, _JOURNEY_KEYS, optional={"max_fare_fen"})
    return OpenJourney(
        _str(j, f"{name}.station"), _int(j["time"], f"{name}.time"), _str(j, f"{name}.operator"), _limit_from(j, name)
    )


def _unpaired_dict(u: UnpairedTap) -> dict[str, object]:
    out: dict[str, object] = {
        "direction": u.direction,
        "station": u.station,
        "time": u.time,
        "operator": u.operator,
        "charged": u.charged,
    }
    if u.max_fare_fen is not None:
        out["max_fare_fen"] = u.max_fare_fen
    for key in _PAIR_KEYS:
        value = getattr(u, key)
        if value is not None:
            out[key] = value
    if u.charged_fen is not None:
        out["charged_fen"] = u.charged_fen
        out["charged_at"] = u.charged_at
    return out


_PAIR_KEYS = ("until", "pair_station", "pair_max_fare_fen")
_CHARGE_KEYS = ("charged_fen", "charged_at")


def _unpaired_from(data: object) -> tuple[UnpairedTap, ...]:
    if not isinstance(data, list) or not 0 < len(data) <= UNPAIRED_MAX:
        raise FareInputError(f"journey state unpaired must be a list of 1 to {UNPAIRED_MAX} taps")
    out = []
    for i, item in enumerate(data):
        name = f"unpaired[{i}]"
        u = _obj(
            item, name, _JOURNEY_KEYS | {"direction", "charged"}, optional={"max_fare_fen", *_CHARGE_KEYS, *_PAIR_KEYS}
        )
        direction, charged = u["direction"], u["charged"]
        if direction not in ("in", "out"):
            raise FareInputError(f"journey state {name}.direction must be 'in' or 'out'")
        if not isinstance(charged, bool):
            raise FareInputError(f"journey state {name}.charged must be a boolean")
        pair = {k: u[k] for k in _PAIR_KEYS if k in u}
        held_until = direction == "out" and not charged and set(pair) == {"until"}  # a held exit after a stop
        if pair and not held_until and (direction != "in" or not charged or ("pair_station" in pair) > ("until" in pair)):
            raise FareInputError(f"journey state {name}: a pairing belongs to a charged 'in' with `until`")
        if "pair_station" not in pair and "pair_max_fare_fen" in pair:
            raise FareInputError(f"journey state {name}: pair_max_fare_fen without pair_station")
        if ("charged_fen" in u or "charged_at" in u) and not charged:
            raise FareInputError(f"journey state {name}: charged_fen and charged_at belong to a charged tap")
        known = "charged_fen" in u and "charged_at" in u  # (a charged_fen alone: written before charged_at)
        out.append(
            UnpairedTap(
                direction,
                _str(u, f"{name}.station"),
                _int(u["time"], f"{name}.time"),
                _str(u, f"{name}.operator"),
                _limit_from(u, name),
                charged,
                None if "until" not in u else _int(u["until"], f"{name}.until"),
                None if "pair_station" not in u else _str(u, f"{name}.pair_station"),
                None if "pair_max_fare_fen" not in u else _int(u["pair_max_fare_fen"], f"{name}.pair_max_fare_fen", minimum=0),
                _int(u["charged_fen"], f"{name}.charged_fen", minimum=0) if known else None,
                _int(u["charged_at"], f"{name}.charged_at") if known else None,
            )
        )
    return tuple(out)


@dataclasses.dataclass(frozen=True, slots=True)
class JourneyState:
    """A card's fare state between taps. `day` is the local day number (days since 1970-01-01 local)."""

    journey: OpenJourney | None = None
    window: TransferWindow | None = None
    day: int | None = None
    day_charged_fen: int = 0  # fares charged on `day` (penalties are not counted)
    # The journey `close_open_journey` closed and charged, until the card's next tap: if that tap is an
    # exit, it ends this journey, already paid, instead of being an exit without entry. Stored only when
    # set (an optional key of the same state version).
    swept: OpenJourney | None = None
    # Metro taps waiting for their other half (UnpairedTap), oldest first: gates upload independently,
    # so a ride's exit may be priced before its entry arrives. Stored only when not empty.
    unpaired: tuple[UnpairedTap, ...] = ()
    # The time of the card's newest tap when the fields above do not show it (`_newest`): what tells a
    # late upload. Stored only when set.
    latest: int | None = None

    def to_dict(self) -> dict[str, object]:
        j, w = self.journey, self.window
        out: dict[str, object] = {
            "v": _STATE_VERSION,
            "journey": None if j is None else _journey_dict(j),
            "window": None
            if w is None
            else {
                "start": w.start,
                "first_fare_fen": w.first_fare_fen,
                "mode": w.mode,
                "discount_used": w.discount_used,
            },
            "day": None if self.day is None else dt.date.fromordinal(EPOCH_ORDINAL + self.day).isoformat(),
            "day_charged_fen": self.day_charged_fen,
        }
        if self.swept is not None:
            out["swept"] = _journey_dict(self.swept)
        if self.unpaired:
            out["unpaired"] = [_unpaired_dict(u) for u in self.unpaired]
        if self.latest is not None:
            out["latest"] = self.latest
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> JourneyState:
        """Parse a stored state; `FareInputError` on anything malformed (never a half-valid state)."""
        if not isinstance(data, Mapping):
            raise FareInputError("journey state must be an object")
        keys = {"v", "journey", "window", "day", "day_charged_fen"}
        if not keys <= set(data) <= keys | {"swept", "unpaired", "latest"}:
            raise FareInputError(f"journey state has keys {sorted(data)}")
        if type(data["v"]) is not int or data["v"] != _STATE_VERSION:  # not True, not 1.0
            raise FareInputError(f"journey state version {data['v']!r} is not {_STATE_VERSION}")
        journey = None if data["journey"] is None else _journey_from(data["journey"], "journey")
        swept = None if data.get("swept") is None else _journey_from(data["swept"], "swept")
        unpaired = () if "unpaired" not in data else _unpaired_from(data["unpaired"])
        latest = None if "latest" not in data else _int(data["latest"], "latest")
        window: TransferWindow | None = None
        if data["window"] is not None:
            w = _obj(data["window"], "window", {"start", "first_fare_fen", "mode", "discount_used"})
            mode = w["mode"]
            if mode not in MODES:
                raise FareInputError(f"journey state window.mode {mode!r} is not bus or metro")
            used = w["discount_used"]
            if not isinstance(used, bool):
                raise FareInputError("journey state window.discount_used must be a boolean")
            window = TransferWindow(
                _int(w["start"], "window.start"),
                _int(w["first_fare_fen"], "window.first_fare_fen", minimum=0),
                cast(Mode, mode),
                used,
            )
        day: int | None = None
        if data["day"] is not None:
            if not isinstance(data["day"], str):
                raise FareInputError("journey state day must be an ISO date string or null")
            try:
                day = dt.date.fromisoformat(data["day"]).toordinal() - EPOCH_ORDINAL
            except ValueError as e:
                raise FareInputError(f"journey state day: {e}") from None
        return cls(
            journey, window, day, _int(data["day_charged_fen"], "day_charged_fen", minimum=0), swept, unpaired, latest
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> JourneyState:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise FareInputError(f"journey state is not JSON: {e}") from None
        return cls.from_dict(data)


def _obj(
    value: object, name: str, keys: set[str], optional: AbstractSet[str] = frozenset()
) -> Mapping[str, object]:
    if not isinstance(value, Mapping) or not keys <= set(value) <= keys | optional:
        extra = f" (optional: {sorted(optional)})" if optional else ""
        raise FareInputError(f"journey state {name} must be an object with keys {sorted(keys)}{extra}")
    return cast(Mapping[str, object], value)


def _str(d: Mapping[str, object], name: str) -> str:
    value = d[name.rpartition(".")[2]]
    if not isinstance(value, str) or not value:
        raise FareInputError(f"journey state {name} must be a non-empty string")
    return value


def _int(value: object, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FareInputError(f"journey state {name} must be an integer")
    if minimum is not None and value < minimum:
        raise FareInputError(f"journey state {name} must be >= {minimum}")
    return value


EMPTY_STATE = JourneyState()


# --------------------------------------------------------------------------------------------------
# Taps, concessions, decisions


@dataclasses.dataclass(frozen=True, slots=True)
class Tap:
    time: int  # unix seconds
    mode: Mode
    line: str  # bus line id, or a metro line serving the station
    station: str | None = None  # metro only
    direction: Direction = "single"  # "single" for bus, "in" / "out" for metro
    # The credential's per-ride limit (a ride code certificate's max_fare_fen): the ride this tap prices
    # and a penalty charged with it each cost at most this much; an entry passes it on to its journey.
    max_fare_fen: int | None = None
    # Priced after the fact from a gate's upload: it may arrive after later taps of the card (see
    # docs/fares.md "Late uploads"). Online taps are priced in arrival order, whatever their clock says.
    uploaded: bool = False
    # An uploaded exit taken after its card stopped (a loss report, a replacement) at this time: it counts
    # only as the end of a journey entered before then (rule `exit_after_stop` when none can take it).
    entered_before: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Concession:
    kind: ConcessionKind = "none"
    elderly_rides_remaining: int = 0  # the holder's shared quota left this year (elderly only)


NO_CONCESSION = Concession()


@dataclasses.dataclass(frozen=True, slots=True)
class Penalty:
    """A charge for a broken journey, separate from the tap's own fare, credited to its own operator."""

    amount_fen: int
    operator: str
    reason: str  # missing_tap_out | missing_tap_in | journey_timeout
    # The metro station of the broken journey (its entry; the exit for missing_tap_in): clearing lists
    # the penalty under that station's line, whatever the tap that charged it.
    station: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Refund:
    """A penalty given back: the tap it charged (at `station`, `time`) has got its other half in time, and
    the ride is priced from the two instead (docs/fares.md "Late uploads"). A `missing_tap_in` of an exit
    whose entry came, or the `missing_tap_out` or `journey_timeout` of an entry whose exit came. The purse
    is credited `amount_fen` from `operator`, the one the penalty paid (that station's operator). The
    penalty's journal row is the card's at `charged_at` (`UnpairedTap.charged_at`) at that station."""

    amount_fen: int
    operator: str
    station: str
    time: int
    charged_at: int


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    amount_fen: int  # fare charged for the ride priced by this tap (0 for a metro entry), >= 0
    full_fare_fen: int  # that ride's base fare before any discount (0 when the tap prices no ride)
    rules: tuple[str, ...]  # applied rules, in order, for the receipt
    operator: str  # operator credited with amount_fen
    state: JourneyState  # the card's state after the tap
    penalty: Penalty | None = None  # charge for a broken journey (missing tap-out / tap-in / timeout)
    transfer_discount_fen: int = 0  # part of full_fare_fen waived by the transfer rule
    quota_ride_consumed: bool = False  # True: decrement the holder's elderly ride quota by one
    distance_m: int | None = None  # metro exits: the shortest distance the fare is based on
    # Held exits (see UnpairedTap) whose entry did not arrive in time, charged at this tap: each a
    # `missing_tap_in` at its own exit station, credited to that station's operator.
    due: tuple[Penalty, ...] = ()
    # An upload completing a journey charged a penalty for its missing half: that penalty given back (the
    # ride is `amount_fen`).
    refund: Refund | None = None

    @property
    def total_fen(self) -> int:
        """Everything to debit for this tap: the fare plus any penalty and held exits now due."""
        total = self.amount_fen + (self.penalty.amount_fen if self.penalty is not None else 0)
        for p in self.due:
            total += p.amount_fen
        return total

    @property
    def net_fen(self) -> int:
        """What the purse pays for this tap: `total_fen` less the refund; negative when it gets money back."""
        return self.total_fen - (0 if self.refund is None else self.refund.amount_fen)


# --------------------------------------------------------------------------------------------------
# The engine


def fare(
    table: FareTable,
    state: JourneyState,
    tap: Tap,
    concession: Concession = NO_CONCESSION,
    *,
    charge_due: bool = True,
    refund: bool = True,
) -> Decision:
    """Price one tap. Pure: no I/O, no clock; the same inputs always give the same Decision.

    Taps of a card are given in arrival order. Online taps arrive in time order (a validator's clock
    a little behind is tolerated as such); an `uploaded` tap older than the card's newest tap is priced
    as a late upload (docs/fares.md). A tap in order first charges the held exits now due
    (`Decision.due`), unless `charge_due` is False: they then stay held, still due (the caller's choice
    when the purse can pay the ride but not them). An uploaded tap that completes a journey charged a
    penalty for its missing half (within the journey timeout) gives that penalty back (`Decision.refund`)
    and prices the ride, unless `refund` is False: then it costs nothing and gets nothing back (the
    caller's choice when it cannot find the penalty to give back). Raises `FareInputError` for a tap that does not fit
    the table (unknown line or station, wrong direction for the mode, bad concession, negative limit).
    """
    if tap.max_fare_fen is not None and tap.max_fare_fen < 0:
        raise FareInputError("max_fare_fen must be >= 0")
    newest = _newest(state)
    # A held exit the old card's rider took after the stop (`_after_stop`) is not the newest tap of the
    # rider after it: it counts as of the stop (`own`), for the order of their taps and for the newest time
    # the state remembers. Only an entry before the stop is judged against it, so that it finds such a
    # held exit (`_late`).
    own = ordered_by = newest
    if any(_after_stop(u) for u in state.unpaired):
        own = _newest(state, after_stop=False)
        before_stop = tap.mode == "metro" and tap.direction == "in" and any(
            _after_stop(u) and u.until is not None and tap.time < u.until for u in state.unpaired
        )
        ordered_by = newest if before_stop else own
    due: tuple[Penalty, ...] = ()
    if tap.uploaded and ordered_by is not None and tap.time < ordered_by:
        d = _late(table, state, tap, concession, refund)
    else:
        if charge_due and state.unpaired:  # held exits whose entry did not come in time are charged first
            charged, state = charge_held_exits(table, state, tap.time, dated=tap.time)
            due = tuple(p for _, p in charged)
        d = _in_order(table, state, tap, concession, refund)
    if tap.entered_before is not None and R_EXIT_HELD in d.rules:  # held after the stop: see `_after_stop`
        after = d.state
    else:
        after = _with_latest(d.state, tap.time if own is None or tap.time > own else own)
    if after is d.state and not due:
        return d
    return Decision(
        d.amount_fen, d.full_fare_fen, d.rules, d.operator, after, d.penalty, d.transfer_discount_fen,
        d.quota_ride_consumed, d.distance_m, due, d.refund,
    )  # fmt: skip (positional: dataclasses.replace costs microseconds on the hot path)


def _in_order(table: FareTable, state: JourneyState, tap: Tap, concession: Concession, refund: bool) -> Decision:
    """A tap priced in arrival order: the card's newest, or an online tap (see `fare`)."""
    r = table.rules
    t = tap.time
    day = (t + r.utc_offset_s) // 86400
    if state.day is None or day > state.day:
        charged_today = 0
    else:  # same day (or an earlier clock by a skewed terminal: counts toward the stored day)
        day = state.day
        charged_today = state.day_charged_fen
    journey = state.journey
    limit = tap.max_fare_fen
    if tap.mode == "bus" or tap.direction == "in":
        # The rider left any journey the sweep charged before this tap: its exit, if it comes, is earlier.
        state = _bounded(state, t)

    if tap.mode == "bus":
        line = _bus_line(table, tap)
        penalty = None if journey is None else Penalty(table.cap_fen, journey.operator, R_MISSING_OUT, journey.station)
        d = _ride(
            table, state, concession, day, charged_today, base=line.fare_fen, mode="bus", start=t, end=t,
            operator=line.operator, first_rule=R_BUS, penalty=penalty, distance=None,
        )  # fmt: skip
        if journey is not None:
            kept = _charged_entry(journey, table, limit, at=t, until=t)
            d = dataclasses.replace(d, state=_with_unpaired(d.state, t, kept))
        return _capped(d, limit, _min_limit(limit, None if journey is None else journey.max_fare_fen))

    place, operator = _metro_place(table, tap)
    if tap.direction == "in":
        rules: tuple[str, ...] = (R_ENTRY,)
        penalty = None
        if journey is not None:  # entering again: the open journey never tapped out
            penalty = Penalty(table.cap_fen, journey.operator, R_MISSING_OUT, journey.station)
            rules = (R_MISSING_OUT, R_ENTRY)
        new = JourneyState(
            OpenJourney(tap.station or "", t, operator, limit), state.window, day, charged_today,
            unpaired=state.unpaired,
        )  # fmt: skip
        if journey is not None:
            new = _with_unpaired(new, t, _charged_entry(journey, table, limit, at=t, until=t))
        d = Decision(0, 0, rules, operator, new, penalty)
        return _capped(d, limit, _min_limit(limit, None if journey is None else journey.max_fare_fen))

    if journey is not None and tap.entered_before is not None and journey.time >= tap.entered_before:
        # An exit after the card stopped is not the exit of a journey entered after the stop (another rider
        # of the same purse, on the replacement card): that journey stays open; this exit waits for its own.
        return _late(table, state, tap, concession, refund)
    if journey is None:
        base = JourneyState(None, state.window, day, charged_today, unpaired=state.unpaired)
        swept = state.swept
        if swept is not None and tap.entered_before is not None and swept.time >= tap.entered_before:
            # As for an open journey above: an exit after the stop does not end a swept journey entered
            # after it; the swept journey's own exit may still come and give its charge back.
            return _late(table, state, tap, concession, refund)
        if swept is not None:  # the exit of the journey the sweep charged the maximum fare for
            return _exit_of_swept(table, swept, base, tap, concession, refund=refund)
        return _exit_without_journey(table, base, tap, concession, operator, late=False, refund=refund)
    if t - journey.time >= r.journey_timeout_s:
        new = JourneyState(None, state.window, day, charged_today, unpaired=state.unpaired)
        penalty = Penalty(table.cap_fen, journey.operator, R_TIMEOUT, journey.station)
        # This exit may be another journey's (the real one arriving later from a gate): kept as paired.
        new = _with_unpaired(new, t, _charged_entry(journey, table, limit, at=t, until=t, pair=tap))
        d = Decision(0, 0, (R_TIMEOUT,), journey.operator, new, penalty)
        return _capped(d, limit, _min_limit(limit, journey.max_fare_fen))
    return _journey_exit(table, state, tap, concession, journey, day, charged_today, place)


def _journey_exit(
    table: FareTable, state: JourneyState, tap: Tap, concession: Concession, journey: OpenJourney, day: int,
    charged_today: int, place: int,
) -> Decision:
    """The exit, in order, of `journey`: its distance fare, with the card's discounts (`state`'s window)."""
    entry = journey_place(table, journey.station)
    d = _ride(
        table, state, concession, day, charged_today, base=table.fare_matrix[entry][place], mode="metro",
        start=journey.time, end=tap.time, operator=journey.operator,
        first_rule=R_SAME_STATION if entry == place else R_METRO, penalty=None,
        distance=table.distance_m[entry][place],
    )  # fmt: skip
    limit = _min_limit(tap.max_fare_fen, journey.max_fare_fen)
    return _capped(d, limit, limit)


def _bus_line(table: FareTable, tap: Tap) -> BusLine:
    line = table.bus_lines.get(tap.line)
    if line is None:
        raise FareInputError(f"unknown bus line {tap.line!r} in fare table {table.version}")
    if tap.direction != "single":
        raise FareInputError(f"a bus tap has direction 'single', got {tap.direction!r}")
    return line


def _metro_place(table: FareTable, tap: Tap) -> tuple[int, str]:
    """(place index, operator) of a metro tap; refuses a tap that does not fit the table. An uploaded tap
    may be at a station closed since it was made (`metro.retired`): priced as its `priced_as` station."""
    if tap.mode != "metro":
        raise FareInputError(f"unknown mode {tap.mode!r}")
    if tap.station is None:
        raise FareInputError("a metro tap needs a station")
    station = table.retired.get(tap.station, tap.station) if tap.uploaded else tap.station
    place = place_of(table, station)
    if station == tap.station and tap.line not in table.place_lines[place]:  # a retired one was checked then
        raise FareInputError(f"metro line {tap.line!r} does not serve station {tap.station!r}")
    if tap.direction not in ("in", "out"):
        raise FareInputError(f"a metro tap has direction 'in' or 'out', got {tap.direction!r}")
    return place, table.station_operator[station]


def _min_limit(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _capped(d: Decision, fare_limit: int | None, penalty_limit: int | None) -> Decision:
    """A decision under per-ride limits (ride code certificates' max_fare_fen): the ride this tap prices
    costs at most `fare_limit`, the penalty charged with it at most `penalty_limit` (the limits of the
    credentials involved: this tap's and, for a journey, its entry's). The operator is credited what is
    charged; the journey state (transfer window, daily total) keeps the uncapped fare. The same object
    when nothing is over a limit."""
    penalty = d.penalty
    over_fare = fare_limit is not None and d.amount_fen > fare_limit
    over_penalty = penalty is not None and penalty_limit is not None and penalty.amount_fen > penalty_limit
    if not over_fare and not over_penalty:
        return d
    if penalty is not None and penalty_limit is not None and over_penalty:
        penalty = dataclasses.replace(penalty, amount_fen=penalty_limit)
    amount = d.amount_fen if fare_limit is None else min(d.amount_fen, fare_limit)
    return dataclasses.replace(d, amount_fen=amount, penalty=penalty, rules=(*d.rules, R_RIDE_MAX))


def _derived_newest(state: JourneyState, *, after_stop: bool = True) -> int | None:
    newest = None if state.journey is None else state.journey.time
    if state.window is not None and (newest is None or state.window.start > newest):
        newest = state.window.start
    for u in state.unpaired:
        # Without `after_stop`, a held exit taken after the stop counts as of the stop (`until`): the old
        # card's rider's, it orders the taps before the stop, not those of the rider after it.
        t = u.until if not after_stop and _after_stop(u) and u.until is not None else u.time
        if newest is None or t > newest:
            newest = t
    return newest


def _after_stop(u: UnpairedTap) -> bool:
    """A held exit taken after its card stopped (`Tap.entered_before`): the old card's rider's, waiting for
    an entry before the stop."""
    return u.direction == "out" and not u.charged and u.until is not None


def _newest(state: JourneyState, *, after_stop: bool = True) -> int | None:
    """The time of the card's newest tap: its open journey's entry, the end of its last ride (the
    transfer window's start), its unpaired taps, or `latest` when those do not show it (a discounted
    ride keeps the window, an unpaired tap is paired). Without `after_stop`, not counting the held exits
    taken after the card stopped (`_after_stop`) but as of the stop: they never set `latest` past it."""
    derived = _derived_newest(state, after_stop=after_stop)
    if state.latest is None:
        return derived
    return state.latest if derived is None else max(derived, state.latest)


def _with_latest(state: JourneyState, newest: int) -> JourneyState:
    """`state` remembering `newest` as its newest tap time, stored only when the state does not show it
    (a held exit taken after the stop does not show it: it may go, and it orders only entries)."""
    derived = _derived_newest(state, after_stop=False)
    latest = None if derived is not None and derived >= newest else newest
    if latest == state.latest:
        return state
    s = state
    return JourneyState(s.journey, s.window, s.day, s.day_charged_fen, s.swept, s.unpaired, latest)


def _held(u: UnpairedTap) -> bool:
    return u.direction == "out" and not u.charged


def _drop_rank(u: UnpairedTap) -> int:
    """Which unpaired taps `_keep` drops first (lowest rank): those whose other half, arriving after
    they are gone, costs the least harm. A charged exit's entry, a late entry's exit: priced at most
    once anyway (0). A held exit: its ride would go unpaid (1). A charged entry: its exit would be
    charged a second time (2)."""
    if u.direction == "in":
        return 2 if u.charged else 0
    return 0 if u.charged else 1


def _keep(unpaired: Sequence[UnpairedTap], newest: int) -> tuple[UnpairedTap, ...]:
    """The unpaired taps worth keeping, oldest first: at most UNPAIRED_MAX, none older than
    UNPAIRED_KEEP_S before `newest` but held exits (still to be charged); over the limit, the
    lowest `_drop_rank` goes first, then the oldest."""
    kept = [u for u in unpaired if _held(u) or newest - u.time < UNPAIRED_KEEP_S]
    if len(kept) > UNPAIRED_MAX:
        kept = sorted(kept, key=lambda u: (_drop_rank(u), u.time))[-UNPAIRED_MAX:]
    return tuple(sorted(kept, key=lambda u: u.time))


def charge_held_exits(
    table: FareTable, state: JourneyState, now: int, *, dated: int | None = None
) -> tuple[tuple[tuple[int, Penalty], ...], JourneyState]:
    """Charge the held exits (see UnpairedTap) that are `journey_timeout_s` old at `now`: their entry
    did not come in time. Each costs the maximum fare within its credential's limit (`missing_tap_in`
    at its station, its operator), and stays as a charged exit, so that an entry arriving even later
    costs nothing more. A held exit taken after its card stopped (`until`: the stop) is dropped instead,
    uncharged: no entry before the stop came for it. Returns ((the time each became due, its penalty),
    ...) and the new state; `((), state)` when none is due. The fare engine calls it before a tap in
    order, whose time dates the penalties' journal rows (`dated`); the sweep calls it, and dates each at
    the time it became due (`dated` None). The charged exits remember that time (`charged_at`)."""
    timeout = table.rules.journey_timeout_s
    due = [u for u in state.unpaired if _held(u) and now - u.time >= timeout]
    if not due:
        return (), state
    charged = tuple(
        (u.time + timeout, Penalty(_within(table.cap_fen, u.max_fare_fen), u.operator, R_MISSING_IN, u.station))
        for u in due
        if u.until is None
    )
    unpaired = tuple(
        dataclasses.replace(
            u, charged=True, charged_fen=_within(table.cap_fen, u.max_fare_fen),
            charged_at=u.time + timeout if dated is None else dated,
        )
        if any(u is x for x in due) else u
        for u in state.unpaired
        if u.until is None or not any(u is x for x in due)
    )
    after = dataclasses.replace(state, unpaired=unpaired)
    # A dropped exit's time counts as of its stop: an entry before the stop coming even later is late (it
    # no longer finds the exit, and opens no journey), a tap of the rider after the stop is not.
    newest = _newest(state, after_stop=False)
    return charged, after if newest is None else _with_latest(after, newest)


def _within(amount: int, limit: int | None) -> int:
    return amount if limit is None else min(amount, limit)


def _charged_entry(
    j: OpenJourney, table: FareTable, limit: int | None, *, at: int, until: int | None = None,
    pair: Tap | None = None,
) -> UnpairedTap:
    """The kept entry of journey `j`, charged the maximum fare within `limit` and its own (the charging
    tap's credential limit: `_capped`'s penalty limit) by a journal row dated `at`; `until`: the time of
    the tap that charged it; `pair`: the exit that ended it (at `until`)."""
    return UnpairedTap(
        "in", j.station, j.time, j.operator, j.max_fare_fen, True, until,
        None if pair is None else pair.station, None if pair is None else pair.max_fare_fen,
        _within(table.cap_fen, _min_limit(limit, j.max_fare_fen)), at,
    )  # fmt: skip


def _is_kept(u: UnpairedTap, j: OpenJourney) -> bool:
    """Whether `u` is the kept entry of journey `j` charged by the sweep (no `until` yet)."""
    return (
        u.direction == "in" and u.charged and u.until is None
        and (u.station, u.time, u.operator, u.max_fare_fen) == (j.station, j.time, j.operator, j.max_fare_fen)
    )  # fmt: skip


def _refund_of(u: UnpairedTap) -> Refund | None:
    """The refund of charged tap `u`'s penalty, if it can be given back: its amount and row are known."""
    if not u.charged_fen or u.charged_at is None:
        return None
    return Refund(u.charged_fen, u.operator, u.station, u.time, u.charged_at)


def _paired(entry: UnpairedTap, exit_: Tap, *, given: bool) -> UnpairedTap:
    """Charged entry `entry` ended by `exit_`; `given`: its penalty given back (so never again)."""
    if given:
        return dataclasses.replace(
            entry, until=exit_.time, pair_station=exit_.station, pair_max_fare_fen=exit_.max_fare_fen,
            charged_fen=None, charged_at=None,
        )  # fmt: skip
    return dataclasses.replace(entry, until=exit_.time, pair_station=exit_.station, pair_max_fare_fen=exit_.max_fare_fen)


def _merged(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """Rule names of several groups, in order, each once."""
    return tuple(dict.fromkeys(name for g in groups for name in g))


def _bounded(state: JourneyState, t: int) -> JourneyState:
    """`state` with the charged entries that have no `until` yet (the sweep's) bounded by a tap at `t`."""
    if not any(u.until is None and u.charged and u.direction == "in" for u in state.unpaired):
        return state
    return dataclasses.replace(
        state,
        unpaired=tuple(
            dataclasses.replace(u, until=t) if u.until is None and u.charged and u.direction == "in" else u
            for u in state.unpaired
        ),
    )


def _with_unpaired(state: JourneyState, now: int, *taps: UnpairedTap) -> JourneyState:
    """`state` keeping `taps` too, for their other halves (`_keep` decides what stays); `now`: the tap's time."""
    newest = max(now, _newest(state) or now)
    return dataclasses.replace(state, unpaired=_keep((*state.unpaired, *taps), newest))


def _exit_of_swept(
    table: FareTable, swept: OpenJourney, state: JourneyState, tap: Tap, concession: Concession, *, refund: bool
) -> Decision:
    """The exit of the journey the sweep charged: nothing more, or, uploaded by a gate with a time within
    the journey timeout (the sweep could not know it), the sweep's charge given back and the ride priced
    as in order. Its kept entry records this exit, which an earlier exit of the journey, arriving later
    from a gate, may still displace."""
    kept = next((u for u in state.unpaired if _is_kept(u, swept)), None)
    back = (
        _refund_of(kept)
        if refund and tap.uploaded and kept is not None and tap.time - swept.time < table.rules.journey_timeout_s
        else None
    )  # fmt: skip
    unpaired = tuple(_paired(u, tap, given=back is not None) if u is kept else u for u in state.unpaired)
    if back is None:
        return Decision(0, 0, (R_AFTER_SWEEP,), swept.operator, dataclasses.replace(state, swept=None, unpaired=unpaired))
    place, _ = _metro_place(table, tap)
    day, charged_today = state.day if state.day is not None else 0, state.day_charged_fen
    d = _journey_exit(
        table, dataclasses.replace(state, unpaired=unpaired), tap, concession, swept, day, charged_today, place
    )
    return dataclasses.replace(d, rules=(*d.rules, R_AFTER_SWEEP), refund=back)


def _exit_without_journey(
    table: FareTable, state: JourneyState, tap: Tap, concession: Concession, operator: str, *, late: bool,
    refund: bool,
) -> Decision:
    """A metro exit with no open journey of its own: the ride from an unpaired (late) entry, if one fits
    (entered before it, within the journey timeout), else an exit without entry, kept as unpaired for
    its entry to arrive: held (charged nothing yet) when a gate uploaded it, else charged the maximum
    fare. An exit after its card stopped (`entered_before`) only ends a journey entered before the stop:
    held for such an entry (`until`), never charged on its own. `state` is the card's state with the
    journey this exit does not belong to (None, or a newer one) and the day already settled."""
    r = table.rules
    t = tap.time
    # A charged entry's journey may have lasted the whole timeout: an exit at exactly entry + timeout would
    # have found it timed out (one maximum fare, already charged), so it fits too.
    fits = [
        u
        for u in state.unpaired
        if u.direction == "in"
        and u.time <= t
        and (t - u.time <= r.journey_timeout_s if u.charged else t - u.time < r.journey_timeout_s)
        and (u.until is None or t < u.until)
        and (tap.entered_before is None or u.time < tap.entered_before)
    ]
    if fits:
        entry = max(fits, key=lambda u: u.time)
        rest = tuple(u for u in state.unpaired if u is not entry)
        if entry.charged:  # its journey was charged the maximum fare when it did not tap out
            # A gate's upload within the timeout: the journey's penalty is given back and the ride priced.
            back = _refund_of(entry) if refund and tap.uploaded and t - entry.time < r.journey_timeout_s else None
            paired = _paired(entry, tap, given=back is not None)
            ride_limit = _min_limit(tap.max_fare_fen, entry.max_fare_fen)
            if entry.pair_station is None or entry.until is None:
                new = dataclasses.replace(state, unpaired=tuple(paired if u is entry else u for u in state.unpaired))
                if back is None:
                    return Decision(0, 0, (R_EXIT_OF_CHARGED_JOURNEY,), entry.operator, new)
                ride = _standalone(
                    table, new, tap, concession, start=entry.time, entry_station=entry.station,
                    operator=entry.operator, limit=ride_limit,
                )  # fmt: skip
                return dataclasses.replace(ride, rules=(*ride.rules, R_EXIT_OF_CHARGED_JOURNEY), refund=back)
            # An exit had ended it: this one, earlier, is the better fit. The one displaced is an exit
            # without entry now: charged the maximum fare, kept for its own entry.
            where = entry.pair_station
            displaced_operator = table.station_operator.get(table.retired.get(where, where), entry.operator)
            penalty_limit = _min_limit(entry.pair_max_fare_fen, tap.max_fare_fen)
            displaced = UnpairedTap(
                "out", where, entry.until, displaced_operator, entry.pair_max_fare_fen,
                charged_fen=_within(table.cap_fen, penalty_limit), charged_at=t,
            )  # fmt: skip
            new = _with_unpaired(dataclasses.replace(state, unpaired=rest), t, paired, displaced)
            penalty = Penalty(table.cap_fen, displaced_operator, R_MISSING_IN, where)
            d = _capped(
                Decision(0, 0, (R_EXIT_OF_CHARGED_JOURNEY, R_MISSING_IN), entry.operator, new, penalty),
                None, penalty_limit,
            )  # fmt: skip
            if back is None:
                return d
            ride = _standalone(
                table, new, tap, concession, start=entry.time, entry_station=entry.station,
                operator=entry.operator, limit=ride_limit,
            )  # fmt: skip
            return dataclasses.replace(ride, rules=_merged(ride.rules, d.rules), penalty=d.penalty, refund=back)
        return _standalone(
            table, dataclasses.replace(state, unpaired=rest), tap, concession,
            start=entry.time, entry_station=entry.station, operator=entry.operator,
            limit=_min_limit(tap.max_fare_fen, entry.max_fare_fen),
        )  # fmt: skip
    if tap.uploaded and sum(1 for u in state.unpaired if _drop_rank(u) > 0) < UNPAIRED_MAX:
        # A gate's upload: its entry may still be on its way from another gate. Held, not charged yet,
        # when the card can keep it without dropping another held exit or a charged entry (`_keep`);
        # else charged at once, as an online exit is.
        held = UnpairedTap("out", tap.station or "", t, operator, tap.max_fare_fen, False, tap.entered_before)
        return Decision(0, 0, (R_EXIT_HELD, R_LATE) if late else (R_EXIT_HELD,), operator, _with_unpaired(state, t, held))
    if tap.entered_before is not None:  # no room to hold it, and it is not chargeable on its own
        return Decision(0, 0, (R_EXIT_AFTER_STOP,), operator, state)
    penalty = Penalty(table.cap_fen, operator, R_MISSING_IN, tap.station)
    charged = UnpairedTap(
        "out", tap.station or "", t, operator, tap.max_fare_fen,
        charged_fen=_within(table.cap_fen, tap.max_fare_fen), charged_at=t,
    )  # fmt: skip
    new = _with_unpaired(state, t, charged)
    rules = (R_MISSING_IN, R_LATE) if late else (R_MISSING_IN,)
    d = Decision(0, 0, rules, operator, new, penalty)
    return _capped(d, tap.max_fare_fen, tap.max_fare_fen)


def _standalone(
    table: FareTable,
    state: JourneyState,
    tap: Tap,
    concession: Concession,
    *,
    start: int,
    entry_station: str | None,
    operator: str,
    limit: int | None,
) -> Decision:
    """A ride priced on its own (a late bus ride, or a metro ride whose entry came late), rule
    `late_upload`: concession, card discount and daily cap as usual, no transfer discount (the rides
    around it are not known in order), and no effect on the card's open journey or transfer window. A ride
    on an earlier local day than the state's counts toward no stored daily total."""
    day = (tap.time + table.rules.utc_offset_s) // 86400
    charged = state.day_charged_fen if state.day == day else 0
    if tap.mode == "bus":
        line = _bus_line(table, tap)
        base, distance, first = line.fare_fen, None, R_BUS
    else:
        # Stored stations, possibly retired since (`journey_place`); the tap's own was checked already.
        a, b = journey_place(table, entry_station or ""), journey_place(table, tap.station or "")
        base, distance = table.fare_matrix[a][b], table.distance_m[a][b]
        first = R_SAME_STATION if a == b else R_METRO
    lone = JourneyState(None, None, day, charged)
    d = _ride(
        table, lone, concession, day, charged, base=base, mode=tap.mode, start=start, end=tap.time,
        operator=operator, first_rule=first, penalty=None, distance=distance,
    )  # fmt: skip
    if state.day is None or day > state.day:
        new = dataclasses.replace(state, day=day, day_charged_fen=d.amount_fen)
    elif day == state.day:
        new = dataclasses.replace(state, day_charged_fen=state.day_charged_fen + d.amount_fen)
    else:
        new = state
    return _capped(dataclasses.replace(d, state=new, rules=(*d.rules, R_LATE)), limit, None)


def _late(table: FareTable, state: JourneyState, tap: Tap, concession: Concession, refund: bool) -> Decision:
    """An uploaded tap older than the card's newest tap (docs/fares.md "Late uploads"). It never
    opens, closes or charges the card's open journey and never takes a transfer discount:

    - a bus ride is priced on its own;
    - an entry that an unpaired exit fits (the exit within the journey timeout after it) is that exit's
      entry: the ride is priced on its own from the two, and an exit already charged the maximum fare
      gets that charge back (`Refund`; with `refund` False, or a charge of unknown amount, the entry
      costs nothing more instead). Otherwise the entry is kept unpaired for its exit;
    - an exit takes the latest unpaired entry that fits and prices that ride on its own; otherwise it
      is an exit without entry, held for its entry.
    """
    r = table.rules
    t = tap.time
    limit = tap.max_fare_fen
    if tap.mode == "bus":
        line = _bus_line(table, tap)
        return _standalone(
            table, state, tap, concession, start=t, entry_station=None, operator=line.operator, limit=limit
        )  # fmt: skip
    _, operator = _metro_place(table, tap)
    if tap.direction == "in":
        fits = [
            u
            for u in state.unpaired
            if u.direction == "out" and t <= u.time and u.time - t < r.journey_timeout_s and (u.until is None or t < u.until)
        ]
        if fits:
            exit_ = min(fits, key=lambda u: u.time)
            rest = dataclasses.replace(state, unpaired=tuple(u for u in state.unpaired if u is not exit_))
            back = _refund_of(exit_) if exit_.charged and refund else None
            if exit_.charged and back is None:
                return Decision(0, 0, (R_ENTRY_OF_CHARGED_EXIT,), operator, rest)
            # The entry of a held exit, or of one charged the maximum fare (given back): the ride, priced
            # on its own from the two.
            out = Tap(exit_.time, "metro", tap.line, exit_.station, "out", exit_.max_fare_fen, uploaded=True)
            d = _standalone(
                table, rest, out, concession, start=t, entry_station=tap.station, operator=operator,
                limit=_min_limit(limit, exit_.max_fare_fen),
            )  # fmt: skip
            if back is None:
                return dataclasses.replace(d, rules=(*d.rules, R_ENTRY_OF_HELD_EXIT))
            return dataclasses.replace(d, rules=(*d.rules, R_ENTRY_OF_CHARGED_EXIT), refund=back)
        late_entry = UnpairedTap("in", tap.station or "", t, operator, limit, charged=False)
        return Decision(0, 0, (R_ENTRY, R_LATE), operator, _with_unpaired(state, t, late_entry))
    return _exit_without_journey(table, state, tap, concession, operator, late=True, refund=refund)


def _ride(
    table: FareTable,
    state: JourneyState,
    concession: Concession,
    day: int,
    charged_today: int,
    *,
    base: int,
    mode: Mode,
    start: int,
    end: int,
    operator: str,
    first_rule: str,
    penalty: Penalty | None,
    distance: int | None,
) -> Decision:
    """Price a ride that boarded at `start` (bus tap / metro entry) and ended at `end`."""
    r = table.rules
    rules = [R_MISSING_OUT, first_rule] if penalty is not None else [first_rule]
    if first_rule == R_SAME_STATION:
        rules.append(R_METRO)
    consumed = False
    kind = concession.kind
    if kind == "none":
        price = card_price_fen(base, r.card_discount_percent)
        if price != base:
            rules.append(R_CARD)
    elif kind == "elderly":
        if concession.elderly_rides_remaining > 0:
            price = 0
            consumed = True
            rules.append(R_ELDERLY)
        else:
            price = card_price_fen(base, r.card_discount_percent)
            rules.append(R_ELDERLY_EXHAUSTED)
            if price != base:
                rules.append(R_CARD)
    elif kind == "disabled_free":
        price = 0
        rules.append(R_DISABLED_FREE)
    elif kind == "disabled_half":
        price = half_price_fen(base)
        rules.append(R_DISABLED_HALF)
    else:
        raise FareInputError(f"unknown concession kind {kind!r}")

    window = state.window
    new_window: TransferWindow | None = None
    discount = 0
    if window is not None and start - window.start < r.transfer_window_s:
        if window.discount_used:
            new_window = window  # the window's one discount is spent; it runs out unchanged
        elif (window.mode, mode) in r.transfer_pairs:
            discount = min(price, window.first_fare_fen, r.transfer_discount_max_fen)
            if discount > 0:
                price -= discount
                rules.append(R_TRANSFER)
                new_window = TransferWindow(window.start, window.first_fare_fen, window.mode, True)

    cap = r.daily_cap_fen
    if cap is not None and price > cap - charged_today:
        price = max(0, cap - charged_today)
        rules.append(R_CAP)
    if new_window is None:  # this ride opens a new window for the next one
        new_window = TransferWindow(end, price, mode, False)
    # (`latest`: a window kept by a discount no longer shows this ride; see `_with_latest`.)
    latest = end if new_window.start < end else None
    new = JourneyState(None, new_window, day, charged_today + price, None, state.unpaired, latest)
    return Decision(price, base, tuple(rules), operator, new, penalty, discount, consumed, distance)


def first_due(table: FareTable, state: JourneyState) -> int | None:
    """When the first charge this state holds without a tap falls due (unix seconds): its open journey's
    timeout (`close_open_journey`) or a held exit's (`charge_held_exits`); None when it holds neither."""
    times = [u.time for u in state.unpaired if _held(u)]
    if state.journey is not None:
        times.append(state.journey.time)
    return min(times) + table.rules.journey_timeout_s if times else None


def close_open_journey(
    table: FareTable, state: JourneyState, now: int, *, force: bool = False
) -> tuple[Penalty | None, JourneyState]:
    """Charge an open metro journey that never tapped out: the maximum fare (`table.cap_fen`), or the
    entry credential's per-ride limit when that is lower.

    The journey is closed when it has timed out at `now` (now - entry >= rules.journey_timeout_s) or
    when `force` is set (e.g. an end-of-day run after the last train). Otherwise nothing changes and
    the penalty is None. No concession, card discount, transfer rule or daily cap applies to it.
    """
    j = state.journey
    if j is None or (not force and now - j.time < table.rules.journey_timeout_s):
        return None, state
    amount = _within(table.cap_fen, j.max_fare_fen)
    # Dated, as the sweep writes it, at the moment the journey timed out (even when forced earlier).
    kept = _charged_entry(j, table, None, at=j.time + table.rules.journey_timeout_s)
    # Kept as of the card's newest tap, not the sweep's clock: a sweep run days late (a card on the retry
    # list) must not drop the charged entry its exit, uploaded as late, gives back.
    closed = _with_unpaired(dataclasses.replace(state, journey=None, swept=j), _newest(state) or j.time, kept)
    return Penalty(amount, j.operator, R_MISSING_OUT, j.station), _with_latest(closed, _newest(state) or j.time)
