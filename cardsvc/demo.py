"""Demo data: a synthetic population (protocols.population) loaded with COPY, and one demo terminal of
every kind whose credentials are written to <data_dir>/demo-terminals.json (mode 0600).

Idempotent: running it again adds only what is missing. Cards are active, have a transit purse, and 80%
have an electronic card whose device key derives from the same seed as the load generators use. New
cardholders get the transit concession `cardsvc seed` would register (population.concession: elderly for
~80 % of those at the fare table's elderly_min_age, a disability kind for ~2.6 %), with a `set` event of
the terminal `demo`, so the demo shows free and half-fare rides as well as full fares.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from cardsvc import localtime
from cardsvc.security import terminals
from cardsvc.security.keys import KeyRing
from cardsvc.security.pii import PiiVault
from protocols import ecard, population, terminal_auth

__all__ = ["DEMO_SEED", "ConcessionRule", "DemoDataConflict", "ensure_demo_terminals", "load_population"]

DEMO_SEED = b"cardsvc-demo"
CHUNK_ROWS = 5_000
DEMO_PURSE_FEN = 5_000
DEMO_BANK_CODE = "ICBC"
# Column order of the rows built here and by cardsvc.seed (COPY targets).
HOLDER_COLUMNS = ("holder_id", "id_hash", "id_cipher", "name_cipher", "id_masked", "name_masked")
CARD_COLUMNS = (
    "card_id",
    "holder_id",
    "card_no",
    "card_sn",
    "status",
    "generation",
    "issuing_area",
    "bank_code",
    "financial_active",
    "has_purse",
    "expires_on",
)
ECARD_COLUMNS = ("ecard_id", "card_id", "channel", "alg", "device_key")
CONCESSION_COLUMNS = ("holder_id", "kind", "quota_year", "rides_left")
# Every demo purse starts with an opening transfer in the journal, so balances equal their journal rows.
OPENING_SQL = """
WITH p AS (
    INSERT INTO purse (card_id, balance_fen) SELECT card_id, $1 FROM demo_card
    WHERE has_purse AND card_id = ANY($2::bigint[])
    ON CONFLICT DO NOTHING RETURNING card_id, balance_fen
)
INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at, counterparty, source)
SELECT card_id, 4, 'demo', card_id, balance_fen, 1, now(), 'opening', 4 FROM p
"""
# Concessions of the cardholders this chunk added (not of those already there: the card office may have
# ended or changed theirs), each with the event the card office's registration writes.
CONCESSION_SQL = """
WITH c AS (
    INSERT INTO concession (holder_id, kind, quota_year, rides_left)
    SELECT d.holder_id, d.kind, d.quota_year, d.rides_left FROM demo_concession d
    WHERE d.holder_id = ANY($1::bigint[])
    ON CONFLICT DO NOTHING RETURNING holder_id, kind, rides_left
)
INSERT INTO concession_event (holder_id, op, kind_after, rides_left, terminal_id)
SELECT holder_id, 'set', kind, rides_left, 'demo' FROM c
"""


@dataclasses.dataclass(frozen=True, slots=True)
class ConcessionRule:
    """What the fare table says about elderly riders: the age from which they ride free and the rides a
    year; concessions are registered as on the city's date `on`."""

    on: dt.date
    elderly_min_age: int = population.ELDERLY_MIN_AGE
    elderly_quota: int = 1_200


