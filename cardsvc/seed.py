"""`cardsvc seed`: a large synthetic registry (tens of millions of cards) for load and size tests.

Cardholder i (0-based) of protocols.population gets holder_id = card_id = ecard_id = i + 1, an active card
with a transit purse whose opening balance is a journal transfer (kind 4 'opening', so every balance equals
the sum of its journal rows), for 80% of people an electronic card, and for about a quarter a transit
concession (population.concession: elderly for ~80 % of those aged 65 or more on the seeding day, a
disability kind for ~2.6 %), registered with a `concession_event` like the card office's. Everything derives from
(--seed, i), so a load generator presents valid credentials for any index without reading the database.
E-card device keys come from a pool of --ecard-key-pool precomputed keys (population.ecard_device_seed):
an SM2 public key costs ~0.3 ms to derive, too slow for 32 million e-cards.

Speed (docs/schema.md, "Seeding"): rows are generated in --jobs worker processes, each with its own
connection, and sent with binary COPY in chunks. Into an empty registry the indexes, primary keys and
foreign keys of the loaded tables are dropped first and rebuilt afterwards from the definitions read
from the catalog before the load (same names, same definitions); CHECK and NOT NULL constraints stay
and are checked row by row. --append adds people after the highest existing id through the indexes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import multiprocessing as mp
import os
import queue
import re
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

try:  # the context factory behind Cipher(...).encryptor(), without its per-call type checks (-1.3 us)
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _encryption_ctx: Callable[[Any, Any], Any] = _rust_openssl.ciphers.create_encryption_ctx
except (ImportError, AttributeError):  # pragma: no cover - another cryptography layout

    def _encryption_ctx(algorithm: Any, mode: Any) -> Any:
        return Cipher(algorithm, mode).encryptor()

from cardsvc import localtime
from cardsvc.demo import CARD_COLUMNS, ECARD_COLUMNS, HOLDER_COLUMNS
from cardsvc.store.seed_state import INCOMPLETE_ADVICE, SEED_LOCK_KEY, interrupted_seed
from protocols import idnumber, population, sm

__all__ = [
    "OPENING_FEN",
    "SeedError",
    "SeedOptions",
    "SeedReport",
    "device_public_keys",
    "row_maker",
    "seed",
]

CHUNK_ROWS = 50_000
OPENING_FEN = 5_000
BANK_CODE = "ICBC"
SEED_TERMINAL = "seed"
KIND_OPENING = 4  # cardsvc.transit.taps.KIND_OPENING
SOURCE_OFFICE = 4
CARD_STATUS_ACTIVE = 2
CARD_GENERATION = 3
ECARD_CHANNEL = "gov_app"
# Tables the load writes to, parents before children. Their primary keys, unique and plain indexes and
# the foreign keys on or to them are rebuilt after a load into an empty registry.
LOADED_TABLES = ("cardholder", "concession", "concession_event", "card", "ecard", "purse", "txn_journal")

PURSE_COLUMNS = ("card_id", "balance_fen")
CONCESSION_COLUMNS = ("holder_id", "kind", "quota_year", "rides_left")
CONCESSION_EVENT_COLUMNS = ("holder_id", "op", "kind_after", "rides_left", "terminal_id", "at")
JOURNAL_COLUMNS = (
    "card_id",
    "kind",
    "terminal_id",
    "terminal_seq",
    "amount_fen",
    "result",
    "at",
    "counterparty",
    "source",
)


class SeedError(RuntimeError):
    """A refusal or failure an operator can act on (printed as one line)."""




@dataclasses.dataclass(frozen=True)
class SeedOptions:
    count: int
    seed: bytes = b"cardsvc-demo"
    jobs: int = 0  # 0: os.cpu_count()
    key_pool: int = population.ECARD_KEY_POOL_DEFAULT
    append: bool = False
    chunk_rows: int = CHUNK_ROWS
    index_connections: int = 0  # 0: os.cpu_count()
    maintenance_work_mem: str = "1GB"
    ecard_alg: int = sm.ALG_SM2_SM3
    # From the fare table (cardsvc.transit.fare_table.Rules): who is registered elderly, with how many rides.
    elderly_min_age: int = population.ELDERLY_MIN_AGE
    elderly_quota: int = 1_200


@dataclasses.dataclass
class SeedReport:
    first_index: int
    count: int
    fresh: bool
    rows: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    worker_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    index_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    database_bytes: int = 0
    table_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    concessions: dict[str, int] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------ rows


def device_public_keys(seed: bytes, pool: int, alg: int = sm.ALG_SM2_SM3) -> list[bytes]:
    """Public keys of the e-card device key pool (key j from population.ecard_pool_seed(j, seed))."""
    return [
        sm.public_key_bytes(sm.private_key_from_seed(alg, population.ecard_pool_seed(j, seed)))
        for j in range(pool)
    ]


_B36_PAIRS = [a + b for a in population._B36 for b in population._B36]
_NONCE_BYTES = sm.SM4_GCM_NONCE_LEN_BYTES


def _partial_sum(digits: str, offset: int) -> int:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)  # idnumber: ISO 7064 MOD 11-2
    return sum(int(c) * weights[offset + k] for k, c in enumerate(digits))


def row_maker(
    hash_key: bytes,
    enc_key: bytes,
    seed: bytes,
    pool_keys: Sequence[bytes],
    expires: dt.date,
    at: dt.datetime,
    ecard_alg: int = sm.ALG_SM2_SM3,
    on: dt.date | None = None,
    elderly_min_age: int = population.ELDERLY_MIN_AGE,
    elderly_quota: int = 1_200,
) -> Callable[[int, int], tuple[list[tuple[Any, ...]], ...]]:
    """A function (start, stop) -> (holders, cards, ecards, purses, journal, concessions, concession
    events) rows for people start..stop-1, registering concessions as the card office would on the
    local date `on` (default: the city's date at `at`), an elderly one with `elderly_quota` rides for
    that year.

    Computes exactly what population.person(i, seed), population.concession(i, on, seed) and
    PiiVault.seal give (tests compare them), with the per-person work cut down: ID-number check sums
    from precomputed partial sums, one keyed SM3 state copied per look-up hash, SM4 key schedule objects
    and random nonces prepared per chunk, the elderly age test per birth date.
    """
    areas = population._AREAS
    n_areas = len(areas)
    days = population._DAYS
    area_sums = [_partial_sum(a, 0) for a in areas]
    births = [
        (population._BIRTH_START + dt.timedelta(days=d)).strftime("%Y%m%d") for d in range(days)
    ]
    birth_sums = [_partial_sum(b, 6) for b in births]
    today = on if on is not None else localtime.local_date(at)
    aged = [
        idnumber.age_on(population._BIRTH_START + dt.timedelta(days=d), today) >= elderly_min_age
        for d in range(days)
    ]
    elderly = population.ELDERLY
    concession_kind = population.concession_kind
    seqs = [f"{s:03d}" for s in range(1000)]
    seq_sums = [_partial_sum(s, 14) for s in seqs]
    checks = idnumber._CHECK_CHARS
    surnames, given = population._SURNAMES, population._GIVEN
    n_sur, n_given = len(surnames), len(given)
    sn_prefix = f"{population.CARD_AREA}D156000005"
    area_code = population.CARD_AREA
    base = hashlib.new("sm3", seed)
    keyed = hmac.new(hash_key, digestmod="sm3")
    sm4 = algorithms.SM4(enc_key)
    n_pool = len(pool_keys)
    pairs = _B36_PAIRS

    def seal(nonce: bytes, plain: bytes, aad: bytes) -> bytes:
        enc = _encryption_ctx(sm4, modes.GCM(nonce))
        enc.authenticate_additional_data(aad)
        ct = enc.update(plain) + enc.finalize()
        sealed: bytes = nonce + ct + enc.tag
        return sealed

    def make(start: int, stop: int) -> tuple[list[tuple[Any, ...]], ...]:
        assert 0 <= start <= stop <= population.POPULATION_MAX
        holders: list[tuple[Any, ...]] = []
        cards: list[tuple[Any, ...]] = []
        ecards: list[tuple[Any, ...]] = []
        purses: list[tuple[Any, ...]] = []
        journal: list[tuple[Any, ...]] = []
        concessions: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        nonces = os.urandom(2 * _NONCE_BYTES * (stop - start))
        pos = 0
        for i in range(start, stop):
            a = i % n_areas
            rest = i // n_areas
            b = rest % days
            s = rest // days
            seq = seqs[s]
            tail = seq + checks[(area_sums[a] + birth_sums[b] + seq_sums[s]) % 11]
            area = areas[a]
            id_number = area + births[b] + tail
            h = base.copy()
            h.update(i.to_bytes(8, "big"))
            d = h.digest()
            if d[2] % 2:
                name = surnames[d[0] % n_sur] + given[d[1] % n_given] + given[d[3] % n_given]
                name_masked = name[0] + "**"
            else:
                name = surnames[d[0] % n_sur] + given[d[1] % n_given]
                name_masked = name[0] + "*"
            k = keyed.copy()
            id_bytes = id_number.encode()
            k.update(id_bytes)
            nonce1 = nonces[pos : pos + _NONCE_BYTES]
            nonce2 = nonces[pos + _NONCE_BYTES : pos + 2 * _NONCE_BYTES]
            pos += 2 * _NONCE_BYTES
            ident = i + 1
            holders.append(
                (
                    ident,
                    k.digest(),
                    seal(nonce1, id_bytes, b"id_number"),
                    seal(nonce2, name.encode(), b"name"),
                    area + "********" + tail,
                    name_masked,
                )
            )
            hi, lo = divmod(i, 1679616)  # 36**4
            card_no = (
                "A" + pairs[hi // 1296] + pairs[hi % 1296] + pairs[lo // 1296] + pairs[lo % 1296]
            )
            cards.append(
                (
                    ident,
                    ident,
                    card_no,
                    f"{sn_prefix}{i:08X}{d[4:8].hex().upper()}",
                    CARD_STATUS_ACTIVE,
                    CARD_GENERATION,
                    area_code,
                    BANK_CODE,
                    True,
                    True,
                    expires,
                )
            )
            if i % 5:
                ecards.append((ident, ident, ECARD_CHANNEL, ecard_alg, pool_keys[i % n_pool]))
            purses.append((ident, OPENING_FEN))
            journal.append(
                (ident, KIND_OPENING, SEED_TERMINAL, ident, OPENING_FEN, 1, at, "opening", SOURCE_OFFICE)
            )
            kind = concession_kind(d, aged[b])
            if kind is not None:
                rides = elderly_quota if kind == elderly else None
                concessions.append((ident, kind, today.year if kind == elderly else None, rides))
                events.append((ident, "set", kind, rides, SEED_TERMINAL, at))
        return holders, cards, ecards, purses, journal, concessions, events

    return make


# ------------------------------------------------------------------ worker processes


@dataclasses.dataclass(frozen=True)
class _WorkerArgs:
    dsn: str
    hash_key: bytes
    enc_key: bytes
    seed: bytes
    pool_keys_path: str  # the e-card key pool, in a file: too large for the process's arguments (see _load)
    pool_key_len: int
    expires: dt.date
    at: dt.datetime
    on: dt.date
    ecard_alg: int
    elderly_min_age: int
    elderly_quota: int
    journal_table: str
    explicit_txn_id: bool
    parent: int  # the seed's process: a worker whose parent is gone stops (see _worker_main)


def _worker(args: _WorkerArgs, tasks: Any, results: Any) -> None:
    """Takes (start, stop) ranges until None; reports ("done", rows, gen_s, copy_s) per range."""
    try:
        import uvloop

        uvloop.run(_worker_main(args, tasks, results))
    except BaseException:  # reported to the parent, which stops the load
        results.put(("error", traceback.format_exc(limit=8)))


async def _worker_main(args: _WorkerArgs, tasks: Any, results: Any) -> None:
    conn = await asyncpg.connect(args.dsn, server_settings={"application_name": "cardsvc-seed"})
    try:
        await conn.execute("SET synchronous_commit = off")
        pool = Path(args.pool_keys_path).read_bytes()  # noqa: ASYNC240 - once, before the worker's first chunk
        pool_keys = [pool[i : i + args.pool_key_len] for i in range(0, len(pool), args.pool_key_len)]
        results.put(("ready",))  # the parent removes the file once every worker has it
        make = row_maker(
            args.hash_key,
            args.enc_key,
            args.seed,
            pool_keys,
            args.expires,
            args.at,
            args.ecard_alg,
            args.on,
            args.elderly_min_age,
            args.elderly_quota,
        )
        journal_columns = (("txn_id", *JOURNAL_COLUMNS)) if args.explicit_txn_id else JOURNAL_COLUMNS
        loop = asyncio.get_running_loop()
        while True:
            task = await loop.run_in_executor(None, tasks.get)
            if task is None or os.getppid() != args.parent:  # done, or the seed was killed: load no more
                break
            start, stop = task
            t0 = time.perf_counter()
            holders, cards, ecards, purses, journal, concessions, events = make(start, stop)
            if args.explicit_txn_id:
                journal = [(r[0], *r) for r in journal]  # txn_id = card_id
            t1 = time.perf_counter()
            async with conn.transaction():
                await conn.copy_records_to_table("cardholder", records=holders, columns=HOLDER_COLUMNS)
                await conn.copy_records_to_table("concession", records=concessions, columns=CONCESSION_COLUMNS)
                await conn.copy_records_to_table(
                    "concession_event", records=events, columns=CONCESSION_EVENT_COLUMNS
                )
                await conn.copy_records_to_table("card", records=cards, columns=CARD_COLUMNS)
                await conn.copy_records_to_table("ecard", records=ecards, columns=ECARD_COLUMNS)
                await conn.copy_records_to_table("purse", records=purses, columns=PURSE_COLUMNS)
                await conn.copy_records_to_table(
                    args.journal_table, records=journal, columns=journal_columns
                )
            t2 = time.perf_counter()
            rows = sum(map(len, (holders, cards, ecards, purses, journal, concessions, events)))
            results.put(("done", stop - start, rows, t1 - t0, t2 - t1))
    finally:
        await conn.close()


# ------------------------------------------------------------------ schema: drop and rebuild


@dataclasses.dataclass(frozen=True)
class _Ddl:
    table: str
    name: str
    kind: str  # "constraint" (p, u), "fkey" or "index"
    create: str
    drop: str


async def _capture_ddl(conn: asyncpg.Connection) -> list[_Ddl]:
    """Every primary key, unique constraint, index and foreign key on (or referencing) the loaded
    tables, as read from the catalog: the rebuild recreates exactly these."""
    oids = [await conn.fetchval("SELECT $1::regclass::oid", t) for t in LOADED_TABLES]
    out: list[_Ddl] = []
    cons = await conn.fetch(
        """SELECT conrelid::regclass::text AS tbl, conname, contype::text, pg_get_constraintdef(oid) AS def
           FROM pg_constraint
           WHERE contype IN ('p', 'u', 'f') AND conparentid = 0
             AND (conrelid = ANY($1::oid[]) OR (contype = 'f' AND confrelid = ANY($1::oid[])))
           ORDER BY conrelid, conname""",
        oids,
    )
    for r in cons:
        ident = f'"{r["conname"]}"'
        out.append(
            _Ddl(
                r["tbl"],
                r["conname"],
                "fkey" if r["contype"] == "f" else "constraint",
                f"ALTER TABLE {r['tbl']} ADD CONSTRAINT {ident} {r['def']}",
                f"ALTER TABLE {r['tbl']} DROP CONSTRAINT {ident}",
            )
        )
    idx = await conn.fetch(
        """SELECT i.indrelid::regclass::text AS tbl, c.relname, pg_get_indexdef(i.indexrelid) AS def
           FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           WHERE i.indrelid = ANY($1::oid[])
             AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                             WHERE k.conindid = i.indexrelid AND k.contype IN ('p', 'u', 'x'))
           ORDER BY i.indrelid, c.relname""",
        oids,
    )
    for r in idx:
        # A partitioned table's index reads "ON ONLY parent"; created "ON parent" it is built on every
        # partition again, under the partition index names the migrations gave them.
        create = re.sub(r" ON ONLY ", " ON ", r["def"], count=1)
        out.append(_Ddl(r["tbl"], r["relname"], "index", create, f'DROP INDEX "{r["relname"]}"'))
    return out


async def _set_autovacuum(conn: asyncpg.Connection, tables: Sequence[str], on: bool) -> None:
    """Autovacuum would scan the tables again and again while they grow; off for the load only."""
    for t in tables:
        if on:
            await conn.execute(f"ALTER TABLE {t} RESET (autovacuum_enabled)")
        else:
            await conn.execute(f"ALTER TABLE {t} SET (autovacuum_enabled = false)")


def _plan_rebuild(ddl: list[_Ddl], connections: int) -> list[list[_Ddl]]:
    """Index builds grouped per table (a table's builds run one after another, so that the ACCESS
    EXCLUSIVE lock of ADD PRIMARY KEY never waits), tables spread over the connections, biggest first."""
    weight = {"card": 5, "cardholder": 3, "txn_journal": 2, "ecard": 2, "purse": 1, "concession": 1, "concession_event": 1}
    by_table: dict[str, list[_Ddl]] = {}
    for d in ddl:
        if d.kind != "fkey":
            by_table.setdefault(d.table, []).append(d)
    for items in by_table.values():
        items.sort(key=lambda d: d.kind != "constraint")  # primary key first
    lanes: list[list[_Ddl]] = [[] for _ in range(max(1, connections))]
    loads = [0] * len(lanes)
    for table in sorted(by_table, key=lambda t: -weight.get(t, len(by_table[t]))):
        k = loads.index(min(loads))
        lanes[k].extend(by_table[table])
        loads[k] += weight.get(table, len(by_table[table]))
    return [lane for lane in lanes if lane]


# ------------------------------------------------------------------ the command


def _chunks(start: int, count: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(start, start + count, size):
        yield lo, min(start + count, lo + size)


async def _session(conn: asyncpg.Connection, opts: SeedOptions, parallel: int) -> None:
    await conn.execute(
        f"SET maintenance_work_mem = '{opts.maintenance_work_mem}'; "
        f"SET max_parallel_maintenance_workers = {int(parallel)}; "
        "SET synchronous_commit = off; SET lock_timeout = 0; SET statement_timeout = 0; "
        f"SET work_mem = '256MB'"
    )


_ID_SEQUENCES = (("cardholder", "holder_id"), ("card", "card_id"), ("ecard", "ecard_id"))


async def _id_sequence(conn: asyncpg.Connection, table: str, column: str) -> tuple[str, int, int]:
    """The identity sequence of `table.column`, the last id it handed out (0: none) and the column's highest."""
    seq = await conn.fetchval("SELECT pg_get_serial_sequence($1, $2)", table, column)
    used = await conn.fetchval(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {seq}")
    top = await conn.fetchval(f"SELECT coalesce(max({column}), 0) FROM {table}")
    return seq, int(used), int(top)


async def _reserve_ids(conn: asyncpg.Connection, count: int) -> int:
    """--append: the ids the load takes (after the highest id in use or handed out), reserved. The service may
    be registering people meanwhile: their ids come after these (the sequences moved past them), and none
    can take one while they are chosen (its INSERT waits for this lock). Returns the last id before them."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE cardholder, card, ecard IN SHARE ROW EXCLUSIVE MODE")
        states = [await _id_sequence(conn, table, column) for table, column in _ID_SEQUENCES]
        first = max(max(used, top) for _, used, top in states)
        for seq, _, _ in states:
            await conn.execute("SELECT setval($1, $2)", seq, first + count)
    return first


async def seed(
    dsn: str,
    keys: Any,
    opts: SeedOptions,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SeedReport:
    """Load opts.count people into the database at `dsn` (migrated); see the module docstring."""
    say = log or (lambda _msg: None)
    if opts.count < 1:
        raise SeedError("--count must be at least 1")
    if not 1 <= opts.key_pool <= 1_000_000:
        raise SeedError("--ecard-key-pool must be 1..1000000")
    jobs = opts.jobs or os.cpu_count() or 1
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "cardsvc-seed"})
    fresh = False
    ddl: list[_Ddl] = []
    try:
        await conn.execute("SET lock_timeout = 0; SET statement_timeout = 0")
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SEED_LOCK_KEY):
            raise SeedError("another seed is loading this database; wait for it to finish")
        if (left := await interrupted_seed(conn)) is not None:  # held by us: interrupted, if anything
            raise SeedError(left)
        present = await conn.fetchrow(
            """SELECT EXISTS (SELECT 1 FROM cardholder) AS holders, EXISTS (SELECT 1 FROM card) AS cards,
                      EXISTS (SELECT 1 FROM ecard) AS ecards, EXISTS (SELECT 1 FROM purse) AS purses,
                      EXISTS (SELECT 1 FROM txn_journal) AS journal,
                      greatest((SELECT max(holder_id) FROM cardholder), (SELECT max(card_id) FROM card),
                               (SELECT max(ecard_id) FROM ecard), 0) AS top"""
        )
        fresh = not any(present[k] for k in ("holders", "cards", "ecards", "purses", "journal"))
        if not fresh and not opts.append:
            raise SeedError(
                "the registry is not empty (cardholders, cards or journal rows exist); refusing to seed "
                "(--append adds people after the highest id, through the indexes: slower)"
            )
        first = int(present["top"])
        if not fresh:
            first = await _reserve_ids(conn, opts.count)
        if first + opts.count > population.POPULATION_MAX:
            raise SeedError(f"the synthetic population has {population.POPULATION_MAX} people")
        report = SeedReport(first, opts.count, fresh)
        # A row left by a seed that was stopped before its drop (migration 0017) changed nothing: ours now.
        await conn.execute("DELETE FROM seed_in_progress WHERE NOT dropped")
        if fresh:  # from now on: nothing may use the registry until the load is done (migration 0016)
            await conn.execute(
                "INSERT INTO seed_in_progress (detail, dropped) VALUES ($1, false)",
                f"a fresh load of {opts.count} people, without the registry's indexes and constraints",
            )

        t = time.perf_counter()
        at = await conn.fetchval("SELECT date_trunc('second', now())")
        await conn.execute("SELECT cardsvc_ensure_partitions(current_date, 2)")
        probe = conn.transaction()  # which partition takes the opening rows: ask, then roll back
        await probe.start()
        try:
            journal_table = await conn.fetchval(
                """INSERT INTO txn_journal (card_id, kind, terminal_id, terminal_seq, amount_fen, result, at)
                   VALUES (0, 0, 'probe', 0, 0, 0, $1) RETURNING tableoid::regclass::text""",
                at,
            )
        finally:
            await probe.rollback()
        pool_keys = device_public_keys(opts.seed, opts.key_pool, opts.ecard_alg)
        report.seconds["key_pool"] = time.perf_counter() - t

        autovac_tables = [*LOADED_TABLES[:-1], journal_table]
        if fresh:
            t = time.perf_counter()
            captured = await _capture_ddl(conn)
            async with conn.transaction():
                await conn.execute("UPDATE seed_in_progress SET dropped = true")  # with the drop, or not at all
                for d in captured:
                    if d.kind == "fkey":
                        await conn.execute(d.drop)
                for d in captured:
                    if d.kind != "fkey":
                        await conn.execute(d.drop)
                await _set_autovacuum(conn, autovac_tables, on=False)
            ddl = captured  # dropped: to be rebuilt
            report.seconds["drop_indexes"] = time.perf_counter() - t
            say(f"dropped {len(ddl)} indexes and constraints; loading into bare tables")
    except BaseException:
        if fresh and not ddl:  # failed before anything was dropped: the registry is whole (and empty)
            with contextlib.suppress(Exception):
                await conn.execute("DELETE FROM seed_in_progress")
        await conn.close()
        raise

    try:
        t = time.perf_counter()
        report.rows = await _load(
            dsn, keys, opts, jobs, first, at, journal_table, fresh, pool_keys, report, progress
        )
        report.seconds["load"] = time.perf_counter() - t
        if fresh:
            t = time.perf_counter()
            await _rebuild(dsn, ddl, opts, report, say)
            report.seconds["indexes"] = time.perf_counter() - t
            t = time.perf_counter()
            for d in ddl:
                if d.kind == "fkey":
                    t1 = time.perf_counter()
                    await conn.execute(d.create)
                    report.index_seconds[d.name] = time.perf_counter() - t1
            report.seconds["foreign_keys"] = time.perf_counter() - t
            ddl = []
            await conn.execute("DELETE FROM seed_in_progress")  # whole again, whatever comes next
            await _set_autovacuum(conn, autovac_tables, on=True)
        t = time.perf_counter()
        for table, column in (*_ID_SEQUENCES, ("txn_journal", "txn_id")):
            seq, used, top = await _id_sequence(conn, table, column)
            if top > used:  # only ever forward: the service may be handing out ids (--append)
                await conn.execute("SELECT setval($1, $2)", seq, top)
        for table in LOADED_TABLES:
            await conn.execute(f"ANALYZE {table}")
        report.seconds["analyze"] = time.perf_counter() - t
        first_id = first + 1
        for r in await conn.fetch(
            "SELECT kind, count(*) AS n FROM concession WHERE holder_id >= $1 GROUP BY kind ORDER BY kind", first_id
        ):
            report.concessions[r["kind"]] = int(r["n"])
        report.database_bytes = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        for r in await conn.fetch(
            """SELECT c.relname, pg_total_relation_size(c.oid) AS bytes FROM pg_class c
               WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
                 AND c.relname = ANY($1::text[])
               ORDER BY 2 DESC""",
            [*LOADED_TABLES[:-1], journal_table],
        ):
            report.table_bytes[r["relname"]] = int(r["bytes"])
    except Exception as exc:
        if ddl:
            raise SeedError(f"{str(exc) or type(exc).__name__}\n{INCOMPLETE_ADVICE}") from exc
        raise
    finally:
        await conn.close()
    report.seconds["total"] = time.perf_counter() - started
    return report


async def _load(
    dsn: str,
    keys: Any,
    opts: SeedOptions,
    jobs: int,
    first: int,
    at: dt.datetime,
    journal_table: str,
    fresh: bool,
    pool_keys: list[bytes],
    report: SeedReport,
    progress: Callable[[int], None] | None,
) -> int:
    ctx = mp.get_context("spawn")
    tasks: Any = ctx.Queue()
    results: Any = ctx.Queue()
    chunks = list(_chunks(first, opts.count, opts.chunk_rows))
    for c in chunks:
        tasks.put(c)
    jobs = max(1, min(jobs, len(chunks)))
    for _ in range(jobs):
        tasks.put(None)
    with tempfile.NamedTemporaryFile(prefix="cardsvc-seed-keys-", delete=False) as fh:
        fh.write(b"".join(pool_keys))
    args = _WorkerArgs(
        dsn,
        keys.pii_hash_key,
        keys.pii_enc_key,
        opts.seed,
        fh.name,
        len(pool_keys[0]),
        localtime.local_date(at).replace(day=1) + dt.timedelta(days=3650),
        at,
        localtime.local_date(at),
        opts.ecard_alg,
        opts.elderly_min_age,
        opts.elderly_quota,
        journal_table,
        explicit_txn_id=fresh,
        parent=os.getpid(),
    )
    procs = [ctx.Process(target=_worker, args=(args, tasks, results), daemon=True) for _ in range(jobs)]
    # A process's arguments go through a pipe that the parent writes while it still holds the read end: a
    # child that dies before reading them (Ctrl-C as it starts, the OOM killer) left the parent's write
    # waiting for ever once they were larger than the pipe holds, as the key pool was (266 kB by default,
    # up to 65 MB). They are small now. The workers also start with SIGINT blocked (the mask is inherited
    # across fork and exec): Ctrl-C is the parent's to handle, and it stops them.
    loop = asyncio.get_running_loop()
    done = rows = ready = 0
    gen_s = copy_s = 0.0
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        while done < len(chunks):
            try:
                msg = await loop.run_in_executor(None, results.get, True, 1.0)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise SeedError(f"a seed worker exited with code {dead[0].exitcode}") from None
                continue
            if msg[0] == "ready":
                ready += 1
                if ready == jobs:
                    os.unlink(fh.name)
                continue
            if msg[0] == "error":
                raise SeedError(f"a seed worker failed:\n{msg[1]}")
            _, people, n, g, c = msg
            done += 1
            rows += n
            gen_s += g
            copy_s += c
            if progress:
                progress(people)
        for p in procs:
            await loop.run_in_executor(None, p.join)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        tasks.close()
        results.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fh.name)
    report.worker_seconds = {"generate": gen_s, "copy": copy_s}
    return rows


async def _rebuild(
    dsn: str, ddl: list[_Ddl], opts: SeedOptions, report: SeedReport, say: Callable[[str], None]
) -> None:
    lanes = _plan_rebuild(ddl, opts.index_connections or os.cpu_count() or 1)
    # With one lane PostgreSQL's parallel workers use the cores; with several, the lanes do.
    parallel = max(0, (os.cpu_count() or 1) - 1) if len(lanes) == 1 else 0

    async def run(lane: list[_Ddl]) -> None:
        conn = await asyncpg.connect(dsn, server_settings={"application_name": "cardsvc-seed"})
        try:
            await _session(conn, opts, parallel)
            for d in lane:
                t = time.perf_counter()
                await conn.execute(d.create)
                report.index_seconds[d.name] = time.perf_counter() - t
                say(f"built {d.name} in {report.index_seconds[d.name]:.1f} s")
        finally:
            await conn.close()

    await asyncio.gather(*(run(lane) for lane in lanes))


def format_report(report: SeedReport) -> str:
    s = report.seconds
    total = s.get("total", 0.0)
    lines = [
        f"seeded {report.count} cardholders (indices {report.first_index}..{report.first_index + report.count - 1}, "
        f"{'fresh registry: indexes rebuilt' if report.fresh else 'appended through the indexes'})",
        f"wall time {total:.1f} s: {report.count / total:,.0f} cards/s, {report.rows / total:,.0f} rows/s "
        f"({report.rows} rows)",
        "stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items() if k != "total"),
        f"workers (summed over processes): generate {report.worker_seconds.get('generate', 0):.1f} s, "
        f"copy {report.worker_seconds.get('copy', 0):.1f} s",
    ]
    if report.index_seconds:
        lines.append(
            "index and key builds: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(report.index_seconds.items(), key=lambda kv: -kv[1]))
        )
    if report.concessions:
        lines.append(
            "concessions registered: " + ", ".join(f"{k} {v:,}" for k, v in report.concessions.items())
        )
    lines.append(f"database size {report.database_bytes / 2**20:,.0f} MiB")
    for name, size in report.table_bytes.items():
        lines.append(f"  {name:<24} {size / 2**20:>10,.0f} MiB")
    return "\n".join(lines)
