"""Terminals and operators: who may call what, and with which keys.

A terminal has a kind (transit validator, hospital HIS, pharmacy POS, merchant POS, agency, card office,
e-card channel, ops), an organisation, the operations it may call (a subset of its kind's) and one or
more HMAC-SM3 keys. Secrets are 32 random bytes, shown once at creation, stored encrypted with the
terminal key-encryption key. Rotation adds a new key and gives the old one an end (the overlap period).

Every worker keeps all terminals and keys in memory (`TerminalRegistry`): a request never reads the
database to authenticate. When the database NOTIFYs a change, and as a fallback on a timer, the cache reads
the terminals changed since it last read (migration 0021), not all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import secrets
from collections.abc import Iterable, Mapping

import asyncpg

from protocols import sm, terminal_auth
from protocols.errors import CiphertextInvalid

__all__ = [
    "KINDS",
    "OPERATIONS",
    "KeyFileMismatch",
    "KeyRecord",
    "TerminalAdminError",
    "TerminalRecord",
    "TerminalRegistry",
    "add_terminal",
    "check_key_file",
    "rotate_key",
    "secret_aad",
]

log = logging.getLogger("cardsvc.terminals")

OPERATIONS: dict[str, str] = {
    "holder.create": "register cardholders",
    "holder.lookup": "find a cardholder by ID number",
    "card.issue": "issue cards",
    "card.read": "read cards and their audit trail",
    "card.lifecycle": "activate, lift or formalise losses, replace, cancel, lock and unlock cards",
    "card.report_loss": "report a card lost (temporary loss)",
    "ecard.issue": "sign electronic cards",
    "ecard.revoke": "revoke electronic cards",
    "ecard.read": "read electronic cards",
    "card.authenticate": "verify physical card cryptograms",
    "ecard.verify": "verify electronic card codes",
    "hotlist.read": "download hotlist changes",
    "transit.tap": "send online transit taps",
    "transit.upload": "upload offline transit records and ride-code rides",
    "purse.read": "read a transit purse and its history",
    "purse.topup": "top up (or refund) a transit purse",
    "purse.correct_fare": "give a charged fare back to its purse (the operator pays it back through clearing), "
    "or an elderly quota ride back to its holder's quota",
    "ridecert.issue": "sign ride-code certificates for phones",
    "clearing.read": "read daily clearing reports",
    "concession.read": "read a cardholder's transit concession",
    "concession.manage": "register, extend (elderly extra rides) and end transit concessions",
}

_ACCEPTANCE = frozenset({"card.authenticate", "ecard.verify", "hotlist.read"})
# The kinds whose staff check the holder in person (a hospital, a pharmacy, a government counter, an agency,
# the card office): a credential check answers them the holder's masked name and ID number. A gate or a
# shop only needs to know whether the card may be used (data minimisation, PIPL art. 6).
HOLDER_SHOWN_TO: frozenset[str] = frozenset({"hospital_his", "pharmacy_pos", "government_service", "agency", "card_office"})

KINDS: dict[str, frozenset[str]] = {
    "transit_validator": _ACCEPTANCE | {"transit.tap", "transit.upload"},
    "hospital_his": _ACCEPTANCE,
    "pharmacy_pos": _ACCEPTANCE,
    "merchant_pos": _ACCEPTANCE,
    "government_service": _ACCEPTANCE | {"card.read"},
    "agency": frozenset(
        {"card.read", "card.authenticate", "ecard.verify", "holder.lookup", "concession.read"}
    ),
    "card_office": frozenset(OPERATIONS),
    "ecard_channel": frozenset(
        {"ecard.issue", "ecard.revoke", "ecard.read", "card.report_loss", "card.read", "ridecert.issue"}
    ),
    "bank_channel": frozenset({"purse.topup", "purse.read", "card.read"}),
    "ops": frozenset(
        {"card.read", "ecard.read", "hotlist.read", "purse.read", "clearing.read", "concession.read"}
    ),
}


class TerminalAdminError(ValueError):
    pass


class KeyFileMismatch(TerminalAdminError):
    """The key file is not the one the database's terminal keys were sealed with (`check_key_file`)."""


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class KeyRecord:
    key_id: str
    secret: bytes
    not_before: dt.datetime
    not_after: dt.datetime | None

    def valid_at(self, now: dt.datetime) -> bool:
        return self.not_before <= now and (self.not_after is None or now < self.not_after)


@dataclasses.dataclass(frozen=True, slots=True)
class TerminalRecord:
    terminal_id: str
    kind: str
    org: str
    operations: frozenset[str]
    disabled: bool
    keys: Mapping[str, KeyRecord] = dataclasses.field(repr=False)


def secret_aad(terminal_id: str, key_id: str) -> bytes:
    """The associated data a terminal secret is encrypted with at rest (bound to its terminal and key id)."""
    return f"terminal_key:{terminal_id}:{key_id}".encode()


