"""The realistic mix for Locust: what validators, hospitals, merchants and the card office send all day.

    locust -f loadtests/locustfile.py --headless -u 63 -r 20 -t 10m --host http://127.0.0.1:8089 \\
        --csv /tmp/locust --csv-full-history --stop-timeout 30

`python -m loadtests.transit_bench` runs it with a configuration file (CARDSVC_BENCH_CONFIG: terminals
created for the run, one validator terminal per Locust user, the offline cards' purse states). Without
one it uses the demo terminals of a `cardsvc seed` data dir:

    CARDSVC_KEY_FILE=.data/keys.json            the service's key file (card keys stand in for the cards)
    CARDSVC_BENCH_TERMINALS=.data/demo-terminals.json
    CARDSVC_BENCH_CARDS=1000000                 the seeded population (cards 0..N-1)
    CARDSVC_BENCH_RATE=2000                     target requests/s over all weighted users
    CARDSVC_BENCH_SEED, CARDSVC_BENCH_ECARD_POOL  as given to `cardsvc seed`
    CARDSVC_BENCH_COUNTERS=/tmp/counters.json   where the business counters are written at the end
    CARDSVC_BENCH_BOOK=/tmp/book                credentials made ahead (loadtests/credbook.py), optional

The mix (weights are users; every weighted user sends about rate / users requests per second):

- MetroValidator (36): tap-in at one station, then tap-out of the same card at another (card cryptogram).
- BusValidator (36): single bus taps, 85 % card cryptograms, 15 % e-card codes.
- AcceptancePoint (16): hospitals and merchants verify e-card codes (60 %) and card cryptograms (40 %).
- HotlistClient (4): validators download hotlist changes since the version they hold.
- OfflineUploader (fixed count, from the configuration): each uploads a batch of purse records (TAC by
  the card's TAC key) every few seconds, over its own slice of cards, so purse sequences stay
  consistent; other verdicts are counted and reported.
- CardOffice (1): a trickle of temporary-loss reports; each lost card is then tapped at a validator and
  must be refused (an approval is a failure and a violation).

After an insufficient-balance decline a validator user tops the card up (bank channel), as a rider would.
Cards are drawn with a Zipf-like skew (loadtests.presign.skewed_index) over the online part of the
population. The phones' e-card codes and the cards' answers come from a book made before the run when
there is one (loadtests/credbook.py: SM2 signing took a fifth of Locust's CPU), else they are made live;
the counters say how many were made live. Business declines are successes; 5xx, 401, 409, other 4xx and declines that a valid
credential must not get (forged, expired, replayed) are failures. Counters of approved taps and posted
offline records are written as JSON when Locust quits, for the bench to compare with the journal.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from locust import FastHttpUser, events, task

from loadtests import credbook
from loadtests.transit_bench import (
    OFFLINE_PATH,
    TAP_PATH,
    UPLOAD_INTERVAL_S,
    UPLOAD_RECORDS,
    offline_batch,
    purse_cards,
    signed_headers,
)
from protocols import population, transit

BUS_LINES = ("bus-105", "bus-111", "bus-261", "bus-421")
STATIONS = (
    "l1-chaotianmen", "l1-jiaochangkou", "l1-lianglukou", "l1-daping", "l1-shapingba", "l1-ciqikou",
    "l2-linjiangmen", "l2-niujiaotuo", "l2-yangjiaping", "l2-dadukou", "l3-nanping", "l3-guanyinqiao",
    "l3-hongqihegou", "l3-cqbeizhan", "l3-longtousi", "l3-yuanboyuan",
)  # fmt: skip
STATION_LINE = {s: s.split("-")[0].upper() for s in STATIONS}
INTENDED_TAP_DECLINES = frozenset({"insufficient_balance", "card_unusable"})
INTENDED_CODES = frozenset({"card_unusable", "purse_balance_cap", "illegal_transition"})
TOPUP_FEN = 5_000
LOSS_INTERVAL_S = 2.0
WEIGHTED_USERS = ("MetroValidator", "BusValidator", "AcceptancePoint", "HotlistClient")

# ------------------------------------------------------------------ configuration and counters

_lock = threading.Lock()
_config: dict[str, Any] | None = None
_slots = itertools.count()
_uploader_slots = itertools.count()
COUNTERS: dict[str, Any] = {
    "approved_taps": 0,
    "tap_declines": Counter(),
    "unexpected_tap_declines": Counter(),
    "offline_records": 0,
    "offline_posted": 0,
    "offline_verdicts": Counter(),
    "offline_skipped_cards": 0,
    "loss_reports": 0,
    "lost_card_refused": 0,
    "lost_card_violations": 0,
    "topups": 0,
    "ecard_verifications": 0,
    "card_verifications": 0,
    "hotlist_entries": 0,
    "live_card_answers": 0,
    "live_ecard_codes": 0,
}


def _demo_config() -> dict[str, Any]:
    terminals = orjson.loads(
        Path(os.environ.get("CARDSVC_BENCH_TERMINALS", ".data/demo-terminals.json")).read_bytes()
    )
    cards = int(os.environ.get("CARDSVC_BENCH_CARDS", "1000000"))
    offline = min(10_000, cards // 10)
    return {
        "cards": cards,
        "online_cards": cards - offline,
        "seed": os.environ.get("CARDSVC_BENCH_SEED", "cardsvc-demo"),
        "ecard_key_pool": int(
            os.environ.get("CARDSVC_BENCH_ECARD_POOL", str(population.ECARD_KEY_POOL_DEFAULT))
        ),
        "key_file": os.environ.get("CARDSVC_KEY_FILE", ".data/keys.json"),
        "rate": float(os.environ.get("CARDSVC_BENCH_RATE", "2000")),
        "validators": [terminals["transit_validator"]],
        "uploaders": [terminals["transit_validator"]],
        "hospital": terminals["hospital_his"],
        "merchant": terminals["merchant_pos"],
        "card_office": terminals["card_office"],
        "bank": terminals["bank_channel"],
        # Shared demo terminals: sequence numbers from the clock, 2^20 per user slot (runs >= 10 s apart).
        "seq_base": ((int(time.time()) // 10) % 64) * 2**26,
        "offline_first": cards - offline,
        "offline_balances": None,  # unknown: a fresh seed (opening balance, purse_seq 0) is assumed
        "offline_purse_seqs": None,
        "counters_path": os.environ.get("CARDSVC_BENCH_COUNTERS", ""),
    }


def config() -> dict[str, Any]:
    global _config
    with _lock:
        if _config is None:
            path = os.environ.get("CARDSVC_BENCH_CONFIG")
            cfg = orjson.loads(Path(path).read_bytes()) if path else _demo_config()
            from cardsvc.security.keys import KeyRing

            keys = KeyRing.load(Path(cfg["key_file"]))
            cfg["auth_master"] = keys.card_auth_master
            cfg["tac_master"] = keys.card_tac_master
            cfg["seed_bytes"] = cfg["seed"].encode()
            from protocols import terminal_auth

            for creds in [*cfg["validators"], *cfg["uploaders"], cfg["hospital"], cfg["merchant"],
                          cfg["card_office"], cfg["bank"]]:  # fmt: skip
                creds["_secret_bytes"] = terminal_auth.decode_secret(creds["secret"])
            _config = cfg
        return _config


def _bump(key: str, n: int = 1, sub: str | None = None) -> None:
    if sub is None:
        COUNTERS[key] += n
    else:
        COUNTERS[key][sub] += n


@events.quitting.add_listener  # type: ignore[untyped-decorator]  # (Locust's EventHook is not annotated)
def _write_counters(environment: Any, **_kw: Any) -> None:
    path = (_config or {}).get("counters_path") or os.environ.get("CARDSVC_BENCH_COUNTERS")
    if path:
        Path(path).write_bytes(orjson.dumps(COUNTERS, option=orjson.OPT_INDENT_2))


# ------------------------------------------------------------------ credentials

_maker: credbook.Maker | None = None
_book: credbook.Book | None = None


def maker(cfg: dict[str, Any]) -> credbook.Maker:
    """Makes credentials live, as the phones and cards do (keys from the key file and the seed)."""
    global _maker
    if _maker is None:
        _maker = credbook.Maker(cfg["auth_master"], cfg["seed_bytes"], cfg["ecard_key_pool"])
    return _maker


def book(cfg: dict[str, Any]) -> credbook.Book | None:
    """The credentials made ahead (CARDSVC_BENCH_BOOK or the configuration's `book`), if any."""
    global _book
    path = cfg.get("book") or os.environ.get("CARDSVC_BENCH_BOOK")
    if _book is None and path:
        _book = credbook.Book(Path(path))
    return _book


def card_answer(cfg: dict[str, Any], index: int, now: int) -> dict[str, str]:
    """What the card at `index` answers a terminal's challenge, made now."""
    _bump("live_card_answers")
    return maker(cfg).card_answer(index, now)


def new_card(cfg: dict[str, Any], rng: random.Random, now: int) -> tuple[int, dict[str, str]]:
    """A card drawn with the mix's skew and its answer to one challenge: from the book while it has
    some for this moment, else made now."""
    b = book(cfg)
    made = b.card_answer() if b is not None else None
    if made is not None:
        return made
    index = pick_card(cfg, rng)
    return index, card_answer(cfg, index, now)


def new_ecard_code(cfg: dict[str, Any], rng: random.Random, now: int) -> tuple[int, str]:
    """A fresh e-card code of a card drawn with the mix's skew (book first, as new_card)."""
    b = book(cfg)
    made = b.ecard_code() if b is not None else None
    if made is not None:
        return made
    _bump("live_ecard_codes")
    index = pick_card(cfg, rng, with_ecard=True)
    return index, maker(cfg).ecard_code(index, now, rng)


def pick_card(cfg: dict[str, Any], rng: random.Random, with_ecard: bool = False) -> int:
    return credbook.pick_card(rng, cfg["online_cards"], with_ecard)


# ------------------------------------------------------------------ users


class _Terminal(FastHttpUser):
    abstract = True
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.cfg = config()
        self.slot = next(_slots)
        self.rng = random.Random(self.slot * 7919 + int(time.time()))
        validators = self.cfg["validators"]
        self.validator = validators[self.slot % len(validators)]
        # Own terminal: sequence numbers from 1; shared terminals: disjoint ranges per user slot.
        self.seq = itertools.count(self.cfg["seq_base"] + (self.slot // len(validators)) * 2**20 + 1)
        self.bank_seq = itertools.count(self.cfg["seq_base"] + self.slot * 2**20 + 1)
        users = getattr(self.environment.parsed_options, "num_users", None) or 60
        fixed = sum(
            getattr(u, "fixed_count", 0)
            for u in self.environment.user_classes
            if u.__name__ not in WEIGHTED_USERS
        )
        self.interval = max(1, users - fixed) / max(1.0, float(self.cfg["rate"]))
        self._next = time.monotonic() + self.rng.random() * self.interval

    def wait_time(self) -> float:
        """Constant pacing: one task every `interval` seconds per user (open loop while it keeps up)."""
        now = time.monotonic()
        self._next = max(self._next + self.interval, now)
        return self._next - now

    def signed(self, method: str, path: str, creds: dict[str, Any], body: Any, name: str) -> Any:
        raw = orjson.dumps(body) if body is not None else b""
        headers = signed_headers(creds, method, path, raw)
        if method == "GET":
            return self.client.get(path, headers=headers, name=name, catch_response=True)
        # The signed bytes as they are: FastHttpSession sends bytes as the body (its annotation says str).
        return self.client.post(path, data=raw, headers=headers, name=name, catch_response=True)  # type: ignore[arg-type]

    def tap(self, body: dict[str, Any], name: str, index: int, expect_refusal: bool = False) -> str | None:
        """Send a tap; return the decline reason (None when approved). Counts and classifies the answer."""
        body = {"terminal_seq": next(self.seq), "time": int(time.time()), **body}
        with self.signed("POST", TAP_PATH, self.validator, body, name) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {_code(resp)}")
                return "http_error"
            answer = orjson.loads(resp.content)
            if answer["result"] == "approved":
                if not answer.get("replayed_answer"):
                    _bump("approved_taps")
                if expect_refusal:
                    _bump("lost_card_violations")
                    resp.failure("a card reported lost was approved")
                return None
            reason = answer.get("reason") or "?"
            _bump("tap_declines", sub=reason)
            if expect_refusal:
                if reason == "card_unusable":
                    _bump("lost_card_refused")
                else:
                    _bump("lost_card_violations")
                    resp.failure(f"a card reported lost was declined for {reason}, not as unusable")
                return reason
            if reason not in INTENDED_TAP_DECLINES:
                _bump("unexpected_tap_declines", sub=reason)
                resp.failure(f"declined: {reason}")
            if reason == "insufficient_balance":
                self.top_up(index)
            return reason

    def top_up(self, index: int) -> None:
        card_no = population.person(index, self.cfg["seed_bytes"]).card_no
        body = {"terminal_seq": next(self.bank_seq), "amount_fen": TOPUP_FEN, "channel": "bank"}
        with self.signed("POST", f"/v1/purses/{card_no}/top-ups", self.cfg["bank"], body, "top-up") as resp:
            _business(resp)
            if resp.status_code == 200:
                _bump("topups")


def _code(resp: Any) -> str:
    try:
        return str(orjson.loads(resp.content).get("code"))
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return "-"


def _business(resp: Any) -> None:
    """200 is a success; a 422 whose code is an intended business refusal too; anything else fails."""
    if resp.status_code == 200:
        resp.success()
    elif resp.status_code in (409, 422) and _code(resp) in INTENDED_CODES:
        resp.success()
    else:
        resp.failure(f"HTTP {resp.status_code}: {_code(resp)}")


class MetroValidator(_Terminal):
    weight = 36

    def on_start(self) -> None:
        super().on_start()
        self.inside: tuple[int, str, dict[str, str] | None] | None = None  # card, entry station, its exit answer

    @task
    def gate(self) -> None:
        now = int(time.time())
        if self.inside is None:
            b = book(self.cfg)
            journey = b.metro_journey() if b is not None else None
            answer_out: dict[str, str] | None
            if journey is None:
                index = pick_card(self.cfg, self.rng)
                answer_in, answer_out = card_answer(self.cfg, index, now), None
            else:
                index, answer_in, answer_out = journey
            station = self.rng.choice(STATIONS)
            body = {"mode": "metro", "line_id": STATION_LINE[station], "station_id": station,
                    "direction": "in", "credential": "card", **answer_in}  # fmt: skip
            if self.tap(body, "tap metro in", index) is None:
                self.inside = (index, station, answer_out)
            return
        index, entry, answer_out = self.inside
        self.inside = None
        station = self.rng.choice([s for s in STATIONS if s != entry])
        if answer_out is None:
            answer_out = card_answer(self.cfg, index, now)
        body = {"mode": "metro", "line_id": STATION_LINE[station], "station_id": station,
                "direction": "out", "credential": "card", **answer_out}  # fmt: skip
        self.tap(body, "tap metro out", index)


class BusValidator(_Terminal):
    weight = 36

    @task
    def board(self) -> None:
        now = int(time.time())
        line = self.rng.choice(BUS_LINES)
        base = {"mode": "bus", "line_id": line, "direction": "single"}
        if self.rng.random() < credbook.BUS_ECARD_SHARE:
            index, code = new_ecard_code(self.cfg, self.rng, now)
            self.tap({**base, "credential": "ecard_code", "code": code}, "tap bus e-card", index)
        else:
            index, answer = new_card(self.cfg, self.rng, now)
            self.tap({**base, "credential": "card", **answer}, "tap bus card", index)


class AcceptancePoint(_Terminal):
    """Hospital registration desks and merchants: credential checks, no money."""

    weight = 16

    @task
    def verify(self) -> None:
        now = int(time.time())
        creds = self.cfg["hospital"] if self.rng.random() < 0.5 else self.cfg["merchant"]
        if self.rng.random() < credbook.ACCEPTANCE_ECARD_SHARE:
            _, code = new_ecard_code(self.cfg, self.rng, now)
            body = {"code": code, "business_type": "01"}
            with self.signed("POST", "/v1/ecard-codes/verify", creds, body, "ecard code verify") as resp:
                _business(resp)
                _bump("ecard_verifications")
        else:
            _, answer = new_card(self.cfg, self.rng, now)
            with self.signed("POST", "/v1/card-auth", creds, answer, "card verify") as resp:
                _business(resp)
                _bump("card_verifications")


class HotlistClient(_Terminal):
    """Validators keeping their deny-list current: changes since the version they hold."""

    weight = 4

    def on_start(self) -> None:
        super().on_start()
        self.version = 0

    @task
    def download(self) -> None:
        path = f"/v1/hotlist?since={self.version}&limit=1000"
        with self.signed("GET", path, self.validator, None, "hotlist") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {_code(resp)}")
                return
            block = orjson.loads(resp.content)
            self.version = int(block["to_version"])
            _bump("hotlist_entries", len(block["entries"]))


class OfflineUploader(_Terminal):
    """A validator uploading its offline purse records; owns a slice of the offline cards."""

    fixed_count = int(os.environ.get("CARDSVC_BENCH_UPLOADERS", "2"))

    def on_start(self) -> None:
        super().on_start()
        cfg = self.cfg
        k = next(_uploader_slots)
        uploaders = cfg["uploaders"]
        self.terminal = uploaders[k % len(uploaders)]
        n = max(len(uploaders), 1)
        total = cfg["cards"] - cfg["offline_first"]
        size = total // n
        lo = cfg["offline_first"] + (k % n) * size
        if cfg.get("offline_balances") is not None:
            start = lo - cfg["offline_first"]
            balances = cfg["offline_balances"][start : start + size]
            seqs = cfg["offline_purse_seqs"][start : start + size]
        else:
            from cardsvc.seed import OPENING_FEN

            balances, seqs = [OPENING_FEN] * size, [0] * size
        self.chips = purse_cards(cfg["tac_master"], cfg["seed_bytes"], lo, balances, seqs)
        self.cursor = 0
        self.batch_ids = itertools.count(cfg["seq_base"] + 1)
        self.next_seq = cfg["seq_base"] + (k // n) * 2**20 + 1

    def wait_time(self) -> float:
        return UPLOAD_INTERVAL_S

    @task
    def upload(self) -> None:
        group = [self.chips[(self.cursor + i) % len(self.chips)] for i in range(UPLOAD_RECORDS)]
        self.cursor = (self.cursor + UPLOAD_RECORDS) % len(self.chips)
        before = sum(1 for c in group if c.balance_fen >= 180)
        batch = offline_batch(group, self.terminal["terminal_id"], next(self.batch_ids), self.next_seq,
                              int(time.time()) - 120)  # fmt: skip
        _bump("offline_skipped_cards", UPLOAD_RECORDS - before)
        if batch is None:
            return
        self.next_seq += len(batch.records)
        with self.signed(
            "POST", OFFLINE_PATH, self.terminal, transit.batch_to_dict(batch), "offline batch"
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {_code(resp)}")
                return
            for r in orjson.loads(resp.content)["records"]:
                _bump("offline_records")
                _bump("offline_verdicts", sub=r["result"])
                if r["result"] in _POSTED and not r.get("replayed_answer"):
                    _bump("offline_posted")


_POSTED = frozenset(r.value for r in transit.RecordResult if r.posted)


class CardOffice(_Terminal):
    """A trickle of loss reports; the lost card is then tapped and must be refused."""

    fixed_count = 1

    def wait_time(self) -> float:
        return LOSS_INTERVAL_S

    @task
    def report_loss(self) -> None:
        index = self.rng.randrange(self.cfg["online_cards"])  # uniform: rarely one of the busiest cards
        card_no = population.person(index, self.cfg["seed_bytes"]).card_no
        path = f"/v1/cards/{card_no}/temporary-loss"
        with self.signed("POST", path, self.cfg["card_office"], {"operator": "bench"}, "loss report") as resp:
            _business(resp)
            if resp.status_code not in (200, 409):
                return
            _bump("loss_reports")
        now = int(time.time())
        body = {"mode": "bus", "line_id": "bus-105", "direction": "single", "credential": "card",
                **card_answer(self.cfg, index, now)}  # fmt: skip
        self.tap(body, "tap lost card", index, expect_refusal=True)
