"""`cardsvc seed`: the rows equal what protocols.population derives, the schema after a seed is the
migrated schema, balances equal their journal, derived credentials verify, refusal and --append."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cardsvc import cli, localtime, seed
from cardsvc.security.keys import KeyRing
from cardsvc.security.pii import PiiVault
from cardsvc.store import seed_state
from cardsvc.transit import fares
from protocols import ecard, idnumber, population
from tests.helpers import ServiceHarness, scratch_database
from tests.service.serving import cli_command, free_port
from tests.transit.test_concessions import bus_tap

SEED = "seed-test"
TABLE = fares.load_demo_table()
QUOTA = TABLE.rules.elderly_annual_quota
POOL = 64  # small, so that some seeded e-cards share a device key


def _env(monkeypatch: pytest.MonkeyPatch, dsn: str, keys: KeyRing, tmp_path: Path) -> None:
    key_file = tmp_path / "seed-keys.json"
    if not key_file.exists():
        keys.write(key_file)
    monkeypatch.setenv("CARDSVC_DATABASE_URL", dsn)
    monkeypatch.setenv("CARDSVC_KEY_FILE", str(key_file))
    monkeypatch.setenv("CARDSVC_DATA_DIR", str(tmp_path / "seed-data"))


async def _cardsvc_seed(*args: str) -> int:
    # The command runs its own event loop: give it a thread, as a shell would give it a process.
    return await asyncio.to_thread(cli.main, ["seed", "--seed", SEED, "--ecard-key-pool", str(POOL), *args])


async def _schema(conn: asyncpg.Connection) -> dict[str, Any]:
    """Everything a seed drops and rebuilds, as the catalog describes it."""
    return {
        "indexes": sorted(
            tuple(r)
            for r in await conn.fetch(
                "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            )
        ),
        "constraints": sorted(
            tuple(r)
            for r in await conn.fetch(
                """SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid),
                          convalidated, conislocal, coninhcount, conparentid <> 0
                   FROM pg_constraint WHERE connamespace = 'public'::regnamespace"""
            )
        ),
        "attached": sorted(
            tuple(r)
            for r in await conn.fetch(
                "SELECT inhrelid::regclass::text, inhparent::regclass::text FROM pg_inherits"
            )
        ),
        "reloptions": sorted(
            (r["relname"], tuple(r["reloptions"] or ()))
            for r in await conn.fetch(
                "SELECT relname, reloptions FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            )
        ),
    }


async def _check_concessions(db: asyncpg.Connection, start: int, stop: int) -> None:
    """The concession rows and their events are what population.concession derives for the seeding day."""
    rows = await db.fetch(
        """SELECT c.holder_id, c.kind, c.quota_year, c.rides_left, c.ended_at, e.op, e.kind_before, e.kind_after,
                  e.rides_left AS event_rides, e.terminal_id, j.at
           FROM concession c JOIN concession_event e USING (holder_id)
           JOIN txn_journal j ON j.card_id = c.holder_id AND j.kind = 4
           WHERE c.holder_id BETWEEN $1 AND $2 ORDER BY 1""",
        start + 1,
        stop,
    )
    expected = {}
    for i in range(start, stop):
        # the seeding day of this person's load (an --append may be another day)
        at = await db.fetchval("SELECT at FROM txn_journal WHERE card_id = $1 AND kind = 4", i + 1)
        kind = population.concession(i, localtime.local_date(at), SEED.encode(), TABLE.rules.elderly_min_age)
        if kind is not None:
            expected[i + 1] = kind
    assert {r["holder_id"]: r["kind"] for r in rows} == expected and len(rows) == len(expected)
    assert {"elderly", "disabled_free", "disabled_half"} <= set(expected.values())
    for r in rows:
        elderly = r["kind"] == "elderly"
        year = localtime.local_date(r["at"]).year
        assert (r["quota_year"], r["rides_left"]) == ((year, QUOTA) if elderly else (None, None))
        assert r["ended_at"] is None
        assert (r["op"], r["kind_before"], r["kind_after"], r["event_rides"], r["terminal_id"]) == (
            "set", None, r["kind"], QUOTA if elderly else None, seed.SEED_TERMINAL
        )


async def _row_of(conn: asyncpg.Connection, i: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT h.id_hash, h.id_cipher, h.name_cipher, h.id_masked, h.name_masked, c.card_no, c.card_sn,
                  c.status, c.holder_id, e.ecard_id, e.device_key, e.alg
           FROM card c JOIN cardholder h USING (holder_id) LEFT JOIN ecard e USING (card_id)
           WHERE c.card_id = $1""",
        i + 1,
    )


