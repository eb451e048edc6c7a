"""Test helpers: a signed client for the API and builders of cardholders, cards and credentials."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import os
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson

from cardsvc.app import create_app
from cardsvc.config import Settings
from cardsvc.security import terminals
from cardsvc.security.keys import KeyRing
from cardsvc.store import migrate
from protocols import card, ecard, idnumber, sm, terminal_auth

_serial = itertools.count(1)


def with_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@contextlib.asynccontextmanager
async def scratch_database(admin_dsn: str, name: str, template: str | None = None) -> AsyncIterator[str]:
    """A database created for one test (empty, or cloned from `template`) and dropped after it."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    finally:
        await admin.close()
    try:
        yield with_database(admin_dsn, name)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


async def migrated(dsn: str) -> str:
    """Apply the migrations to the database at `dsn`; returns `dsn`."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.apply(conn)
    finally:
        await conn.close()
    return dsn


async def migrated_before(conn: asyncpg.Connection, version: int) -> None:
    """The schema as an older release left it: the migrations before `version` applied and recorded, as
    `migrate.apply` would have (a migration's upgrade test then runs `migrate.apply` for the rest)."""
    await conn.execute("CREATE TABLE schema_migration (version int PRIMARY KEY, name text NOT NULL, "
                       "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")  # fmt: skip
    for m in migrate.available():
        if m.version >= version:
            break
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute("INSERT INTO schema_migration (version, name, checksum) VALUES ($1, $2, $3)",
                               m.version, m.name, m.checksum)  # fmt: skip


async def purse_vs_journal(dsn: str) -> list[asyncpg.Record]:
    """Every purse with the sum of its journal rows (the ledger invariant: they are equal)."""
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(
            """SELECT p.card_id, p.balance_fen, coalesce(j.total, 0) AS journal,
                      EXISTS (SELECT 1 FROM ride_cert r WHERE r.card_id = p.card_id) AS has_cert
               FROM purse p
               LEFT JOIN (SELECT card_id, sum(amount_fen) AS total FROM txn_journal GROUP BY card_id) j
                      ON j.card_id = p.card_id"""
        ))
    finally:
        await conn.close()


@dataclasses.dataclass
class Terminal:
    terminal_id: str
    key_id: str
    secret: bytes


@dataclasses.dataclass
class Response:
    status: int
    headers: Any
    body: Any


def new_id_number(rng_seq: int | None = None, birth: dt.date | None = None) -> str:
    n = next(_serial) if rng_seq is None else rng_seq
    if birth is None:
        birth = dt.date(1950, 1, 1) + dt.timedelta(days=(n * 37) % 20000)
    return idnumber.make_id_number("500101", birth, n % 1000)


async def until_lock_waits(db: asyncpg.Connection, waiting: int = 1) -> None:
    """Return once `waiting` backends wait for a lock (pg_locks is read live, not from a snapshot): the
    way a race test knows its other transaction has reached the lock it holds."""
    for _ in range(500):
        if await db.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted") >= waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{waiting} lock waits never came")


def new_card_numbers() -> tuple[str, str]:
    n = next(_serial)
    card_no = f"T{n:08d}"
    card_sn = "500100D156000005" + secrets.token_hex(8).upper()
    return card_no, card_sn


def replacement_body() -> dict[str, str]:
    """A replacement card's numbers and expiry, for POST /v1/cards/{card_no}/replace."""
    new_no, new_sn = new_card_numbers()
    expires = (dt.date.today() + dt.timedelta(days=3650)).isoformat()
    return {"new_card_no": new_no, "new_card_sn": new_sn, "expires_on": expires}


