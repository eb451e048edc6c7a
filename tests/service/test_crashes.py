"""Crashes in the middle of money traffic: a worker killed, the whole service killed, PostgreSQL stopped
without a shutdown or frozen, the service's database connections cut, each while terminals send taps,
top-ups and offline uploads at once.

The terminals do what docs/api.md "Retries, idempotency and replay" tells them: a request without an
answer (connection reset, refused, 503) is sent again, re-signed, with the same body, until it is answered;
an upload whose answer was lost is uploaded again. The validator uploads its batches in order, one at a
time, as a real one does. Then every request is sent once more, and then the database is read:

- nothing lost: every approval a terminal received is in the journal under its key, with its txn_id and
  amount, after the restart;
- nothing twice: one journal row per approved key, none for a declined or refused one, no row of these
  terminals that no request asked for, and a later copy of any request answers the first answer again
  (`replayed_answer: true`);
- every purse equals its journal, and `cardsvc audit` passes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from cardsvc import demo
from cardsvc.security.keys import KeyRing
from cardsvc.store.embedded import DATABASE_NAME, EmbeddedPostgres
from protocols import card, population, transit
from tests.helpers import purse_vs_journal
from tests.service.serving import (
    Service,
    cli_command,
    load_people,
    metric_samples,
    poll,
    refuses_connections,
    service_env,
)

pytestmark = pytest.mark.slow

TAP_PATH = "/v1/transit/taps"
OFFLINE_PATH = "/v1/transit/offline-batches"
PEOPLE_LOADED = 40
TAP_CARDS = 6  # online taps and top-ups
OFFLINE_CARDS = 4  # the validator's offline records
TAPS_PER_CARD = 45  # with the transfer discount, ~23 charged bus fares: more than the opening 50 yuan
TOPUPS_PER_CARD = 2
TOPUP_FEN = 1_000
OFFLINE_BATCHES = 12  # one record per offline card each
OFFLINE_FEN = 180
OFFLINE_FIRST_SEQ = 100_000  # the validator's online taps use 1..; one sequence space per terminal
SENDERS = 8  # taps and top-ups in flight at once
FAULT_AFTER = 90  # answers received before the fault
ATTEMPTS = 600  # per request; with RETRY_S between attempts, how long a terminal keeps trying
RETRY_S = 0.1
BUS_LINES = ("bus-105", "bus-111", "bus-261", "bus-421")
CUTS = 5  # times the database ends the service's sessions
CUT_EVERY_S = 0.05
CUT_COMMITS = 12  # commits whose acknowledgement the proxy drops
FREEZE_S = 4.0  # longer than the request timeout the freeze test sets (2 s)


@dataclasses.dataclass
class Sent:
    """One transaction a terminal wants answered (a tap, a top-up, an offline batch)."""

    kind: str  # "tap", "topup", "offline"
    path: str
    body: bytes
    as_: str
    answer: dict[str, Any] | None = None
    attempts: int = 0
    lost: int = 0  # attempts that got no answer (connection lost or refused, 503)


class Terminals:
    """The terminals' side: send until answered, counting what got lost on the way."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.answered = 0
        self.unexpected: list[tuple[str, int, Any]] = []

    async def until_answered(self, sent: Sent) -> None:
        while sent.answer is None:
            sent.attempts += 1
            if sent.attempts > ATTEMPTS:
                raise AssertionError(f"a {sent.kind} got no answer in {ATTEMPTS} attempts:\n{self.svc.log()[-3000:]}")
            try:
                status, _, body = await self.svc.post_raw(sent.path, sent.body, as_=sent.as_)
            except (TimeoutError, aiohttp.ClientError, OSError):
                sent.lost += 1
                await asyncio.sleep(RETRY_S)
                continue
            if status == 200:
                sent.answer = body
                self.answered += 1
            elif status == 503:
                sent.lost += 1
                await asyncio.sleep(RETRY_S)
            else:
                self.unexpected.append((sent.kind, status, body))
                return


def _tap(svc: Service, keys: KeyRing, person: int, seq: int) -> Sent:
    p = population.person(person, demo.DEMO_SEED)
    deriver = card.CardKeyDeriver(keys.card_auth_master, card.KEY_PURPOSE_AUTH)
    sim = card.CardSimulator(p.card_sn, card_key=deriver.card_key(p.card_sn))
    now = int(time.time())
    body = {
        "terminal_seq": seq,
        "time": now,
        "mode": "bus",
        "line_id": BUS_LINES[seq % len(BUS_LINES)],
        "direction": "single",
        "credential": "card",
        **card.build_card_auth_request(sim, now, os.urandom(4)),
    }
    return Sent("tap", TAP_PATH, orjson.dumps(body), "transit_validator")