# The head first (the version every change up to is in this snapshot), then the terminals changed after $1
# with their keys: one statement, one snapshot.
_CHANGED_SQL = """
SELECT version AS head, NULL AS terminal_id, NULL AS kind, NULL AS org, NULL::text[] AS operations,
       NULL::boolean AS disabled, NULL AS key_id, NULL::bytea AS secret_cipher, NULL::timestamptz AS not_before,
       NULL::timestamptz AS not_after, 0 AS part
FROM terminal_head
UNION ALL
SELECT NULL, t.terminal_id, t.kind, t.org, t.operations, t.disabled, k.key_id, k.secret_cipher, k.not_before,
       k.not_after, 1
FROM terminal t LEFT JOIN terminal_key k USING (terminal_id)
WHERE t.change_seq > $1
ORDER BY part
"""


class TerminalRegistry:
    CHANNEL = "cardsvc_terminals"

    def __init__(self, kek: bytes, refresh_s: float) -> None:
        self._kek = kek
        self._refresh_s = refresh_s
        self._by_id: dict[str, TerminalRecord] = {}
        self._seq = 0  # every change up to this one is in the cache
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self.loads = 0

    def get(self, terminal_id: str) -> TerminalRecord | None:
        return self._by_id.get(terminal_id)

    def __len__(self) -> int:
        return len(self._by_id)

    async def load(self, conn: asyncpg.Connection) -> int:
        """Read into the cache the terminals changed since the last load (every terminal the first time,
        or when the database's changes went backwards: a restore); return how many were read.

        Only changed terminals: a refresh costs what changed, not the whole registry (migration 0021,
        whose commit-ordered `change_seq` lets one snapshot's changes up to N stand for all of them)."""
        rows = await conn.fetch(_CHANGED_SQL, self._seq)
        restored = rows[0]["head"] < self._seq  # a database restored to an earlier state: read it all again
        if restored:
            rows = await conn.fetch(_CHANGED_SQL, 0)
        keys: dict[str, dict[str, KeyRecord]] = {}
        meta: dict[str, asyncpg.Record] = {}
        for r in rows[1:]:
            meta[r["terminal_id"]] = r
            bucket = keys.setdefault(r["terminal_id"], {})
            if r["key_id"] is not None:
                try:
                    secret = sm.sm4_gcm_decrypt(
                        self._kek, r["secret_cipher"], secret_aad(r["terminal_id"], r["key_id"])
                    )
                except CiphertextInvalid:
                    # Sealed with another key file (added before `check_key_file` guarded it): that key
                    # authenticates nothing here, and the terminal's other keys and every other change still
                    # load, a disable included.
                    log.error(
                        "terminal key cannot be decrypted with this key file; it is ignored",
                        extra={"terminal_id": r["terminal_id"], "key_id": r["key_id"]},
                    )
                    continue
                bucket[r["key_id"]] = KeyRecord(r["key_id"], secret, r["not_before"], r["not_after"])
        records = {
            tid: TerminalRecord(tid, r["kind"], r["org"], frozenset(r["operations"]), r["disabled"], keys[tid])
            for tid, r in meta.items()
        }
        if restored:
            self._by_id = records
        else:
            self._by_id.update(records)
        self._seq = rows[0]["head"]
        self.loads += 1
        return len(records)

    async def start(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            await self.load(conn)
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop(pool))

    async def _refresh_loop(self, pool: asyncpg.Pool) -> None:
        while True:
            try:
                if not self._listening():
                    await self._drop_listener(pool)
                    self._listener = await pool.acquire()
                    await self._listener.add_listener(self.CHANNEL, self._on_notify)
                    # A session the server ends (failover, cut network) wakes the loop to listen again
                    # at once, instead of missing changes until the fallback reload.
                    self._listener.add_termination_listener(self._on_notify)
                    self._changed.set()  # changes may have been missed while not listening
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self._refresh_s)
                self._changed.clear()
                async with pool.acquire() as conn:
                    await self.load(conn)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("terminal cache refresh failed; keeping the cached copy", exc_info=True)
                await self._drop_listener(pool)
                await asyncio.sleep(1.0)

    def _listening(self) -> bool:
        try:
            return self._listener is not None and not self._listener.is_closed()
        except asyncpg.InterfaceError:  # the pool took it back when the server ended its session
            return False

    def _on_notify(self, *_: object) -> None:
        self._changed.set()

    async def _drop_listener(self, pool: asyncpg.Pool) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            try:
                with contextlib.suppress(Exception):
                    conn.remove_termination_listener(self._on_notify)
                with contextlib.suppress(Exception):
                    await conn.remove_listener(self.CHANNEL, self._on_notify)
            finally:  # even when stop() cancels the UNLISTEN: the pool's close would wait for it
                with contextlib.suppress(Exception):
                    await pool.release(conn)

    async def stop(self, pool: asyncpg.Pool) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop_listener(pool)


