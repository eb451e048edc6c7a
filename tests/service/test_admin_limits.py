"""Limits an administrator sets that a terminal must be able to live with (real PostgreSQL): a key rotation
refuses a key id no request can carry (before it retires the working key), and the hotlist's default block
obeys the configured maximum block."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from cardsvc.config import Settings
from cardsvc.security import terminals
from cardsvc.security.keys import KeyRing
from protocols import terminal_auth
from tests.helpers import ServiceHarness
from tests.service.test_auth import _signed, send


@pytest.mark.parametrize("key_id", ["rotation-2026-q1x", "k 2", "k/2", "", "k\u00e92"])
async def test_rotate_key_refuses_a_key_id_no_request_can_carry(
    svc: ServiceHarness, db: asyncpg.Connection, key_id: str
) -> None:
    """protocols/terminal_auth.md: X-Cardsvc-Key-Id is 1-16 of [A-Za-z0-9._-]. A key stored under any other
    id (17 characters, a space, a slash, empty, not ASCII) could never sign a request, and the rotation would
    give every older key its end: the terminal locked out once the overlap ends. Refused before anything
    changes: the working key keeps working, without an end."""
    old = svc.terminals["transit_validator"]
    with pytest.raises(terminals.TerminalAdminError, match="key id"):
        await terminals.rotate_key(db, svc.keys.terminal_kek, old.terminal_id, key_id, 0)
    assert not terminal_auth.valid_key_id(key_id)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM terminal_key WHERE terminal_id = $1 AND not_after IS NOT NULL",
            old.terminal_id,
        )
        == 0
    )
    r = await send(svc, "GET", "/v1/hotlist", b"", _signed(old, "GET", "/v1/hotlist"))
    assert r.status == 200, r.body
    with pytest.raises(terminals.TerminalAdminError, match="overlap"):
        await terminals.rotate_key(db, svc.keys.terminal_kek, old.terminal_id, "k2", -1)


async def test_hotlist_default_block_respects_the_configured_maximum(
    db_dsn: str, keys: KeyRing, settings: Settings, aiohttp_client: Any
) -> None:
    """CARDSVC_HOTLIST_BLOCK_ENTRIES_MAX is "the largest hotlist block a terminal can ask for"
    (docs/configuration.md): a deployment that lowers it below the default block (1000) serves no larger
    block to a terminal that names no `limit` (before, the default was 1000 whatever the maximum)."""
    harness = ServiceHarness(db_dsn, keys, settings.replace(hotlist_block_entries_max=2))
    await harness.start(aiohttp_client)
    for _ in range(3):
        c = await harness.new_card()
        r = await harness.post(f"/v1/cards/{c['card_no']}/temporary-loss", {})
        assert r.status == 200, r.body
    r = await harness.get("/v1/hotlist?since=0&limit=3", as_="transit_validator")
    assert r.status == 400, r.body  # asking for more than the maximum is refused...
    r = await harness.get("/v1/hotlist?since=0", as_="transit_validator")
    assert r.status == 200, r.body
    assert r.body["latest_version"] == 3
    # ...and the default block must not be larger either.
    assert len(r.body["entries"]) <= 2, len(r.body["entries"])
    assert r.body["more"] is True