def _topup(person: int, seq: int) -> Sent:
    card_no = population.person(person, demo.DEMO_SEED).card_no
    body = {"terminal_seq": seq, "amount_fen": TOPUP_FEN, "channel": "bank"}
    return Sent("topup", f"/v1/purses/{card_no}/top-ups", orjson.dumps(body), "bank_channel")


async def _offline_batches(svc: Service, keys: KeyRing, dsn: str, people: list[int]) -> list[Sent]:
    """The validator's offline debits on `people`, as their chips sign them, in upload order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT balance_fen, purse_seq FROM purse WHERE card_id = ANY($1::bigint[]) ORDER BY card_id",
            [p + 1 for p in people],
        )
    finally:
        await conn.close()
    assert len(rows) == len(people)
    deriver = card.CardKeyDeriver(keys.card_tac_master, card.KEY_PURPOSE_TAC)
    chips = []
    for person, row in zip(sorted(people), rows, strict=True):
        sn = population.person(person, demo.DEMO_SEED).card_sn
        chips.append(transit.PurseCard(sn, tac_key=deriver.card_key(sn), balance_fen=row["balance_fen"],
                                       purse_seq=row["purse_seq"]))
    tid = svc.terminals["transit_validator"].terminal_id
    seq = OFFLINE_FIRST_SEQ
    txn_time = int(time.time()) - 600
    batches = []
    for batch_id in range(1, OFFLINE_BATCHES + 1):
        records = []
        for chip in chips:
            records.append(chip.debit(OFFLINE_FEN, tid, seq, txn_time + seq - OFFLINE_FIRST_SEQ, line_id="bus-105"))
            seq += 1
        body = orjson.dumps(transit.batch_to_dict(transit.OfflineBatch(tid, batch_id, records)))
        batches.append(Sent("offline", OFFLINE_PATH, body, "transit_validator"))
    return batches


async def _run_traffic(
    svc: Service, keys: KeyRing, dsn: str, people: list[int], fault: Callable[[], Awaitable[None]]
) -> tuple[list[Sent], Terminals]:
    rng = random.Random(7)
    online: list[Sent] = []
    seq = 1
    riders, offline_riders = people[:TAP_CARDS], people[TAP_CARDS:]
    for _ in range(TAPS_PER_CARD):
        for person in riders:
            online.append(_tap(svc, keys, person, seq))
            seq += 1
    topups = [_topup(person, n) for n, person in enumerate(riders * TOPUPS_PER_CARD, 1)]
    for t in topups:  # top-ups arrive among the taps
        online.insert(rng.randrange(len(online) // 4, len(online)), t)
    offline = await _offline_batches(svc, keys, dsn, offline_riders)
    terminals = Terminals(svc)
    queue: asyncio.Queue[Sent] = asyncio.Queue()
    for s in online:
        queue.put_nowait(s)

    async def sender() -> None:
        while not queue.empty():
            await terminals.until_answered(queue.get_nowait())

    async def uploader() -> None:
        for batch in offline:  # in order: the next batch's records follow this one's on each chip
            await terminals.until_answered(batch)

    async def faulting() -> None:
        await poll("answers before the fault", _reaches(lambda: terminals.answered, FAULT_AFTER))
        await fault()

    await asyncio.gather(*(sender() for _ in range(SENDERS)), uploader(), faulting())
    return online + offline, terminals


def _reaches(value: Callable[[], int], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return value() >= n

    return check


def _replayed(answer: dict[str, Any] | None) -> bool:
    assert answer is not None
    return bool(answer.get("replayed_answer")) or any(r["replayed_answer"] for r in answer.get("records", []))


def _same_answer(first: dict[str, Any], again: dict[str, Any]) -> bool:
    if "records" in first:
        return bool([{**r, "replayed_answer": True} for r in first["records"]] == again["records"])
    return {**first, "replayed_answer": True} == again


async def _check_books(svc: Service, dsn: str, sent: list[Sent], terminals: Terminals) -> None:
    assert not terminals.unexpected, terminals.unexpected[:5]
    assert all(s.answer is not None for s in sent)
    assert sum(s.lost for s in sent) > 0, "the fault cost no request its answer: it tested nothing"

    # Every request sent once more gets the answer it got first, and changes nothing.
    again = Terminals(svc)
    copies = [dataclasses.replace(s, answer=None, attempts=0, lost=0) for s in sent]
    await asyncio.gather(*(again.until_answered(c) for c in copies))
    assert not again.unexpected, again.unexpected[:5]
    differ = [(s.answer, c.answer) for s, c in zip(sent, copies, strict=True) if not _same_answer(s.answer, c.answer)]  # type: ignore[arg-type]
    assert not differ, differ[:3]

    # What each terminal was told is what the journal holds, once.
    expected: dict[tuple[str, int], tuple[int | None, int]] = {}  # key -> (txn_id, amount)
    validator = svc.terminals["transit_validator"].terminal_id
    bank = svc.terminals["bank_channel"].terminal_id
    for s in sent:
        body, answer = orjson.loads(s.body), s.answer
        assert answer is not None
        if s.kind == "tap":
            if answer["result"] == "approved" and (answer["fare_fen"] or answer["txn_id"] is not None):
                expected[(validator, body["terminal_seq"])] = (answer["txn_id"], -answer["fare_fen"])
        elif s.kind == "topup":
            assert answer["result"] == "approved", answer
            expected[(bank, body["terminal_seq"])] = (answer["txn_id"], TOPUP_FEN)
        else:
            for record, verdict in zip(body["records"], answer["records"], strict=True):
                assert verdict["result"] == "accepted", verdict  # the chips' records are all valid
                expected[(validator, record["terminal_seq"])] = (None, -OFFLINE_FEN)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT terminal_id, terminal_seq, array_agg(txn_id) AS txn_ids, sum(amount_fen) AS amount
               FROM txn_journal WHERE terminal_id = ANY($1::text[]) GROUP BY 1, 2""",
            [validator, bank],
        )
    finally:
        await conn.close()
    journal = {(r["terminal_id"], r["terminal_seq"]): (r["txn_ids"], r["amount"]) for r in rows}
    assert set(journal) == set(expected), (set(expected) - set(journal), set(journal) - set(expected))
    for key, (txn_id, amount) in expected.items():
        txn_ids, total = journal[key]
        assert len(txn_ids) == 1 and total == amount, (key, txn_ids, total, amount)
        assert txn_id is None or txn_ids == [txn_id], (key, txn_ids, txn_id)
    declined = [s.answer for s in sent if s.kind == "tap" and s.answer and s.answer["result"] == "declined"]
    assert declined and {a["reason"] for a in declined} == {"insufficient_balance"}, declined[:3]

    bad = [r for r in await purse_vs_journal(dsn) if r["balance_fen"] != r["journal"]]
    assert not bad, bad
    audit = await asyncio.to_thread(
        subprocess.run,
        [*cli_command(), "audit"],
        env=service_env(svc.tmp, dsn, svc.key_file, svc.port),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr


async def _service(
    tmp: Path, dsn: str, keys: KeyRing, client_timeout_s: float
) -> tuple[Service, list[int]]:
    """The service with its terminals, and the people (population indices) who pay full fares, so
    that purses run out and declines happen: the first TAP_CARDS of them tap, the others ride offline."""
    await load_people(dsn, keys, PEOPLE_LOADED)
    conn = await asyncpg.connect(dsn)
    try:
        ids = await conn.fetch(
            """SELECT c.card_id FROM card c JOIN purse USING (card_id) WHERE NOT EXISTS
                   (SELECT 1 FROM concession k WHERE k.holder_id = c.holder_id)
               ORDER BY c.card_id LIMIT $1""",
            TAP_CARDS + OFFLINE_CARDS,
        )
    finally:
        await conn.close()
    people = [r["card_id"] - 1 for r in ids]  # card_id = population index + 1
    assert len(people) == TAP_CARDS + OFFLINE_CARDS
    svc = Service(tmp, dsn, keys, workers=2, client_timeout_s=client_timeout_s)
    for kind in ("transit_validator", "bank_channel", "card_office"):
        await svc.add_terminal(kind)
    return svc, people


async def _survives(
    tmp: Path,
    dsn: str,
    keys: KeyRing,
    fault: Callable[[Service], Awaitable[None]],
    client_timeout_s: float = 30.0,
    after: Callable[[Service], Awaitable[None]] | None = None,
    books_dsn: str | None = None,
    **env: str,
) -> list[Sent]:
    """Run the traffic with `fault` struck once FAULT_AFTER answers are in, check the books (through
    `books_dsn`, default `dsn`); what was sent, with its answers. A terminal gives up on an answer after
    `client_timeout_s` and resends."""
    svc, people = await _service(tmp, dsn, keys, client_timeout_s)
    try:
        svc.start(**env)
        await svc.wait_ready()

        async def strike() -> None:
            await fault(svc)

        sent, terminals = await _run_traffic(svc, keys, dsn, people, strike)
        await _check_books(svc, books_dsn or dsn, sent, terminals)
        if after is not None:
            await after(svc)
        return sent
    finally:
        await svc.close()


async def test_a_worker_killed_mid_traffic_loses_nothing_and_charges_nothing_twice(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """The kernel's OOM killer (SIGKILL) takes one worker: the supervisor starts another, and the
    terminals' retries land on either."""

    victims: list[int] = []

    async def kill_a_worker(svc: Service) -> None:
        victims.append(min(svc.live_worker_pids()))
        os.kill(victims[0], signal.SIGKILL)
        await poll("a worker to replace the killed one", svc.replaced(victims[0]))

    async def after(svc: Service) -> None:
        # The dead worker's live gauges (requests in flight, pool connections) are dropped, not summed
        # into /metrics for ever: its files are gone, and nothing is in flight but the scrape itself.
        pattern = f"cardsvc-metrics-*/gauge_live*_{victims[0]}.db"
        left = await asyncio.to_thread(lambda: [p.name for p in tmp_path.glob(pattern)])
        assert not left, left
        status, _, text = await svc.send("GET", "/metrics")
        assert status == 200
        in_flight = sum(v for _, v in metric_samples(text, "cardsvc_http_requests_in_flight"))
        assert in_flight <= 1, in_flight
        assert "worker died; restarting" in svc.log()

    await _survives(tmp_path, db_dsn, keys_for_process, kill_a_worker, after=after)


async def test_the_service_killed_mid_traffic_loses_nothing_and_charges_nothing_twice(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """The host's power goes: the supervisor and every worker die at once (SIGKILL to the group), and
    the service is started again on the same port while the terminals keep retrying."""

    async def kill_everything(svc: Service) -> None:
        svc.kill_all()

        async def down() -> bool:
            return refuses_connections(svc.port)

        await poll("the killed service to stop answering", down)
        svc.start()
        await svc.wait_ready()

    await _survives(tmp_path, db_dsn, keys_for_process, kill_everything)


async def test_postgresql_crashing_mid_traffic_loses_nothing_and_charges_nothing_twice(
    own_postgres: EmbeddedPostgres, own_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """PostgreSQL stops without a checkpoint (`pg_ctl stop -m immediate`, what a crash leaves) and
    recovers from its WAL: what it acknowledged is there, what it did not is retried. The database's
    default is `synchronous_commit = off`, which the service's connections override."""
    conn = await asyncpg.connect(own_dsn)
    try:  # tuned for speed, as an operator might: the service's sessions must turn it back on
        await conn.execute(f"ALTER DATABASE {DATABASE_NAME} SET synchronous_commit = off")
    finally:
        await conn.close()

    async def crash_postgres(svc: Service) -> None:
        await asyncio.to_thread(own_postgres.stop, "immediate")

        async def unavailable() -> bool:
            status, _, _ = await svc.get("/readyz", sign=False)
            return status == 503

        await poll("the service to see the database gone", unavailable)
        await asyncio.to_thread(own_postgres.start)

    await _survives(tmp_path, own_dsn, keys_for_process, crash_postgres)


async def test_connections_cut_mid_traffic_lose_nothing_and_charge_nothing_twice(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """The network between the service and PostgreSQL drops its connections (here: the server ends every
    session of the service, five times in a row) while transactions are in flight. The server ends a
    session between statements, so this rolls back transactions midway and hands the pool dead
    connections; a lost commit acknowledgement is the next test's."""

    async def cut_connections(_: Service) -> None:
        conn = await asyncpg.connect(db_dsn)
        try:
            for _cut in range(CUTS):
                await conn.execute(
                    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                       WHERE application_name = 'cardsvc' AND datname = current_database()"""
                )
                await asyncio.sleep(CUT_EVERY_S)
        finally:
            await conn.close()

    await _survives(tmp_path, db_dsn, keys_for_process, cut_connections)


class CommitCutter:
    """A proxy between the service and PostgreSQL (Unix sockets). While armed, it passes a COMMIT on to
    the server, lets the server answer, and closes the service's side without passing the answer on:
    the transaction is committed and the service never hears so (a network cut, a failover at that
    instant). The ambiguous case of every commit protocol."""

    READY_FOR_QUERY = b"Z\x00\x00\x00\x05"

    def __init__(self, upstream: Path, here: Path) -> None:
        self.upstream = str(upstream / ".s.PGSQL.5432")
        self.here = here
        self.to_cut = 0
        self.cut = 0

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.here}&port=5432"

    async def __aenter__(self) -> CommitCutter:
        self.server = await asyncio.start_unix_server(self._relay, path=str(self.here / ".s.PGSQL.5432"))
        return self

    async def __aexit__(self, *_: object) -> None:
        self.server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_unix_connection(self.upstream)
        cutting = asyncio.Event()

        async def to_server() -> None:
            while data := await client_r.read(65536):
                if self.to_cut > 0 and b"COMMIT" in data:
                    self.to_cut -= 1
                    cutting.set()
                server_w.write(data)
                await server_w.drain()

        async def to_client() -> None:
            while data := await server_r.read(65536):
                if cutting.is_set():  # the COMMIT's answer: dropped, and both sides closed
                    while self.READY_FOR_QUERY not in data and (more := await server_r.read(65536)):
                        data += more
                    self.cut += 1
                    return
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.ensure_future(to_server()), asyncio.ensure_future(to_client())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            for pump in pumps:
                pump.cancel()
            for w in (client_w, server_w):
                w.close()


async def test_commit_acknowledgements_lost_mid_traffic_find_their_answers_on_resend(
    own_postgres: EmbeddedPostgres, own_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """Twelve commits of the service's transactions reach the database, which commits them, and their
    acknowledgements never come back. The service cannot know; it must answer 503 (never a decision,
    never a 500), and each resend must get the committed answer (`replayed_answer`), not a second
    charge or credit."""
    proxy_dir = Path(tempfile.mkdtemp(prefix="cardsvc-proxy-"))
    try:
        async with CommitCutter(own_postgres.socket_dir, proxy_dir) as cutter:

            async def cut_commits(_: Service) -> None:
                cutter.to_cut = CUT_COMMITS
                try:
                    await poll("the commits to cut", _reaches(lambda: cutter.cut, CUT_COMMITS))
                finally:
                    cutter.to_cut = 0

            sent = await _survives(
                tmp_path, cutter.dsn(DATABASE_NAME), keys_for_process, cut_commits, books_dsn=own_dsn
            )
    finally:
        shutil.rmtree(proxy_dir, ignore_errors=True)
    replayed = [s for s in sent if s.lost and _replayed(s.answer)]
    assert replayed, "no resend found a committed answer: no commit's acknowledgement was lost"


def _postgres_pids(server: EmbeddedPostgres) -> list[int]:
    """The postmaster and every process it started (backends, checkpointer, WAL writer, ...)."""
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster, *children]


async def test_postgresql_freezing_mid_traffic_loses_nothing_and_charges_nothing_twice(
    own_postgres: EmbeddedPostgres, own_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """PostgreSQL stops answering for longer than a request may take (its storage stalls: here every
    process of it is stopped with SIGSTOP), then carries on. Requests meanwhile answer 503 `timeout`, and
    the ones whose transaction commits after all are found by the resend. The terminals give up waiting
    after a second, before the service's deadline, so a resend often arrives while its original is still
    in flight: it must wait for it and answer the same, never decide the key a second time."""

    async def freeze_postgres(_: Service) -> None:
        pids = _postgres_pids(own_postgres)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(FREEZE_S)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    await _survives(
        tmp_path,
        own_dsn,
        keys_for_process,
        freeze_postgres,
        client_timeout_s=1.0,
        CARDSVC_REQUEST_TIMEOUT_S="2",
        CARDSVC_DB_COMMAND_TIMEOUT_S="1",
    )