def _check_operations(kind: str, operations: Iterable[str] | None) -> list[str]:
    if kind not in KINDS:
        raise TerminalAdminError(f"unknown kind {kind!r}; one of: {', '.join(sorted(KINDS))}")
    ops = sorted(KINDS[kind] if operations is None else set(operations))
    extra = set(ops) - KINDS[kind]
    if extra:
        raise TerminalAdminError(f"a {kind} may not call {', '.join(sorted(extra))}")
    if not ops:
        raise TerminalAdminError("a terminal needs at least one operation")
    return ops


def _check_key_id(key_id: str) -> None:
    # Checked before anything changes: a rotation to a key no request can name would retire the working key.
    if not terminal_auth.valid_key_id(key_id):
        raise TerminalAdminError("a key id is 1-16 characters of A-Z a-z 0-9 . _ -")


# The first key sealed: made with the key file the database was set up with (a key added later with another
# key file is what check_key_file keeps out).
_FIRST_KEY_SQL = """
SELECT terminal_id, key_id, secret_cipher FROM terminal_key ORDER BY created_at, terminal_id, key_id LIMIT 1
"""


async def check_key_file(conn: asyncpg.Connection, kek: bytes) -> None:
    """Refuse a key file whose terminal key-encryption key is not the one the database's terminal keys are
    sealed with (another installation's, a staging one, one regenerated by mistake): a service started on it
    could authenticate no terminal, and a key sealed with it would be unreadable to the service. A database
    with no terminal keys yet takes any."""
    row = await conn.fetchrow(_FIRST_KEY_SQL)
    if row is None:
        return
    try:
        sm.sm4_gcm_decrypt(kek, row["secret_cipher"], secret_aad(row["terminal_id"], row["key_id"]))
    except CiphertextInvalid:
        raise KeyFileMismatch(
            "the key file does not match the database: its terminal keys were sealed with another key file "
            "(check CARDSVC_KEY_FILE)"
        ) from None


async def add_terminal(
    conn: asyncpg.Connection,
    kek: bytes,
    terminal_id: str,
    kind: str,
    org: str,
    operations: Iterable[str] | None = None,
    description: str = "",
    key_id: str = "k1",
) -> bytes:
    """Create a terminal with one key; return the secret (shown once, never stored in clear)."""
    ops = _check_operations(kind, operations)
    _check_key_id(key_id)
    await check_key_file(conn, kek)
    secret = secrets.token_bytes(terminal_auth.SECRET_LEN_BYTES)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO terminal (terminal_id, kind, org, operations, description) VALUES ($1,$2,$3,$4,$5)",
                terminal_id,
                kind,
                org,
                ops,
                description,
            )
            await conn.execute(
                "INSERT INTO terminal_key (terminal_id, key_id, secret_cipher) VALUES ($1, $2, $3)",
                terminal_id,
                key_id,
                sm.sm4_gcm_encrypt(kek, secret, secret_aad(terminal_id, key_id)),
            )
    except asyncpg.UniqueViolationError:
        raise TerminalAdminError(f"terminal {terminal_id} already exists") from None
    except asyncpg.CheckViolationError:
        raise TerminalAdminError("terminal id must be 1-32 characters of A-Z a-z 0-9 . _ -") from None
    return secret


async def rotate_key(
    conn: asyncpg.Connection, kek: bytes, terminal_id: str, new_key_id: str, overlap_s: int
) -> bytes:
    """Add a new key; every older key stays valid for `overlap_s` more seconds, then stops."""
    _check_key_id(new_key_id)
    if overlap_s < 0:
        raise TerminalAdminError("the overlap is a number of seconds, 0 or more")
    await check_key_file(conn, kek)
    secret = secrets.token_bytes(terminal_auth.SECRET_LEN_BYTES)
    async with conn.transaction():
        exists = await conn.fetchval("SELECT 1 FROM terminal WHERE terminal_id = $1 FOR UPDATE", terminal_id)
        if not exists:
            raise TerminalAdminError(f"no terminal {terminal_id}")
        try:
            await conn.execute(
                "INSERT INTO terminal_key (terminal_id, key_id, secret_cipher) VALUES ($1, $2, $3)",
                terminal_id,
                new_key_id,
                sm.sm4_gcm_encrypt(kek, secret, secret_aad(terminal_id, new_key_id)),
            )
        except asyncpg.UniqueViolationError:
            raise TerminalAdminError(f"terminal {terminal_id} already has a key {new_key_id}") from None
        await conn.execute(
            """UPDATE terminal_key SET not_after = LEAST(coalesce(not_after, 'infinity'),
                                                    now() + make_interval(secs => $3))
               WHERE terminal_id = $1 AND key_id <> $2""",
            terminal_id,
            new_key_id,
            overlap_s,
        )
    return secret