def test_row_maker_equals_population_and_vault(keys: KeyRing) -> None:
    """The seeder's fast path computes what person() and PiiVault.seal compute, at awkward indices
    (district, birth-date and sequence wrap-arounds, base-36 digit carries, the last person)."""
    vault = PiiVault(keys)
    pool = seed.device_public_keys(b"x", 3)
    make = seed.row_maker(keys.pii_hash_key, keys.pii_enc_key, b"x", pool, dt.date(2036, 1, 1), dt.datetime.now(dt.UTC))
    starts = [0, 330_000 - 3, 36**4 - 2, 36**5 - 1, 123_456_789, population.POPULATION_MAX - 4]
    for start in starts:
        holders, cards, ecards, purses, journal, _, _ = make(start, start + 4)
        by_card = {e[1]: e for e in ecards}
        for k, i in enumerate(range(start, start + 4)):
            p = population.person(i, b"x")
            sealed = vault.seal(p.id_number, p.name)
            h, c = holders[k], cards[k]
            assert h[0] == c[0] == c[1] == i + 1
            assert h[1] == vault.lookup_hash(p.id_number)
            assert vault.open_id_number(h[2]) == p.id_number and vault.open_name(h[3]) == p.name
            assert (h[4], h[5]) == (sealed.id_masked, sealed.name_masked)
            assert (c[2], c[3], c[6]) == (p.card_no, p.card_sn, p.card_sn[:6])
            assert (i + 1 in by_card) == p.has_ecard
            if p.has_ecard:
                assert by_card[i + 1][4] == pool[i % 3]
            assert purses[k] == (i + 1, seed.OPENING_FEN) and journal[k][4] == seed.OPENING_FEN
    # Fresh random nonces: the same person sealed twice gives different ciphertexts.
    assert make(7, 8)[0][0][2] != make(7, 8)[0][0][2]


def test_row_maker_registers_the_concessions_population_derives(keys: KeyRing) -> None:
    """Concessions as population.concession gives them, as of the seeding day: the elderly only from
    the fare table's age (a birthday on the day counts), with the table's quota for that year."""
    on = dt.date(2026, 11, 30)
    pool = seed.device_public_keys(b"x", 1)
    at = dt.datetime(2026, 11, 30, 1, 0, tzinfo=dt.UTC)
    # People 0..10 are born 1940-01-01, every 11th person one day later: 0..~230,000 cover 1940-1997.
    start, stop = 0, 240_000
    for min_age, quota in ((65, 1200), (70, 900)):
        make = seed.row_maker(
            keys.pii_hash_key, keys.pii_enc_key, b"x", pool, dt.date(2036, 1, 1), at,
            on=on, elderly_min_age=min_age, elderly_quota=quota,
        )  # fmt: skip
        _, _, _, _, _, concessions, events = make(start, stop)
        got = {c[0] - 1: c for c in concessions}
        for i in range(start, stop):
            kind = population.concession(i, on, b"x", elderly_min_age=min_age)
            assert (got[i][1] if i in got else None) == kind, i
        elderly = [c for c in concessions if c[1] == "elderly"]
        assert {(c[2], c[3]) for c in elderly} == {(2026, quota)}
        assert {(c[2], c[3]) for c in concessions if c[1] != "elderly"} == {(None, None)}
        assert [(e[0], e[2], e[3]) for e in events] == [(c[0], c[1], c[3]) for c in concessions]
        assert {(e[1], e[4], e[5]) for e in events} == {("set", seed.SEED_TERMINAL, at)}
        # Everyone registered elderly is old enough on the day, and the youngest of them turns it that day.
        ages = [idnumber.age_on(population.birth_date(c[0] - 1), on) for c in elderly]
        assert min(ages) == min_age
        born_today = [
            i for i in range(start, stop) if population.birth_date(i) == on.replace(year=on.year - min_age)
        ]
        assert born_today and any(i in got and got[i][1] == "elderly" for i in born_today)
        assert all(got[i][1] != "elderly" for i in range(start, stop)
                   if i in got and idnumber.age_on(population.birth_date(i), on) < min_age)  # fmt: skip
        kinds = [c[1] for c in concessions]
        assert {"elderly", "disabled_free", "disabled_half"} <= set(kinds)


