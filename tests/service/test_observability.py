"""Health, readiness, metrics and logs: what operators see, and that it never shows personal data."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cardsvc import logs
from cardsvc.store import migrate
from protocols import idnumber
from tests.helpers import Response, ServiceHarness, new_id_number
from tests.service.test_input import assert_problem

# Known personal data for the scenario: an ID number no other test uses, a name, a card.
ID_NUMBER = idnumber.make_id_number("110105", dt.date(1987, 6, 5), 432)
NAME = "欧阳明月"
CARD_NO, CARD_SN = "Q12345678", "110105D156000005A1B2C3D4E5F60718"


async def test_healthz(svc: ServiceHarness) -> None:
    r = await svc.get("/healthz", sign=False)
    assert r.status == 200 and r.body == {"status": "ok"}, r.body
    assert r.headers["X-Request-Id"]


async def test_readyz(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    r = await svc.get("/readyz", sign=False)
    assert r.status == 200, r.body
    assert r.body["status"] == "ready" and r.body["database"] == "ok", r.body
    assert r.body["terminals"] == len(svc.terminals)
    assert r.body["hotlist_version"] == 0
    # A migration this code knows but the database lacks (as after an upgrade without `cardsvc migrate`).
    latest = migrate.available()[-1]
    await db.execute("DELETE FROM schema_migration WHERE version = $1", latest.version)
    r = await svc.get("/readyz", sign=False)
    assert r.status == 503, r.body
    assert r.body["status"] == "unavailable" and r.body["migrations_pending"] == [latest.version], r.body
    # /healthz is liveness only: still 200.
    assert (await svc.get("/healthz", sign=False)).status == 200
    # An applied migration that differs from this code's copy is not ready either.
    await db.execute(
        "INSERT INTO schema_migration (version, name, checksum) VALUES ($1, $2, 'changed')",
        latest.version,
        latest.name,
    )
    r = await svc.get("/readyz", sign=False)
    assert r.status == 503 and r.body["status"] == "unavailable", r.body
    await db.execute(
        "UPDATE schema_migration SET checksum = $2 WHERE version = $1", latest.version, latest.checksum
    )
    assert (await svc.get("/readyz", sign=False)).status == 200


# ---------------------------------------------------------------------------------------- scenario


async def _scenario(svc: ServiceHarness) -> list[Response]:
    """Every kind of request, with known personal data, successes and refusals."""
    out = []

    async def call(method: str, path: str, body: Any = None, **kw: Any) -> Response:
        r = await svc.request(method, path, body, **kw)
        out.append(r)
        return r

    r = await call("POST", "/v1/holders", {"id_number": ID_NUMBER, "name": NAME, "operator": "staff-7"})
    assert r.status == 201, r.body
    holder_id = r.body["holder_id"]
    r = await call("POST", "/v1/holders", {"id_number": ID_NUMBER, "name": NAME})
    assert_problem(r, 409, "holder_exists", "id_number")
    bad_id = ID_NUMBER[:17] + ("0" if ID_NUMBER[17] != "0" else "1")
    r = await call("POST", "/v1/holders", {"id_number": bad_id, "name": NAME})
    assert_problem(r, 400, "invalid_field", "id_number")
    r = await call("POST", "/v1/holders", {"id_number": ID_NUMBER, "name": NAME + "\x00"})
    assert_problem(r, 400, "invalid_field", "name")
    r = await call("POST", "/v1/holders", {ID_NUMBER: NAME})
    assert_problem(r, 400, "unknown_field")
    r = await call("POST", "/v1/holders", raw=f'{{"name": "{NAME}", "id_number": {ID_NUMBER}'.encode())
    assert_problem(r, 400, "bad_json")
    r = await call("POST", "/v1/holders/lookup", {"id_number": ID_NUMBER}, as_="agency")
    assert r.status == 200 and r.body["name_masked"] == "欧***", r.body
    expires = (dt.date.today() + dt.timedelta(days=3650)).isoformat()
    card = {"holder_id": holder_id, "card_no": CARD_NO, "card_sn": CARD_SN, "expires_on": expires}
    r = await call("POST", "/v1/cards", card)
    assert r.status == 201, r.body
    r = await call("POST", "/v1/cards", card)
    assert_problem(r, 409, "card_exists")
    r = await call("POST", f"/v1/cards/{CARD_NO}/activate", {"operator": "staff-7"})
    assert r.status == 200, r.body
    r = await call("POST", "/v1/card-auth", svc.card_auth_body(CARD_SN), as_="transit_validator")
    assert r.status == 200, r.body
    forged = {**svc.card_auth_body(CARD_SN), "cryptogram": "00" * 16}
    r = await call("POST", "/v1/card-auth", forged, as_="transit_validator")
    assert_problem(r, 422, "credential_forged")
    device = await svc.new_ecard(CARD_NO)
    code = device.next_code(int(time.time()))
    for expected in (200, 422):
        r = await call(
            "POST", "/v1/ecard-codes/verify", {"code": code, "business_type": "02"}, as_="merchant_pos"
        )
        assert r.status == expected, r.body
    r = await call("GET", f"/v1/cards/{CARD_NO}")
    assert r.status == 200, r.body
    r = await call("GET", f"/v1/cards/{CARD_NO}/events?limit=10")
    assert r.status == 200, r.body
    r = await call("POST", f"/v1/cards/{CARD_NO}/temporary-loss", {}, as_="ecard_channel")
    assert r.status == 200 and r.body["status"] == "temporary_loss", r.body
    r = await call("POST", f"/v1/cards/{CARD_NO}/temporary-loss", {})
    assert_problem(r, 409, "illegal_transition")
    r = await call("POST", "/v1/card-auth", svc.card_auth_body(CARD_SN), as_="transit_validator")
    assert_problem(r, 422, "card_unusable")
    r = await call("GET", "/v1/hotlist?since=0", as_="transit_validator")
    assert r.status == 200 and r.body["entries"][0]["card_sn"] == CARD_SN, r.body
    r = await call("GET", f"/v1/cards/{CARD_NO}", as_="transit_validator")
    assert_problem(r, 403, "forbidden_operation")
    r = await call("GET", f"/v1/cards/{CARD_NO}", headers={"X-Cardsvc-Signature": "0" * 64})
    assert_problem(r, 401, "auth_bad_signature")
    r = await call("GET", f"/v1/cards/{CARD_NO[:-1]}", sign=True)
    assert_problem(r, 400, "invalid_parameter", "card_no")
    r = await call("GET", f"/nothing/{CARD_NO}/{ID_NUMBER}", sign=False)
    assert_problem(r, 404, "not_found")
    r = await call("DELETE", f"/v1/cards/{CARD_NO}", sign=False)
    assert_problem(r, 405, "method_not_allowed")
    return out


PERSONAL = (ID_NUMBER, NAME, NAME[1:], CARD_NO, CARD_SN, ID_NUMBER[6:14])


class Capture(logging.Handler):
    """Formats each record when it is emitted (the request id lives in a context variable)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.records.append(record)