class ServiceHarness:
    def __init__(self, dsn: str, keys: KeyRing, settings: Settings) -> None:
        self.dsn = dsn
        self.keys = keys
        self.settings = settings
        self.terminals: dict[str, Terminal] = {}

    async def start(self, aiohttp_client: Any) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            for kind in terminals.KINDS:
                await self.add_terminal(conn, kind, kind)
        finally:
            await conn.close()
        self.app = create_app(self.settings, self.dsn, self.keys, maintenance=False)
        self.client = await aiohttp_client(self.app)

    async def add_terminal(
        self, conn: asyncpg.Connection, name: str, kind: str, ops: list[str] | None = None
    ) -> Terminal:
        tid = f"{name}-{next(_serial)}"[:32]
        secret = await terminals.add_terminal(conn, self.keys.terminal_kek, tid, kind, "test-org", ops)
        self.terminals[name] = Terminal(tid, "k1", secret)
        return self.terminals[name]

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        as_: str = "card_office",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        sign: bool = True,
        now_s: int | None = None,
        nonce: str | None = None,
    ) -> Response:
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
        hdrs = {"Content-Type": "application/json"} if data else {}
        if sign:
            t = self.terminals[as_]
            hdrs.update(
                terminal_auth.sign_request(
                    t.terminal_id, t.key_id, t.secret, method, path, data, now_s=now_s, nonce=nonce
                )
            )
        hdrs.update(headers or {})
        resp = await self.client.request(method, path, data=data, headers=hdrs)
        text = await resp.read()
        try:
            parsed = orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            parsed = text.decode(errors="replace")
        return Response(resp.status, resp.headers, parsed)

    async def get(self, path: str, **kw: Any) -> Response:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return await self.request("POST", path, {} if body is None else body, **kw)

    async def put(self, path: str, body: Any = None, **kw: Any) -> Response:
        return await self.request("PUT", path, {} if body is None else body, **kw)

    async def balance(self, card_no: str) -> int:
        """A card's transit purse balance, as the ops terminal reads it."""
        r = await self.get(f"/v1/purses/{card_no}", as_="ops")
        assert r.status == 200, r.body
        return int(r.body["balance_fen"])

    async def metric_total(self, name: str, **labels: str) -> float:
        """The sum of the samples of counter `name` whose labels include `labels`, as scraped now."""
        from prometheus_client.parser import text_string_to_metric_families

        r = await self.request("GET", "/metrics", sign=False)
        assert r.status == 200
        return sum(
            s.value
            for family in text_string_to_metric_families(r.body)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    # ---------------------------------------------------------------- builders

    async def new_holder(self, birth: dt.date | None = None) -> int:
        r = await self.post("/v1/holders", {"id_number": new_id_number(birth=birth), "name": "张三丰"})
        assert r.status == 201, r.body
        return int(r.body["holder_id"])

    async def new_card(
        self,
        *,
        activate: bool = True,
        has_purse: bool = False,
        birth: dt.date | None = None,
        holder_id: int | None = None,
        expires_on: dt.date | None = None,
    ) -> dict[str, Any]:
        """A card of holder `holder_id`, or of a new holder born on `birth`, valid to `expires_on` (default
        ten years)."""
        if holder_id is None:
            holder_id = await self.new_holder(birth)
        card_no, card_sn = new_card_numbers()
        r = await self.post(
            "/v1/cards",
            {
                "holder_id": holder_id,
                "card_no": card_no,
                "card_sn": card_sn,
                "expires_on": (expires_on or dt.date.today() + dt.timedelta(days=3650)).isoformat(),
                "has_purse": has_purse,
            },
        )
        assert r.status == 201, r.body
        if activate:
            r = await self.post(f"/v1/cards/{card_no}/activate", {"operator": "staff-1"})
            assert r.status == 200, r.body
        return dict(r.body)

    def card_sim(self, card_sn: str) -> card.CardSimulator:
        return card.CardSimulator(card_sn, master_key=self.keys.card_auth_master)

    def card_auth_body(self, card_sn: str, now_s: int | None = None) -> dict[str, str]:
        return card.build_card_auth_request(self.card_sim(card_sn), now_s or int(time.time()), os.urandom(4))

    async def new_ecard(self, card_no: str, alg: int = sm.ALG_SM2_SM3) -> ecard.EcardDevice:
        device = ecard.EcardDevice.generate(1, alg)  # the id is known only once signed
        r = await self.post(
            "/v1/ecards",
            {
                "card_no": card_no,
                "channel": "gov_app",
                "alg": alg,
                "device_public_key": device.public_key_bytes.hex(),
            },
            as_="ecard_channel",
        )
        assert r.status == 201, r.body
        return ecard.EcardDevice(alg, device.private_key, r.body["ecard_id"])