async def test_seed_loads_the_derived_population(
    svc: ServiceHarness, db: asyncpg.Connection, keys: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await _schema(db)
    _env(monkeypatch, svc.dsn, keys, tmp_path)
    assert await _cardsvc_seed("--count", "2000", "--jobs", "2") == 0

    counts = await db.fetchrow(
        """SELECT (SELECT count(*) FROM cardholder) AS holders, (SELECT count(*) FROM card) AS cards,
                  (SELECT count(*) FROM ecard) AS ecards, (SELECT count(*) FROM purse) AS purses,
                  (SELECT count(*) FROM txn_journal) AS journal"""
    )
    assert dict(counts) == {"holders": 2000, "cards": 2000, "ecards": 1600, "purses": 2000, "journal": 2000}
    await _check_concessions(db, 0, 2000)

    # Same indexes, constraints (validated), partition attachments and storage options as migrated.
    assert await _schema(db) == before

    # Every row is what the population derives from (seed, index).
    vault = PiiVault(keys)
    pool = seed.device_public_keys(SEED.encode(), POOL)
    rows = await db.fetch(
        """SELECT c.card_id, h.id_hash, h.id_cipher, h.name_cipher, h.id_masked, h.name_masked, c.card_no,
                  c.card_sn, c.status, c.holder_id, e.ecard_id, e.device_key
           FROM card c JOIN cardholder h USING (holder_id) LEFT JOIN ecard e USING (card_id)
           ORDER BY c.card_id"""
    )
    assert [r["card_id"] for r in rows] == list(range(1, 2001))
    for r in rows:
        i = r["card_id"] - 1
        p = population.person(i, SEED.encode())
        assert r["holder_id"] == i + 1 and r["status"] == 2
        assert (r["card_no"], r["card_sn"]) == (p.card_no, p.card_sn)
        assert bytes(r["id_hash"]) == vault.lookup_hash(p.id_number)
        assert vault.open_id_number(bytes(r["id_cipher"])) == p.id_number
        assert vault.open_name(bytes(r["name_cipher"])) == p.name
        sealed = vault.seal(p.id_number, p.name)
        assert (r["id_masked"], r["name_masked"]) == (sealed.id_masked, sealed.name_masked)
        if p.has_ecard:
            assert r["ecard_id"] == i + 1 and bytes(r["device_key"]) == pool[i % POOL]
        else:
            assert r["ecard_id"] is None

    # A balance equals the sum of its journal rows: one opening transfer each.
    wrong = await db.fetchval(
        """SELECT count(*) FROM purse p
           FULL JOIN (SELECT card_id, sum(amount_fen) AS total, count(*) AS n,
                             bool_and(kind = 4 AND counterparty = 'opening' AND source = 4) AS opening
                      FROM txn_journal GROUP BY card_id) j USING (card_id)
           WHERE p.balance_fen IS DISTINCT FROM j.total OR j.n <> 1 OR NOT j.opening
              OR p.balance_fen <> $1""",
        seed.OPENING_FEN,
    )
    assert wrong == 0

    # Credentials derived from an index alone verify: e-cards 2 and 130 (indices 1 and 129) share a key.
    now = int(time.time())
    for i in (1, 1 + 2 * POOL, 1999):
        device = ecard.EcardDevice.from_seed(population.ecard_device_seed(i, SEED.encode(), POOL), i + 1)
        r = await svc.post(
            "/v1/ecard-codes/verify", {"code": device.next_code(now), "business_type": "01"}, as_="merchant_pos"
        )
        assert r.status == 200, r.body
        assert r.body["ecard_id"] == i + 1
        assert r.body["card"]["card_no"] == population.person(i, SEED.encode()).card_no
    # Index 5 has no e-card: a code in its name is refused.
    device = ecard.EcardDevice.from_seed(population.ecard_device_seed(5, SEED.encode(), POOL), 6)
    r = await svc.post(
        "/v1/ecard-codes/verify", {"code": device.next_code(now), "business_type": "01"}, as_="merchant_pos"
    )
    assert r.status == 422 and r.body["code"] == "credential_forged", r.body
    card_sn = population.person(5, SEED.encode()).card_sn
    r = await svc.post("/v1/card-auth", svc.card_auth_body(card_sn), as_="transit_validator")
    assert r.status == 200 and r.body["card"]["status"] == "active", r.body
    r = await svc.get(f"/v1/purses/{population.person(5, SEED.encode()).card_no}", as_="ops")
    assert r.status == 200 and r.body["balance_fen"] == seed.OPENING_FEN, r.body

    # A seeded concession rides as one the card office registered: the elderly free within the quota,
    # the disabled_half at half the full fare.
    on = localtime.local_date(await db.fetchval("SELECT min(at) FROM txn_journal"))
    kinds = {i: population.concession(i, on, SEED.encode()) for i in range(2000)}
    old = next(i for i, k in kinds.items() if k == "elderly")
    half = next(i for i, k in kinds.items() if k == "disabled_half")
    ans = await bus_tap(svc, population.person(old, SEED.encode()).card_sn)
    assert ans["fare_fen"] == 0 and "elderly_free" in ans["rules"], ans
    r = await svc.get(f"/v1/holders/{old + 1}/concession", as_="ops")
    assert r.status == 200 and r.body["elderly_rides_left"] == QUOTA - 1, r.body
    ans = await bus_tap(svc, population.person(half, SEED.encode()).card_sn)
    assert ans["fare_fen"] == TABLE.bus_lines["bus-105"].fare_fen // 2, ans

    # The service carries on after a seed: new holders, cards and e-cards get fresh ids.
    c = await svc.new_card()
    assert await db.fetchval("SELECT max(holder_id) FROM cardholder") == 2001
    assert await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"]) == 2001
    device = await svc.new_ecard(c["card_no"])
    assert device.ecard_id == 2001


async def test_refuses_a_registry_with_cards_unless_append(
    db: asyncpg.Connection,
    db_dsn: str,
    keys: KeyRing,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = await _schema(db)
    _env(monkeypatch, db_dsn, keys, tmp_path)
    assert await _cardsvc_seed("--count", "300", "--jobs", "1") == 0
    capsys.readouterr()
    assert await db.fetchval("SELECT count(*) FROM seed_in_progress") == 0  # a finished seed is whole

    assert await _cardsvc_seed("--count", "300", "--jobs", "2") == 1
    assert "not empty" in capsys.readouterr().err
    assert await db.fetchval("SELECT count(*) FROM card") == 300

    assert await _cardsvc_seed("--count", "200", "--jobs", "2", "--append") == 0
    assert "indices 300..499" in capsys.readouterr().out
    assert await db.fetchval("SELECT count(*) FROM card") == 500
    assert await _schema(db) == before
    await _check_concessions(db, 0, 500)
    vault = PiiVault(keys)
    for i in (300, 499):
        r = await _row_of(db, i)
        assert r is not None
        p = population.person(i, SEED.encode())
        assert (r["card_no"], bytes(r["id_hash"])) == (p.card_no, vault.lookup_hash(p.id_number))
    assert await db.fetchval(
        """SELECT count(*) FROM purse p JOIN (SELECT card_id, sum(amount_fen) AS s FROM txn_journal
                                              GROUP BY card_id) j USING (card_id) WHERE p.balance_fen = j.s"""
    ) == 500
    # txn ids stay unique across the two loads (explicit on the fresh load, the sequence on append)
    assert await db.fetchval("SELECT count(DISTINCT txn_id) FROM txn_journal") == 500


@pytest.fixture
async def second_dsn(pg_admin_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    name = f"cardsvc_test_seed2_{os.getpid()}"
    async with scratch_database(pg_admin_dsn, name, "cardsvc_test_template") as dsn:
        yield dsn


async def test_same_seed_same_registry(
    db_dsn: str, second_dsn: str, keys: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two seeds with the same --seed (and different --jobs) agree on every identity; another seed
    gives other people."""
    query = "SELECT card_id, card_sn, card_no, id_hash FROM card JOIN cardholder USING (holder_id) ORDER BY 1"
    results = []
    for dsn, jobs in ((db_dsn, "2"), (second_dsn, "1")):
        _env(monkeypatch, dsn, keys, tmp_path)
        assert await _cardsvc_seed("--count", "400", "--jobs", jobs) == 0
        conn = await asyncpg.connect(dsn)
        try:
            results.append([tuple(r) for r in await conn.fetch(query)])
        finally:
            await conn.close()
    assert len(results[0]) == 400 and results[0] == results[1]
    other = seed.row_maker(
        keys.pii_hash_key, keys.pii_enc_key, b"another", [b"k"], dt.date(2036, 1, 1), dt.datetime.now(dt.UTC)
    )
    _, cards, *_ = other(0, 400)
    assert {c[3] for c in cards}.isdisjoint({r[1] for r in results[0]})  # other card serial numbers


def _seed_env(db_dsn: str, keys: KeyRing, tmp_path: Path) -> dict[str, str]:
    """The environment of a `cardsvc` subprocess on `db_dsn` with a fresh key file (and a free port)."""
    key_file = tmp_path / "seed-keys.json"
    keys.write(key_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDSVC_")}
    env.update(
        CARDSVC_DATABASE_URL=db_dsn, CARDSVC_KEY_FILE=str(key_file), CARDSVC_DATA_DIR=str(tmp_path / "d"),
        CARDSVC_PORT=str(free_port()),
    )  # fmt: skip
    return env


async def _cli_run(env: dict[str, str], *argv: str) -> tuple[int, str]:
    run = await asyncio.to_thread(
        subprocess.run, [*cli_command(), *argv], env=env, capture_output=True, text=True, timeout=120
    )
    said = run.stdout + run.stderr
    assert "Traceback" not in said, (argv, said)
    return run.returncode, said


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl_c", "killed"])
async def test_a_fresh_seed_interrupted_mid_load_is_refused_by_serve_and_seed(
    db: asyncpg.Connection, db_dsn: str, keys: KeyRing, tmp_path: Path, sig: signal.Signals
) -> None:
    """A fresh seed drops the registry's indexes and constraints, loads, then rebuilds them. Stopped in
    between (Ctrl-C, or killed outright), it left a registry without primary keys, unique indexes and
    foreign keys, and `cardsvc serve` started on it. Now `cardsvc serve`, `cardsvc seed` and `cardsvc
    demo-data` refuse and say what happened; while the seed is still loading they say to wait for it,
    not to start again; nothing of the kind is said for a registry the seed finished."""
    env = _seed_env(db_dsn, keys, tmp_path)
    seeding = await asyncio.to_thread(
        subprocess.Popen,
        [*cli_command(), "seed", "--seed", SEED, "--count", "2000000", "--jobs", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(600):  # bounded: the drop comes seconds after the start
            dropped = not await db.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname = 'card_pkey'")
            if dropped or seeding.poll() is not None:
                break
            await asyncio.sleep(0.1)
        for argv in (["seed", "--seed", SEED, "--count", "10"], ["serve", "--workers", "1"]):
            code, said = await _cli_run(env, *argv)
            assert code != 0 and "seed is loading" in said and "wait for it" in said, (argv, said)
            assert "drop it" not in said, (argv, said)
        assert seeding.poll() is None, "the seed ended before it could be interrupted: raise --count"
        os.killpg(seeding.pid, sig)  # the whole process group, as Ctrl-C in a terminal
    finally:
        output, _ = await asyncio.to_thread(seeding.communicate, timeout=120)
    out = output.decode(errors="replace")
    if sig == signal.SIGINT:
        assert seeding.returncode == 130, (seeding.returncode, out[-2000:])
        assert "interrupted: the registry is incomplete" in out and "Traceback" not in out, out[-2000:]
    else:
        assert seeding.returncode == -signal.SIGKILL, (seeding.returncode, out[-2000:])
    assert await db.fetchval("SELECT count(*) FROM seed_in_progress") == 1

    for argv in (["seed", "--seed", SEED, "--count", "10"], ["serve", "--workers", "1"], ["demo-data", "--cards", "5"]):
        code, said = await _cli_run(env, *argv)
        assert code != 0, (argv, said)
        assert "registry is incomplete" in said and "cardsvc migrate" in said, (argv, said)


async def test_a_seed_killed_before_it_dropped_anything_leaves_the_registry_usable(
    db: asyncpg.Connection, db_dsn: str, keys: KeyRing, tmp_path: Path
) -> None:
    """A fresh seed marks its load as soon as it has found the registry empty, then computes the e-card
    key pool (seconds to minutes at its largest) before it drops anything. Killed in that time, it left
    its mark on a whole, empty registry, and `cardsvc serve` and `cardsvc seed` refused it as incomplete
    until the database was dropped. Now they go on: the mark says nothing was dropped."""
    before = await _schema(db)
    env = _seed_env(db_dsn, keys, tmp_path)
    seeding = await asyncio.to_thread(
        subprocess.Popen,  # 200,000 pool keys: about a minute of key derivation before the drop
        [*cli_command(), "seed", "--seed", SEED, "--count", "1000", "--jobs", "1", "--ecard-key-pool", "200000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(600):
            if await db.fetchval("SELECT count(*) FROM seed_in_progress") or seeding.poll() is not None:
                break
            await asyncio.sleep(0.1)
        code, said = await _cli_run(env, "serve", "--workers", "1")
        assert code != 0 and "seed is loading" in said and "wait for it" in said, said  # still running
        assert seeding.poll() is None, "the seed ended before it could be killed"
        os.killpg(seeding.pid, signal.SIGKILL)
    finally:
        await asyncio.to_thread(seeding.communicate, timeout=120)
    assert await db.fetchval("SELECT NOT dropped FROM seed_in_progress"), "killed after its drop: lower the wait"
    assert (await _schema(db))["indexes"] == before["indexes"]
    assert await seed_state.interrupted_seed(db) is None

    code, said = await _cli_run(env, "seed", "--seed", SEED, "--count", "10", "--ecard-key-pool", "16")
    assert code == 0, said
    assert await db.fetchval("SELECT count(*) FROM card") == 10
    assert await db.fetchval("SELECT count(*) FROM seed_in_progress") == 0
    assert await _schema(db) == before


async def test_a_failure_after_the_last_constraint_is_back_leaves_the_registry_usable(
    db: asyncpg.Connection, db_dsn: str, keys: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every index and constraint is back the registry is whole, whatever fails after (here turning
    autovacuum back on, an ALTER TABLE that can wait and be cancelled): it must not be refused as
    incomplete, which would mean seeding again from nothing."""
    before = await _schema(db)
    real = seed._set_autovacuum

    async def failing(conn: asyncpg.Connection, tables: Sequence[str], *, on: bool) -> None:
        if on:
            raise asyncpg.exceptions.QueryCanceledError("canceling statement due to user request")
        await real(conn, tables, on=on)

    monkeypatch.setattr(seed, "_set_autovacuum", failing)
    opts = seed.SeedOptions(count=300, seed=SEED.encode(), jobs=1, key_pool=16)
    with pytest.raises(asyncpg.exceptions.QueryCanceledError):
        await seed.seed(db_dsn, keys, opts)
    after = await _schema(db)
    assert (after["indexes"], after["constraints"]) == (before["indexes"], before["constraints"])
    assert await seed_state.interrupted_seed(db) is None


async def test_a_seed_worker_dying_as_it_starts_fails_the_seed_instead_of_hanging(
    db_dsn: str, keys: KeyRing, tmp_path: Path
) -> None:
    """A worker process that dies before it reads its arguments (the OOM killer, a failed start; here its
    interpreter is a script that exits at once). The parent passed it the e-card key pool (266 kB) through
    a pipe it kept open, and waited for ever to finish writing; Ctrl-C could not stop it either."""
    fake = tmp_path / "python-that-dies.sh"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *spawn_main*) exit 1;; esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import multiprocessing, sys\n"
        f"multiprocessing.set_executable({str(fake)!r})\n"
        "from cardsvc import cli\n"
        f"sys.exit(cli.main(['seed', '--seed', {SEED!r}, '--count', '2000', '--jobs', '1']))\n"
    )
    env = _seed_env(db_dsn, keys, tmp_path)
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=120
    )
    said = run.stdout + run.stderr
    assert run.returncode == 1 and "a seed worker exited with code 1" in said, said[-2000:]
    assert "registry is incomplete" in said, said[-2000:]


async def test_checks_at_the_same_moment_do_not_take_each_other_for_a_seed(
    db: asyncpg.Connection, db_dsn: str
) -> None:
    """Several services starting at once on an interrupted registry each check it: each must be told it
    is incomplete, not that a seed is loading (a check that took the seed's lock looked like one)."""
    await db.execute("INSERT INTO seed_in_progress (detail) VALUES ('a test')")
    conns = [await asyncpg.connect(db_dsn) for _ in range(8)]

    async def checks(conn: asyncpg.Connection) -> list[str | None]:
        return [await seed_state.interrupted_seed(conn) for _ in range(30)]

    try:
        said = [s for each in await asyncio.gather(*(checks(c) for c in conns)) for s in each]
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    wrong = [s for s in said if s is None or "registry is incomplete" not in s]
    assert not wrong, wrong[:2]


async def _seed_lock_held(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval(
        """SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1
                                AND classid = $1::oid AND objid = $2::oid)""",
        seed_state.SEED_LOCK_KEY >> 32, seed_state.SEED_LOCK_KEY & 0xFFFFFFFF,
    ))  # fmt: skip


async def test_nothing_loads_beside_a_fresh_seed_from_its_first_moment(
    db: asyncpg.Connection, db_dsn: str, keys: KeyRing, tmp_path: Path
) -> None:
    """Between deciding the registry is empty and dropping its indexes, a fresh seed makes its e-card key
    pool (seconds; here 20,000 keys). `demo-data` loaded people meanwhile, and the seed then failed to
    rebuild its unique indexes over them: an incomplete registry. It is refused from the seed's start."""
    env = _seed_env(db_dsn, keys, tmp_path)
    seeding = await asyncio.to_thread(
        subprocess.Popen, [*cli_command(), "seed", "--seed", SEED, "--count", "3000", "--ecard-key-pool", "20000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(600):
            if await _seed_lock_held(db) or seeding.poll() is not None:
                break
            await asyncio.sleep(0.05)
        code, said = await _cli_run(env, "demo-data", "--cards", "5")
        assert code != 0 and "seed is loading" in said, said
    finally:
        output, _ = await asyncio.to_thread(seeding.communicate, timeout=300)
    assert seeding.returncode == 0, output.decode(errors="replace")[-2000:]
    assert await db.fetchval("SELECT count(*) FROM card") == 3000
    assert await seed_state.interrupted_seed(db) is None


async def test_the_seed_workers_stop_when_the_seed_is_killed(
    db: asyncpg.Connection, db_dsn: str, keys: KeyRing, tmp_path: Path
) -> None:
    """The seed process alone is killed (the OOM killer). Its workers loaded on, unsupervised, while the
    registry was already reported incomplete, to be started again. They stop after their chunk."""
    env = _seed_env(db_dsn, keys, tmp_path)
    seeding = await asyncio.to_thread(
        subprocess.Popen, [*cli_command(), "seed", "--seed", SEED, "--count", "2000000", "--jobs", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[int] = []
    try:
        for _ in range(600):
            workers = [p for p in _children(seeding.pid) if "spawn_main" in _cmdline(p)]
            if (workers and await db.fetchval("SELECT count(*) FROM cardholder")) or seeding.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert workers and seeding.poll() is None
    finally:
        seeding.kill()
        await asyncio.to_thread(seeding.wait)
    for _ in range(1200):
        if not any(_cmdline(p) for p in workers):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the seed's workers are still loading after it was killed")
    loaded = await db.fetchval("SELECT count(*) FROM cardholder")
    assert loaded < 2_000_000, "the workers loaded everything after the seed was killed"
    said = await seed_state.interrupted_seed(db)
    assert said is not None and "registry is incomplete" in said, said


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> str:
    """The process's command line; empty once it is gone (or a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
