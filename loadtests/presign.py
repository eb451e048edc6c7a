"""Pre-sign online tap requests for the peak-rate generator (wrk with the Lua script that
loadtests/transit_bench.py writes for each run).

Every tap is a real one: a card answer computed by the card simulator (the card's key derived from the
master key in the key file, as the card itself would hold it), a unique terminal sequence number and nonce,
signed by the validator's key. People are drawn from the deterministic population with a Zipf-like skew
(a few cards ride a lot), so the generator needs no database.

    python -m loadtests.presign --count 200000 --cards 40000000 --out /tmp/taps.tsv \\
        --keys .data/bench/keys.json --terminals .data/bench/demo-terminals.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import orjson

from cardsvc.security.keys import KeyRing
from protocols import card, population, terminal_auth

__all__ = ["main", "presign_taps"]

TAP_PATH = "/v1/transit/taps"
BUS_LINES = ("bus-105", "bus-111", "bus-261", "bus-421")


def skewed_index(rng: random.Random, cards: int) -> int:
    """A Pareto-skewed card index: about 20% of cards take most taps, every card can appear. A Pareto draw
    past the population is drawn again (clamped, 1% of the draws would all land on the last card)."""
    if rng.random() >= 0.8:
        return rng.randrange(cards)
    while True:
        i = int((rng.paretovariate(1.16) - 1.0) * cards / 50.0)  # 80/20
        if i < cards:
            return i


def presign_taps(
    keys: KeyRing,
    creds: dict[str, str],
    count: int,
    cards: int,
    out: Path,
    seed: bytes,
    first_seq: int,
    rng_seed: int = 1,
) -> None:
    rng = random.Random(rng_seed)
    deriver = card.CardKeyDeriver(keys.card_auth_master, card.KEY_PURPOSE_AUTH)
    secret = terminal_auth.decode_secret(creds["secret"])
    tid, kid = creds["terminal_id"], creds["key_id"]
    now = int(time.time())
    with out.open("w", encoding="ascii") as fh:
        for n in range(count):
            p = population.person(skewed_index(rng, cards), seed)
            sim = card.CardSimulator(p.card_sn, card_key=deriver.card_key(p.card_sn))
            auth = card.build_card_auth_request(sim, now, os.urandom(4))
            body = orjson.dumps(
                {
                    "terminal_seq": first_seq + n,
                    "time": now,
                    "mode": "bus",
                    "line_id": BUS_LINES[n % len(BUS_LINES)],
                    "direction": "single",
                    "credential": "card",
                    **auth,
                }
            )
            h = terminal_auth.sign_request(tid, kid, secret, "POST", TAP_PATH, body, now_s=now)
            fh.write(
                "\t".join(
                    [
                        TAP_PATH,
                        tid,
                        kid,
                        h["X-Cardsvc-Timestamp"],
                        h["X-Cardsvc-Nonce"],
                        h["X-Cardsvc-Signature"],
                        body.decode(),
                    ]
                )
                + "\n"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000, help="requests to sign")
    ap.add_argument("--cards", type=int, required=True, help="population size in the database")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keys", type=Path, required=True, help="the service's key file")
    ap.add_argument("--terminals", type=Path, required=True, help="demo-terminals.json")
    ap.add_argument("--seed", default="cardsvc-demo", help="population seed (as given to seed/demo-data)")
    ap.add_argument(
        "--first-seq", type=int, default=None, help="first terminal sequence (default: from clock)"
    )
    args = ap.parse_args(argv)
    creds = orjson.loads(args.terminals.read_bytes())["transit_validator"]
    # Disjoint ranges for runs at least a second apart (up to 100k requests each), within u32.
    first = args.first_seq if args.first_seq is not None else (int(time.time()) % 40_000) * 100_000
    started = time.perf_counter()
    presign_taps(KeyRing.load(args.keys), creds, args.count, args.cards, args.out, args.seed.encode(), first)
    print(f"signed {args.count} taps in {time.perf_counter() - started:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