def _rows(
    vault: PiiVault, start: int, stop: int, expires: dt.date, rule: ConcessionRule
) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    holders, cards, ecards = [], [], []
    concessions: list[tuple[int, str, int | None, int | None]] = []
    for i in range(start, stop):
        p = population.person(i, DEMO_SEED)
        sealed = vault.seal(p.id_number, p.name)
        holders.append(
            (
                i + 1,
                sealed.id_hash,
                sealed.id_cipher,
                sealed.name_cipher,
                sealed.id_masked,
                sealed.name_masked,
            )
        )
        cards.append(
            (
                i + 1,
                i + 1,
                p.card_no,
                p.card_sn,
                2,
                3,
                p.card_sn[:6],
                DEMO_BANK_CODE,
                True,
                True,
                expires,
            )
        )
        if p.has_ecard:
            device = ecard.EcardDevice.from_seed(p.ecard_seed, i + 1, p.ecard_alg)
            ecards.append((i + 1, i + 1, "gov_app", p.ecard_alg, device.public_key_bytes))
        kind = population.concession(i, rule.on, DEMO_SEED, rule.elderly_min_age)
        if kind == population.ELDERLY:
            concessions.append((i + 1, kind, rule.on.year, rule.elderly_quota))
        elif kind is not None:
            concessions.append((i + 1, kind, None, None))
    return holders, cards, ecards, concessions


# The rows of a chunk's ids that are not the demo people's: the card office registered them (the demo loads
# person i as holder, card and e-card i + 1).
_FOREIGN_SQL = """
SELECT min(id) FROM (
    SELECT h.holder_id AS id FROM cardholder h JOIN demo_holder d USING (holder_id) WHERE h.id_hash <> d.id_hash
    UNION ALL
    SELECT c.card_id FROM card c JOIN demo_card d USING (card_id) WHERE c.card_no <> d.card_no
    UNION ALL
    SELECT e.ecard_id FROM ecard e JOIN demo_ecard d USING (ecard_id) WHERE e.card_id <> d.card_id
) f
"""


class DemoDataConflict(RuntimeError):
    """The ids the demo people take are held by the card office's registrations: nothing of the chunk was loaded."""


async def load_population(
    conn: asyncpg.Connection,
    keys: KeyRing,
    count: int,
    progress: Callable[[int], None] | None = None,
    concessions: ConcessionRule | None = None,
) -> int:
    """Make sure people 0..count-1 exist; returns how many were added. The people added get their
    concessions by `concessions` (default: the demo fare table's rule on today's date in the city).

    Person i is holder, card and e-card i + 1, so demo data goes only into a registry whose ids it filled:
    where the card office registered people in those ids, DemoDataConflict (a demo e-card, whose key comes
    from the public demo seed, or a demo purse must never land on someone's card). A demo person whose ID
    number or card number the office registered at another id is left out."""
    vault = PiiVault(keys)
    rule = concessions or ConcessionRule(localtime.today())
    have: int = await conn.fetchval("SELECT count(*) FROM card WHERE card_id <= $1", count)
    last = await conn.fetchval("SELECT card_no FROM card WHERE card_id = $1", count) if count > 0 else None
    if count <= 0 or (have >= count and last == population.person(count - 1, DEMO_SEED).card_no):
        if progress:
            progress(count)
        return 0
    expires = localtime.today().replace(day=1) + dt.timedelta(days=3650)
    added = 0
    for start in range(0, count, CHUNK_ROWS):
        stop = min(count, start + CHUNK_ROWS)
        holders, cards, ecards, concession_rows = _rows(vault, start, stop, expires, rule)
        async with conn.transaction():
            await conn.execute(
                """CREATE TEMP TABLE IF NOT EXISTS demo_holder (LIKE cardholder INCLUDING DEFAULTS) ON COMMIT DROP;
                   CREATE TEMP TABLE IF NOT EXISTS demo_card (LIKE card INCLUDING DEFAULTS) ON COMMIT DROP;
                   CREATE TEMP TABLE IF NOT EXISTS demo_ecard (LIKE ecard INCLUDING DEFAULTS) ON COMMIT DROP;
                   CREATE TEMP TABLE IF NOT EXISTS demo_concession (LIKE concession INCLUDING DEFAULTS)
                       ON COMMIT DROP;"""
            )
            await conn.copy_records_to_table("demo_holder", records=holders, columns=HOLDER_COLUMNS)
            await conn.copy_records_to_table("demo_card", records=cards, columns=CARD_COLUMNS)
            await conn.copy_records_to_table("demo_ecard", records=ecards, columns=ECARD_COLUMNS)
            await conn.copy_records_to_table(
                "demo_concession", records=concession_rows, columns=CONCESSION_COLUMNS
            )
            foreign = await conn.fetchval(_FOREIGN_SQL)
            if foreign is not None:
                raise DemoDataConflict(
                    f"id {foreign} is the card office's, not demo person {foreign - 1}'s: demo data goes into a "
                    "registry it filled from id 1 (a fresh data dir, or one that only `demo-data` loaded)"
                )
            # Each row only beside its own person's: never a card, e-card or purse for someone else's row.
            new_holders = [
                r["holder_id"]
                for r in await conn.fetch(
                    "INSERT INTO cardholder SELECT * FROM demo_holder ON CONFLICT DO NOTHING RETURNING holder_id"
                )
            ]
            new_cards = [
                r["card_id"]
                for r in await conn.fetch(
                    """INSERT INTO card SELECT * FROM demo_card WHERE holder_id = ANY($1::bigint[])
                       ON CONFLICT DO NOTHING RETURNING card_id""",
                    new_holders,
                )
            ]
            await conn.execute(
                """INSERT INTO ecard SELECT * FROM demo_ecard WHERE card_id = ANY($1::bigint[])
                   ON CONFLICT DO NOTHING""",
                new_cards,
            )
            await conn.execute(OPENING_SQL, DEMO_PURSE_FEN, new_cards)
            await conn.execute(CONCESSION_SQL, new_holders)
            added += len(new_cards)
        if progress:
            progress(stop - start)
    for table, column in (("cardholder", "holder_id"), ("card", "card_id"), ("ecard", "ecard_id")):
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
            f"(SELECT coalesce(max({column}), 0) + 1 FROM {table}), false)"
        )
    return added


