"""Request signing (protocols/terminal_auth.md) as the service enforces it, end to end.

Every refusal is a 401/403 problem+json with a stable code, is counted in
cardsvc_request_auth_failures_total{reason}, and leaves the database as it was. Changes to terminals and
keys reach the running service through LISTEN/NOTIFY: the tests wait on the registry's reload counter
(a bounded number of reloads), never on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
import orjson
from prometheus_client.parser import text_string_to_metric_families

from cardsvc.http.keys import SERVICES
from cardsvc.security import terminals
from protocols import terminal_auth
from tests.helpers import Response, ServiceHarness, Terminal, new_id_number
from tests.service.test_input import assert_problem, raw_http, snapshot

H = terminal_auth


def _signed(
    t: Terminal,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    secret: bytes | None = None,
    now_s: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    return H.sign_request(
        t.terminal_id, t.key_id, t.secret if secret is None else secret, method, target, body, now_s, nonce
    )


async def send(
    svc: ServiceHarness, method: str, target: str, body: bytes, headers: dict[str, str]
) -> Response:
    """Send exactly these auth headers (no signing by the harness) on a raw socket."""
    return await raw_http(svc, method, target, body=body, headers=headers, sign_as=None)


async def auth_failures(svc: ServiceHarness) -> dict[str, float]:
    r = await svc.client.get("/metrics")
    assert r.status == 200
    text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "cardsvc_request_auth_failures":
            for s in fam.samples:
                if s.name == "cardsvc_request_auth_failures_total":
                    out[s.labels["reason"]] = s.value
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


async def until_reloaded(
    svc: ServiceHarness, attempt: Callable[[], Awaitable[Response]], ok: Callable[[Response], bool]
) -> Response:
    """Retry `attempt` after each terminal-cache reload until `ok`; at most a few reloads.

    The reload is driven by NOTIFY: the fallback timer (key_cache_refresh_s, a minute) is far longer
    than the bounded wait here, so this fails if the notification does not arrive."""
    registry = svc.app[SERVICES].terminals
    r = None
    for _ in range(5):
        seen = registry.loads
        r = await attempt()
        if ok(r):
            return r
        for _ in range(1000):  # at most ~5 s for the next reload
            if registry.loads > seen:
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError(f"the terminal cache did not reload; last answer {r.status} {r.body}")
    raise AssertionError(f"no effect after 5 reloads; last answer {r and r.body}")


async def test_unsigned_and_malformed(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    t = svc.terminals["card_office"]
    body = orjson.dumps({"id_number": new_id_number(), "name": "钱七"})
    before_db = await snapshot(db)
    before = await auth_failures(svc)
    r = await send(svc, "POST", "/v1/holders", body, {})
    assert_problem(r, 401, "auth_missing")
    for name in H.HEADER_NAMES:
        headers = _signed(t, "POST", "/v1/holders", body)
        del headers[name]
        assert_problem(await send(svc, "POST", "/v1/holders", body, headers), 401, "auth_missing", name)
    malformed = {
        H.HEADER_TERMINAL: ["", "a" * 33, "bad terminal", "t/1", "终端"],
        H.HEADER_KEY_ID: ["", "k" * 17, "k 1", "k:1"],
        H.HEADER_TIMESTAMP: ["", "01", "-1", "1.5", "abc", "1" * 13, "１２３"],
        H.HEADER_NONCE: ["", "short", "a" * 65, "a" * 15 + "=", "a" * 15 + "+", "a" * 8 + " " + "a" * 8],
        H.HEADER_SIGNATURE: ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64],
    }
    sent = 0
    for name, values in malformed.items():
        for v in values:
            headers = {**_signed(t, "POST", "/v1/holders", body), name: v}
            r = await send(svc, "POST", "/v1/holders", body, headers)
            assert_problem(r, 401, "auth_malformed", name, ctx=(name, v))
            sent += 1
    assert await snapshot(db) == before_db
    failures = _delta(await auth_failures(svc), before)
    assert failures == {"missing": 1 + len(H.HEADER_NAMES), "malformed": sent}, failures
    # Control: the same request properly signed is accepted.
    r = await send(svc, "POST", "/v1/holders", body, _signed(t, "POST", "/v1/holders", body))
    assert r.status == 201, r.body


async def test_unknown_terminal_key_and_bad_signatures(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    t = svc.terminals["card_office"]
    c = await svc.new_card()
    target = f"/v1/cards/{c['card_no']}/temporary-loss"
    body = b'{"operator":"staff-1"}'
    before_db = await snapshot(db)
    before = await auth_failures(svc)

    ghost = Terminal("no-such-terminal", "k1", t.secret)
    r = await send(svc, "POST", target, body, _signed(ghost, "POST", target, body))
    assert_problem(r, 401, "auth_unknown_terminal", H.HEADER_TERMINAL)
    wrong_key = Terminal(t.terminal_id, "k9", t.secret)
    r = await send(svc, "POST", target, body, _signed(wrong_key, "POST", target, body))
    assert_problem(r, 401, "auth_unknown_terminal")
    # Another terminal's id with this terminal's secret.
    other = Terminal(svc.terminals["ecard_channel"].terminal_id, "k1", t.secret)
    r = await send(svc, "POST", target, body, _signed(other, "POST", target, body))
    assert_problem(r, 401, "auth_bad_signature", H.HEADER_SIGNATURE)

    tampered: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("POST", target, body, _signed(t, "POST", target, body, secret=bytes(32))),  # wrong secret
        ("POST", target, b'{"operator":"staff-2"}', _signed(t, "POST", target, body)),  # body
        ("POST", target, body + b" ", _signed(t, "POST", target, body)),  # one byte more
        ("POST", target, b"", _signed(t, "POST", target, body)),  # body dropped
        ("POST", target.replace("temporary-loss", "cancel"), body, _signed(t, "POST", target, body)),  # path
        ("POST", target.lower(), body, _signed(t, "POST", target, body)),  # path case
        ("POST", target + "?x=1", body, _signed(t, "POST", target, body)),  # query added
        ("POST", target + "?", body, _signed(t, "POST", target + "?x=1", body)),  # query removed
        ("GET", f"/v1/cards/{c['card_no']}", b"", _signed(t, "POST", f"/v1/cards/{c['card_no']}", b"")),
    ]
    for method, path, data, headers in tampered:
        r = await send(svc, method, path, data, headers)
        assert_problem(r, 401, "auth_bad_signature", H.HEADER_SIGNATURE, ctx=(method, path, data))
    # The timestamp and nonce are signed too.
    headers = _signed(t, "POST", target, body)
    for name, value in (
        (H.HEADER_TIMESTAMP, str(int(headers[H.HEADER_TIMESTAMP]) - 1)),
        (H.HEADER_NONCE, H.make_nonce()),
    ):
        r = await send(svc, "POST", target, body, {**headers, name: value})
        assert_problem(r, 401, "auth_bad_signature", H.HEADER_SIGNATURE)
    # Control: the untampered request goes through.
    r = await send(svc, "POST", target, body, headers)
    assert r.status == 200 and r.body["status"] == "temporary_loss", r.body
    after_db = await snapshot(db)
    assert after_db["card_event"] == before_db["card_event"] + 1  # only the one signed request
    failures = _delta(await auth_failures(svc), before)
    assert failures == {"unknown_terminal": 2, "bad_signature": 1 + len(tampered) + 2}, failures


async def test_clock_skew(svc: ServiceHarness) -> None:
    t = svc.terminals["transit_validator"]
    skew = svc.settings.clock_skew_s
    before = await auth_failures(svc)
    now = int(time.time())
    for ts in (now - skew - 60, now + skew + 60, 0, 10**12 - 1):
        headers = _signed(t, "GET", "/v1/hotlist", now_s=ts)
        r = await send(svc, "GET", "/v1/hotlist", b"", headers)
        assert_problem(r, 401, "auth_expired", H.HEADER_TIMESTAMP, ctx=ts - now)
    assert _delta(await auth_failures(svc), before) == {"expired": 4}
    for ts in (now - skew + 30, now + skew - 30):
        r = await send(svc, "GET", "/v1/hotlist", b"", _signed(t, "GET", "/v1/hotlist", now_s=ts))
        assert r.status == 200, (ts - now, r.body)


async def test_nonce_single_use(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    t = svc.terminals["card_office"]
    before = await auth_failures(svc)
    body = orjson.dumps({"id_number": new_id_number(), "name": "孙八"})
    headers = _signed(t, "POST", "/v1/holders", body)
    r = await send(svc, "POST", "/v1/holders", body, headers)
    assert r.status == 201, r.body
    holders = (await snapshot(db))["cardholder"]
    # The identical bytes again: refused as a replay (not as holder_exists: it never reaches the handler).
    r = await send(svc, "POST", "/v1/holders", body, headers)
    assert_problem(r, 401, "auth_replayed", H.HEADER_NONCE)
    # The same nonce on a different, correctly signed request.
    nonce = headers[H.HEADER_NONCE]
    other = orjson.dumps({"id_number": new_id_number(), "name": "孙八"})
    r = await send(svc, "POST", "/v1/holders", other, _signed(t, "POST", "/v1/holders", other, nonce=nonce))
    assert_problem(r, 401, "auth_replayed", H.HEADER_NONCE)
    assert (await snapshot(db))["cardholder"] == holders
    # A nonce is per terminal: another terminal may use the same string.
    tv = svc.terminals["transit_validator"]
    r = await send(svc, "GET", "/v1/hotlist", b"", _signed(tv, "GET", "/v1/hotlist", nonce=nonce))
    assert r.status == 200, r.body
    # Concurrent replays of one request: exactly one is accepted.
    body3 = orjson.dumps({"id_number": new_id_number(), "name": "孙八"})
    h3 = _signed(t, "POST", "/v1/holders", body3)
    results = await asyncio.gather(*(send(svc, "POST", "/v1/holders", body3, h3) for _ in range(8)))
    assert sorted(r.status for r in results) == [201] + [401] * 7, [r.body for r in results]
    assert {r.body["code"] for r in results if r.status == 401} == {"auth_replayed"}
    assert _delta(await auth_failures(svc), before) == {"replayed": 2 + 7}


async def test_operations_by_kind(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await svc.new_card()
    before_db = await snapshot(db)
    before = await auth_failures(svc)
    forbidden = [
        ("transit_validator", "POST", "/v1/holders", {"id_number": new_id_number(), "name": "周九"}),
        ("transit_validator", "GET", f"/v1/cards/{c['card_no']}", None),
        ("merchant_pos", "POST", f"/v1/cards/{c['card_no']}/temporary-loss", {}),
        ("ecard_channel", "POST", "/v1/card-auth", svc.card_auth_body(c["card_sn"])),
        ("ecard_channel", "POST", f"/v1/cards/{c['card_no']}/cancel", {}),
        ("agency", "POST", "/v1/cards", {}),
        ("agency", "GET", "/v1/hotlist", None),
        ("ops", "POST", f"/v1/cards/{c['card_no']}/lock-app", {}),
        ("hospital_his", "POST", "/v1/holders/lookup", {"id_number": new_id_number()}),
    ]
    for as_, method, path, body in forbidden:
        r = await svc.request(method, path, body, as_=as_)
        assert_problem(r, 403, "forbidden_operation", ctx=(as_, path))
    assert await snapshot(db) == before_db
    assert _delta(await auth_failures(svc), before) == {"forbidden": len(forbidden)}
    # Controls: what each kind may do.
    r = await svc.post("/v1/card-auth", svc.card_auth_body(c["card_sn"]), as_="transit_validator")
    assert r.status == 200, r.body
    r = await svc.get(f"/v1/cards/{c['card_no']}", as_="agency")
    assert r.status == 200, r.body
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {}, as_="ecard_channel")
    assert r.status == 200 and r.body["status"] == "temporary_loss", r.body


async def test_restricted_operations_and_live_terminal_changes(
    svc: ServiceHarness, db_dsn: str, db: asyncpg.Connection
) -> None:
    """A terminal added (and then disabled) on another connection while the app runs."""
    c = await svc.new_card()
    admin = await asyncpg.connect(db_dsn)
    try:
        # Only the hotlist for this validator (what `cardsvc terminal add --operations hotlist.read` does).
        gate = await svc.add_terminal(admin, "gate", "transit_validator", ["hotlist.read"])
    finally:
        await admin.close()
    r = await until_reloaded(svc, lambda: svc.get("/v1/hotlist", as_="gate"), lambda r: r.status == 200)
    assert "entries" in r.body
    r = await svc.post("/v1/card-auth", svc.card_auth_body(c["card_sn"]), as_="gate")
    assert_problem(r, 403, "forbidden_operation")
    # A kind's operations cannot be widened.
    try:
        await terminals.add_terminal(db, b"\0" * 16, "wider", "transit_validator", "org", ["card.issue"])
    except terminals.TerminalAdminError as exc:
        assert "card.issue" in str(exc)
    else:
        raise AssertionError("a transit validator was given card.issue")

    # Disable it with plain SQL on another connection: refused without a restart.
    await db.execute("UPDATE terminal SET disabled = true WHERE terminal_id = $1", gate.terminal_id)
    r = await until_reloaded(svc, lambda: svc.get("/v1/hotlist", as_="gate"), lambda r: r.status == 401)
    assert_problem(r, 401, "auth_unknown_terminal")
    await db.execute("UPDATE terminal SET disabled = false WHERE terminal_id = $1", gate.terminal_id)
    await until_reloaded(svc, lambda: svc.get("/v1/hotlist", as_="gate"), lambda r: r.status == 200)
    # Other terminals never noticed.
    r = await svc.get("/v1/hotlist", as_="transit_validator")
    assert r.status == 200, r.body


async def test_terminal_changes_still_arrive_after_the_database_ends_the_listening_session(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """The server ends every session of the service (a failover, a cut network, an idle-session killer),
    the one that LISTENs for terminal changes among them. The cache listens again at once: a terminal
    disabled just after is refused within moments, not after the fallback reload (key_cache_refresh_s, a
    minute, far longer than until_reloaded waits)."""
    gate = svc.terminals["transit_validator"]
    r = await svc.get("/v1/hotlist", as_="transit_validator")
    assert r.status == 200, r.body
    ended = await db.fetchval(
        """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
           WHERE application_name = 'cardsvc' AND datname = current_database()"""
    )
    assert ended >= 1
    await db.execute("UPDATE terminal SET disabled = true WHERE terminal_id = $1", gate.terminal_id)
    r = await until_reloaded(
        svc, lambda: svc.get("/v1/hotlist", as_="transit_validator"), lambda r: r.status == 401
    )
    assert_problem(r, 401, "auth_unknown_terminal")


async def test_key_rotation_with_overlap(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    kek = svc.keys.terminal_kek
    old = svc.terminals["transit_validator"]
    secret2 = await terminals.rotate_key(db, kek, old.terminal_id, "k2", 3600)
    new = Terminal(old.terminal_id, "k2", secret2)

    async def call(t: Terminal) -> Response:
        return await send(svc, "GET", "/v1/hotlist", b"", _signed(t, "GET", "/v1/hotlist"))

    await until_reloaded(svc, lambda: call(new), lambda r: r.status == 200)
    r = await call(old)
    assert r.status == 200, r.body  # the overlap: both keys work
    # A key used with the other key's id does not verify.
    r = await call(Terminal(old.terminal_id, "k2", old.secret))
    assert_problem(r, 401, "auth_bad_signature")
    # The overlap ends (as if its time had come): the old key is refused, the new one still works.
    await db.execute(
        "UPDATE terminal_key SET not_after = now() - interval '1 second' WHERE terminal_id = $1 AND key_id = 'k1'",
        old.terminal_id,
    )
    r = await until_reloaded(svc, lambda: call(old), lambda r: r.status == 401)
    assert_problem(r, 401, "auth_unknown_terminal")
    assert (await call(new)).status == 200
    # Rotating with no overlap retires k2 at once.
    secret3 = await terminals.rotate_key(db, kek, old.terminal_id, "k3", 0)
    newest = Terminal(old.terminal_id, "k3", secret3)
    await until_reloaded(svc, lambda: call(newest), lambda r: r.status == 200)
    assert_problem(await call(new), 401, "auth_unknown_terminal")
    assert_problem(await call(old), 401, "auth_unknown_terminal")
    # A key id may not be reused.
    try:
        await terminals.rotate_key(db, kek, old.terminal_id, "k3", 0)
    except terminals.TerminalAdminError:
        pass
    else:
        raise AssertionError("key id k3 reused")


async def test_percent_encoded_targets_sign_and_verify(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    t = svc.terminals["card_office"]
    no = c["card_no"]
    encoded_no = "".join(f"%{ord(ch):02X}" for ch in no)
    targets = [
        "/v1/hotlist?since=0&limit=%31%30",  # '10', percent-encoded
        "/v1/hotlist?limit=10&since=0",  # a different order than the canonical one
        "/v1/hotlist?since=0&&limit=10&",  # empty segments
        "/v1/hotlist?since=0&note=%E5%BC%A0%20%2B%26&flag",  # encoded UTF-8, '+', '&', a bare key
        f"/v1/cards/{encoded_no}",  # the whole card number percent-encoded in the path
        f"/v1/cards/{no.lower()}/events?limit=5",
    ]
    for target in targets:
        r = await send(svc, "GET", target, b"", _signed(t, "GET", target))
        assert r.status == 200, (target, r.body)
    # A repeated name is refused, signed or not: the signature covers the values sorted, the handlers read
    # the first, so reordering them in flight would keep the signature and change the request.
    for target in ("/v1/hotlist?note=a&note=b&since=0", f"/v1/cards/{no}/events?limit=1&limit=500"):
        for order in (target, target.replace("limit=1&limit=500", "limit=500&limit=1")):
            r = await send(svc, "GET", order, b"", _signed(t, "GET", target))
            assert_problem(r, 400, "invalid_parameter")
    # The signature covers the path as sent, not as decoded: signing the decoded form fails.
    r = await send(svc, "GET", f"/v1/cards/{encoded_no}", b"", _signed(t, "GET", f"/v1/cards/{no}"))
    assert_problem(r, 401, "auth_bad_signature")
    r = await send(svc, "GET", "/v1/hotlist?limit=%31%30", b"", _signed(t, "GET", "/v1/hotlist?limit=10"))
    assert_problem(r, 401, "auth_bad_signature")
    # Encoded values compare as encoded: %41 and A are different values.
    r = await send(svc, "GET", "/v1/hotlist?x=%41", b"", _signed(t, "GET", "/v1/hotlist?x=A"))
    assert_problem(r, 401, "auth_bad_signature")
