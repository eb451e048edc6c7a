"""Credentials made ahead for the Locust mix: the e-card codes the riders' phones show and the answers
their cards give, computed before the run so that Locust's one core goes to sending requests.

Making them is the phones' and the cards' work, not the service's: an e-card code is an SM2 signature
(~370 µs here) and a card answer an SM4 cryptogram plus the person's card number (~20 µs). Made live,
they took about a third of Locust's CPU (py-spy on Locust during a mix, 21 % codes, 11 % card answers),
on the same two cores as the service. The service's work is unchanged: it verifies every code and
cryptogram as it would any other.

A book is a directory of slots of SLOT_S seconds. Slot s holds credentials made with the time
s * SLOT_S (a code's `issued_at`, a card answer's terminal challenge time), used while the clock is in
[s * SLOT_S, (s + 1) * SLOT_S): used at most SLOT_S seconds after they were made, well within a code's
lifetime and a card challenge's age. Each slot has three files:

- `<s>.ecard`: lines `index code`, cards drawn with the mix's skew among those with an e-card;
- `<s>.card`: lines `index card_sn card_challenge terminal_challenge cryptogram` (one tap or check);
- `<s>.metro`: lines `index` and two answers of the same card (the tap in, then the tap out).

Every credential is used once (each has its own random counter or challenge), by one Locust process:
a book is not shared between processes (`locust --processes`, distributed workers), which would show
each credential once per process. A slot that runs out, or a clock outside the book (or stepped back),
falls back to making credentials live; the locustfile counts those.

    python -m loadtests.credbook --out /tmp/book --keys .data/bench/keys.json --cards 40000000 \\
        --duration 600 --rate 2000
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from cardsvc.security.keys import KeyRing
from loadtests.presign import skewed_index
from protocols import card, ecard, population, sm

__all__ = ["SLOT_S", "Book", "BookSpec", "Maker", "build", "pick_card", "plan", "shares"]

SLOT_S = 20
MARGIN = 1.3  # made per slot over the expected use: Locust's pacing catches up after a slow moment

# The mix (loadtests/locustfile.py): every weighted user sends about the same rate; these are the
# weights and each user's share of credentials. Kept here so the book is sized from the same numbers.
_WEIGHTS = {"metro": 36, "bus": 36, "acceptance": 16, "hotlist": 4}
BUS_ECARD_SHARE = 0.15
ACCEPTANCE_ECARD_SHARE = 0.6


def shares() -> dict[str, float]:
    """Of the weighted users' requests: the share that shows an e-card code, a card answer for one tap or
    check, and a metro journey (two answers of one card)."""
    w = _WEIGHTS
    total = sum(w.values())
    return {
        "ecard": (w["bus"] * BUS_ECARD_SHARE + w["acceptance"] * ACCEPTANCE_ECARD_SHARE) / total,
        "card": (w["bus"] * (1 - BUS_ECARD_SHARE) + w["acceptance"] * (1 - ACCEPTANCE_ECARD_SHARE)) / total,
        "metro": w["metro"] / 2 / total,
    }


def pick_card(rng: random.Random, online_cards: int, with_ecard: bool = False) -> int:
    """A card of the online part of the population, drawn with the mix's skew (with an e-card: of those
    that have one)."""
    while True:
        i = skewed_index(rng, online_cards)
        if not with_ecard or i % 5:  # `cardsvc seed` gives 4 in 5 people an e-card
            return i


@dataclass(frozen=True)
class BookSpec:
    """What a book is made from: the population and the keys that stand in for the cards and phones."""

    key_file: str
    seed: str
    online_cards: int
    ecard_key_pool: int
    rate: float


class Maker:
    """Makes credentials as the phones and cards would: card keys derived from the card authentication
    master key, device keys from the seeded e-card key pool."""

    def __init__(self, auth_master: bytes, seed: bytes, ecard_key_pool: int) -> None:
        self.seed = seed
        self.ecard_key_pool = ecard_key_pool
        self.deriver = card.CardKeyDeriver(auth_master, card.KEY_PURPOSE_AUTH)
        self._ecard_keys: dict[int, sm.Sm2PrivateKey | sm.Ed25519PrivateKey] = {}

    def card_answer(self, index: int, now: int) -> dict[str, str]:
        sn = population.person(index, self.seed).card_sn
        sim = card.CardSimulator(sn, card_key=self.deriver.card_key(sn))
        return card.build_card_auth_request(sim, now, os.urandom(4))

    def ecard_code(self, index: int, now: int, rng: random.Random) -> str:
        """A code of e-card index + 1 (device key from the seeded pool) with a random counter, so two codes
        of one e-card never present the same (e-card, counter)."""
        j = index % self.ecard_key_pool
        key = self._ecard_keys.get(j)
        if key is None:
            key = self._ecard_keys[j] = sm.private_key_from_seed(
                sm.ALG_SM2_SM3, population.ecard_pool_seed(j, self.seed)
            )
        device = ecard.EcardDevice(sm.ALG_SM2_SM3, key, index + 1)
        return ecard.encode_code(device.make_code(now, rng.randrange(1, ecard.CODE_COUNTER_MAX)))


def _answer_fields(a: dict[str, str]) -> str:
    return f"{a['card_sn']} {a['card_challenge']} {a['terminal_challenge']} {a['cryptogram']}"


def _answer(fields: list[str]) -> dict[str, str]:
    sn, cc, tc, cr = fields
    return {"card_sn": sn, "card_challenge": cc, "terminal_challenge": tc, "cryptogram": cr}


def _slot_counts(rate: float) -> dict[str, int]:
    return {k: math.ceil(rate * v * SLOT_S * MARGIN) for k, v in shares().items()}


def _make_slot(args: tuple[BookSpec, Path, int]) -> int:
    spec, out, slot = args
    maker = _worker_maker(spec)
    rng = random.Random(slot)
    now = slot * SLOT_S
    counts = _slot_counts(spec.rate)

    def answer(i: int) -> str:
        return _answer_fields(maker.card_answer(i, now))

    # kind: (drawn among the cards with an e-card, the line after the index, credentials per line)
    kinds: dict[str, tuple[bool, Callable[[int], str], int]] = {
        "ecard": (True, lambda i: maker.ecard_code(i, now, rng), 1),
        "card": (False, answer, 1),
        "metro": (False, lambda i: f"{answer(i)} {answer(i)}", 2),
    }
    made = 0
    for kind, (with_ecard, make, per_line) in kinds.items():
        drawn = (pick_card(rng, spec.online_cards, with_ecard) for _ in range(counts[kind]))
        lines = [f"{i} {make(i)}\n" for i in drawn]
        _write(out / f"{slot}.{kind}", lines)
        made += per_line * len(lines)
    return made


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(lines), encoding="ascii")
    tmp.replace(path)  # a reader never sees half a slot


_makers: dict[BookSpec, Maker] = {}


def _worker_maker(spec: BookSpec) -> Maker:
    maker = _makers.get(spec)
    if maker is None:
        master = KeyRing.load(Path(spec.key_file)).card_auth_master
        maker = _makers[spec] = Maker(master, spec.seed.encode(), spec.ecard_key_pool)
    return maker


def build(
    spec: BookSpec, out: Path, first_slot: int, slots: int, processes: int = 2, progress: bool = True
) -> int:
    """Make slots first_slot .. first_slot + slots - 1 into `out`; returns the credentials made."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(spec, out, s) for s in range(first_slot, first_slot + slots)]
    made = 0
    progress = progress and sys.stderr.isatty()  # a log gets the caller's one line at the end instead
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        for n, k in enumerate(pool.imap(_make_slot, jobs), 1):
            made += k
            if progress:
                print(
                    f"\r  credential book: slot {n}/{slots}, {made:,} credentials",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
    if progress:
        print(file=sys.stderr)
    return made


def _costs(spec: BookSpec) -> tuple[float, float]:
    """(seconds of one process to make one slot, to derive one device key of the pool), measured on a
    few credentials of each kind."""
    maker = _worker_maker(spec)
    rng = random.Random(0)
    counts = _slot_counts(spec.rate)
    maker.ecard_code(0, 0, rng)  # warm
    t0 = time.perf_counter()
    for _ in range(20):
        maker.ecard_code(0, 0, rng)
    per_code = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for j in range(1, 11):
        maker.ecard_code(j, 0, rng)  # derives pool key j, then signs
    per_key = max(0.0, (time.perf_counter() - t0) / 10 - per_code)
    t0 = time.perf_counter()
    for i in range(200):
        maker.card_answer(i, 0)
    per_answer = (time.perf_counter() - t0) / 200
    return counts["ecard"] * per_code + (counts["card"] + 2 * counts["metro"]) * per_answer, per_key


def plan(spec: BookSpec, start_in_s: float, duration_s: float, processes: int = 2) -> tuple[int, int]:
    """(first slot, slots) for a run that starts once the book is made and lasts `duration_s` after
    `start_in_s` seconds of ramp-up: the book's own making time is estimated and added, so that its
    first slot is not already past when the run starts. The estimate errs long (a fifth): a run should
    start at the first slot's time (transit_bench waits for it), not before, or its first credentials
    are made live."""
    per_slot, per_key = _costs(spec)
    slots = math.ceil((start_in_s + duration_s) / SLOT_S) + 2
    # Every process derives the pool's keys it meets once (most of the pool in the first slots).
    making = 1.2 * (per_slot * slots / processes + per_key * spec.ecard_key_pool)
    first = math.ceil((time.time() + making) / SLOT_S)
    return first, slots


class Book:
    """The Locust side: takes credentials of the current slot; None when the slot has none left."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._slot: int | None = None
        self._lists: dict[str, list[str]] = {"ecard": [], "card": [], "metro": []}

    def _take(self, kind: str) -> str | None:
        slot = int(self._clock()) // SLOT_S
        if self._slot is not None and slot < self._slot:
            return None  # the clock stepped back: a slot read before may have been used already
        if slot != self._slot:
            self._slot = slot
            for k in self._lists:
                f = self.path / f"{slot}.{k}"
                self._lists[k] = f.read_text(encoding="ascii").splitlines() if f.exists() else []
                self._lists[k].reverse()  # pop() from the end takes them in the order made
        lst = self._lists[kind]
        return lst.pop() if lst else None

    def ecard_code(self) -> tuple[int, str] | None:
        line = self._take("ecard")
        if line is None:
            return None
        i, code = line.split(" ")
        return int(i), code

    def card_answer(self) -> tuple[int, dict[str, str]] | None:
        line = self._take("card")
        if line is None:
            return None
        f = line.split(" ")
        return int(f[0]), _answer(f[1:5])

    def metro_journey(self) -> tuple[int, dict[str, str], dict[str, str]] | None:
        line = self._take("metro")
        if line is None:
            return None
        f = line.split(" ")
        return int(f[0]), _answer(f[1:5]), _answer(f[5:9])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the book's directory")
    ap.add_argument("--keys", type=Path, required=True, help="the service's key file")
    ap.add_argument("--cards", type=int, required=True, help="online cards: indexes 0 .. N-1 are drawn")
    ap.add_argument("--seed", default="cardsvc-demo", help="population seed (as given to cardsvc seed)")
    ap.add_argument("--ecard-key-pool", type=int, default=population.ECARD_KEY_POOL_DEFAULT)
    ap.add_argument("--rate", type=float, default=2000, help="requests/s of the mix (default 2000)")
    ap.add_argument("--duration", type=float, required=True, help="seconds the run lasts")
    ap.add_argument(
        "--start-in",
        type=float,
        default=30,
        help="seconds of the run before --duration (Locust's ramp-up), covered too (default 30)",
    )
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    spec = BookSpec(str(args.keys), args.seed, args.cards, args.ecard_key_pool, args.rate)
    first, slots = plan(spec, args.start_in, args.duration, args.processes)
    t0 = time.perf_counter()
    made = build(spec, args.out, first, slots, args.processes)
    info = {"credentials": made, "slots": slots, "slot_s": SLOT_S, "first_slot_at": first * SLOT_S}
    sys.stdout.write(orjson.dumps(info).decode() + "\n")
    print(f"made {made:,} credentials for {slots} slots of {SLOT_S} s in {time.perf_counter() - t0:.1f} s -> {args.out}",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