async def ensure_demo_terminals(conn: asyncpg.Connection, keys: KeyRing, path: Path) -> dict[str, Any]:
    """One demo terminal per kind; their credentials in `path` (created once, mode 0600)."""
    creds: dict[str, Any] = orjson.loads(path.read_bytes()) if path.exists() else {}  # noqa: ASYNC240
    changed = False
    for kind in terminals.KINDS:
        tid = f"demo-{kind.replace('_', '-')}"
        exists = await conn.fetchval("SELECT 1 FROM terminal WHERE terminal_id = $1", tid)
        if exists:  # a newer cardsvc may give the kind more operations: demo terminals get them all
            await conn.execute(
                "UPDATE terminal SET operations = $2 WHERE terminal_id = $1 AND operations <> $2",
                tid,
                sorted(terminals.KINDS[kind]),
            )
        if exists and kind in creds:
            continue
        if exists:  # credentials file lost: issue a fresh key
            key_id = f"k{int(dt.datetime.now(dt.UTC).timestamp())}"
            secret = await terminals.rotate_key(conn, keys.terminal_kek, tid, key_id, 0)
        else:
            key_id = "k1"
            secret = await terminals.add_terminal(
                conn, keys.terminal_kek, tid, kind, "demo", None, f"demo {kind}"
            )
        creds[kind] = {"terminal_id": tid, "key_id": key_id, "secret": terminal_auth.encode_secret(secret)}
        changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(creds, option=orjson.OPT_INDENT_2))
        tmp.replace(path)
    return creds


def demo_device(index: int, key_pool: int | None = None) -> ecard.EcardDevice:
    """The phone of demo person `index`: its own key (demo data) or key `index mod key_pool` of the pool
    (a database made by `cardsvc seed --ecard-key-pool key_pool`)."""
    p = population.person(index, DEMO_SEED)
    device_seed = p.ecard_seed if key_pool is None else population.ecard_device_seed(index, DEMO_SEED, key_pool)
    return ecard.EcardDevice.from_seed(device_seed, index + 1, p.ecard_alg)