@pytest.fixture
def captured_logs() -> Iterator[Capture]:
    """The production logging set-up (cardsvc.logs.setup_logging, JSON) plus a capturing handler."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiohttp.access").level)
    logs.setup_logging("DEBUG", "json")
    cap = Capture()
    root.addHandler(cap)
    try:
        yield cap
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("aiohttp.access").setLevel(saved[2])


async def test_logs_carry_request_ids_and_no_personal_data(
    svc: ServiceHarness, captured_logs: Capture
) -> None:
    responses = await _scenario(svc)
    # The server writes a request's access line after the response has gone out, so the client can read
    # the last answer before its line exists: wait (boundedly) for every answer's line.
    wanted = {r.headers["X-Request-Id"] for r in responses}
    for _ in range(500):
        logged = {orjson.loads(line).get("request_id") for line in captured_logs.lines}
        if wanted <= logged:
            break
        await asyncio.sleep(0.01)

    lines = [orjson.loads(line) for line in captured_logs.lines]
    access = [d for d in lines if d["logger"] == "cardsvc.access"]
    assert len(access) >= len(responses)
    for line in captured_logs.lines:
        for secret in PERSONAL:
            assert secret not in line, (secret, line)
    # The raw records too (what any other formatter would see), not only the redacted output.
    for rec in captured_logs.records:
        text = rec.getMessage() + " " + " ".join(str(v) for v in rec.__dict__.values())
        for secret in PERSONAL:
            assert secret not in text, (secret, rec.__dict__)
    # Every request's access line carries the request id that its response header shows.
    rids = [d["request_id"] for d in access]
    assert all(rids), access
    for r in responses:
        rid = r.headers["X-Request-Id"]
        assert rid in rids, rid
        if r.status >= 400:
            assert r.body["request_id"] == rid
    by_rid = {d["request_id"]: d for d in access}
    templates = {route.resource.canonical for route in svc.app.router.routes() if route.resource} | {
        "unmatched"
    }
    for r in responses:
        line = by_rid[r.headers["X-Request-Id"]]
        assert line["status"] == r.status, (line, r.status)
        assert line["route"] in templates, line
    assert len(set(rids)) == len(rids), "request ids repeat"


async def test_incoming_request_id(
    svc: ServiceHarness, captured_logs: Capture, db: asyncpg.Connection
) -> None:
    c = await svc.new_card()
    given = "edge-7f3a.92_b"
    r = await svc.post(f"/v1/cards/{c['card_no']}/lock-pin", {}, headers={"X-Request-Id": given})
    assert r.status == 200 and r.headers["X-Request-Id"] == given, r.body
    # The audit trail records it too.
    rid = await db.fetchval("SELECT request_id FROM card_event WHERE op = 'lock-pin'")
    assert rid == given
    r = await svc.post("/v1/holders", {"id_number": "1", "name": "x"}, headers={"X-Request-Id": given})
    assert r.status == 400 and r.headers["X-Request-Id"] == given and r.body["request_id"] == given
    # Unusable ids are replaced, not echoed: too long, spaces, header injection, non-ASCII (a name).
    for bad in ("x" * 65, "has space", "a\tb", "<script>", NAME, "é1"):
        r = await svc.get("/healthz", sign=False, headers={"X-Request-Id": bad})
        assert r.status == 200
        assert r.headers["X-Request-Id"] not in (bad, ""), bad
        assert r.headers["X-Request-Id"].isascii()
    echoed = [line for line in captured_logs.lines if orjson.loads(line).get("request_id") == given]
    assert echoed, "the incoming request id is in the log lines"
    assert not any(NAME in line for line in captured_logs.lines)
    # Nor one shaped like an ID number or a bank card number: it would go to the logs and the audit trail.
    for personal in (new_id_number(), "6222021234567890123"):
        r = await svc.post(f"/v1/cards/{c['card_no']}/unlock-pin", {}, headers={"X-Request-Id": personal})
        assert r.status == 200 and r.headers["X-Request-Id"] != personal, r.body
        assert not any(personal in line for line in captured_logs.lines)
        assert await db.fetchval("SELECT count(*) FROM card_event WHERE request_id = $1", personal) == 0
        await svc.post(f"/v1/cards/{c['card_no']}/lock-pin", {})


# ---------------------------------------------------------------------------------------- metrics


def _families(text: str) -> list[Any]:
    return list(text_string_to_metric_families(text))


async def test_metrics_names_types_and_labels(svc: ServiceHarness) -> None:
    await _scenario(svc)
    r = await svc.client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    text = await r.text()
    families = _families(text)
    names = {f.name for f in families}
    for needed in (
        "cardsvc_http_requests",
        "cardsvc_http_request_duration_seconds",
        "cardsvc_credential_verifications",
        "cardsvc_request_auth_failures",
        "cardsvc_card_lifecycle_operations",
    ):
        assert needed in names, (needed, sorted(names))
    for fam in families:
        assert fam.name.startswith(("cardsvc_", "process_", "python_")), fam.name
        if fam.name.endswith("_created") and fam.name.removesuffix("_created") in names:
            continue  # the creation-time gauge the client library adds next to a counter or histogram
        if fam.type == "counter":
            for s in fam.samples:
                assert s.name in (fam.name + "_total", fam.name + "_created"), (fam.name, s.name)
        else:
            assert not fam.name.endswith("_total"), fam.name
        if fam.name.endswith("_timestamp_seconds"):  # a point in time (Unix seconds): a gauge
            assert fam.type == "gauge", (fam.name, fam.type)
        elif any(
            word in fam.name for word in ("duration", "latency", "seconds", "time")
        ) and fam.name.startswith("cardsvc_"):
            assert fam.type == "histogram" and fam.name.endswith("_seconds"), (fam.name, fam.type)
        for s in fam.samples:
            for key, value in s.labels.items():
                for secret in PERSONAL:
                    assert secret not in value, (fam.name, key, value)
                assert "nothing" not in value, (fam.name, key, value)  # no raw paths
    # Routes are templates.
    routes = {
        s.labels["route"]
        for f in families
        if f.name == "cardsvc_http_requests"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert "/v1/cards/{card_no}/{op}" in routes and "/v1/cards/{card_no}" in routes, routes
    # The scenario's outcomes are counted with closed-set labels.
    ver = {
        (s.labels["kind"], s.labels["outcome"]): s.value
        for f in families
        if f.name == "cardsvc_credential_verifications"
        for s in f.samples
        if s.name.endswith("_total")
    }
    for key in (("card_cryptogram", "ok"), ("card_cryptogram", "forged"), ("ecard_code", "replayed")):
        assert ver.get(key, 0) >= 1, (key, ver)


def test_the_json_formatter_redacts_a_request_id_shaped_like_an_id_number() -> None:
    """Whatever sets the request id (a middleware that let one through, a background task), the line
    does not carry an ID number."""
    id_number = new_id_number()
    token = logs.REQUEST_ID.set(id_number)
    try:
        line = logs.JsonFormatter().format(logging.LogRecord("cardsvc.access", logging.INFO, __file__, 1, "x", (), None))
    finally:
        logs.REQUEST_ID.reset(token)
    assert id_number not in line and orjson.loads(line)["request_id"] == "[redacted]", line
