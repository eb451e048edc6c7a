"""Personal data stays out of the audit trail, error answers, request ids, log lines and the database's
own log: an ID number, a name or a mobile number sent where it does not belong is refused or redacted,
never echoed or stored (docs/security.md, docs/api.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from cardsvc import cli, logs
from protocols import idnumber
from tests.helpers import ServiceHarness
from tests.service.test_observability import Capture, captured_logs  # noqa: F401  (fixture)

ID_NUMBER = idnumber.make_id_number("500104", dt.date(1962, 7, 19), 385)
NAME = "诸葛孔明"
PHONE = "13912345678"  # a mainland mobile number


def _text(body: object) -> str:
    return body if isinstance(body, str) else orjson.dumps(body).decode()


# ------------------------------------------------------------------ audit trail: the operator field


async def test_an_operator_shaped_like_an_id_or_phone_number_is_refused_and_not_stored(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """`operator` ("staff id, not personal data") is stored in card_event/concession_event and answered by
    GET /v1/cards/{card_no}/events to every card.read terminal. It was stored whatever its shape; one with
    a run of 11 or more digits is now refused `invalid_field`."""
    c = await svc.new_card()
    for personal in (ID_NUMBER, PHONE):
        r = await svc.post(f"/v1/cards/{c['card_no']}/lock-pin", {"operator": personal})
        assert r.status == 400 and r.body["code"] == "invalid_field" and r.body["field"] == "operator", r.body
        assert personal not in _text(r.body)
        await svc.post(f"/v1/cards/{c['card_no']}/unlock-pin", {})
    for staff in ("EMP20240115001", "clerk-7"):  # digits in a staff id are fine
        r = await svc.post(f"/v1/cards/{c['card_no']}/lock-pin", {"operator": staff})
        assert r.status == 200, r.body
        await svc.post(f"/v1/cards/{c['card_no']}/unlock-pin", {})
        holder = c["holder"]["holder_id"]
        await svc.put(f"/v1/holders/{holder}/concession", {"kind": "disabled_half", "operator": personal})
        stored = await db.fetchval(
            """SELECT count(*) FROM (SELECT operator FROM card_event UNION ALL
                                     SELECT operator FROM concession_event) e WHERE operator = $1""",
            personal,
        )
        events = await svc.get(f"/v1/cards/{c['card_no']}/events", as_="government_service")
        assert stored == 0 and personal not in _text(events.body), (
            personal, r.status, stored, events.body["events"][-2:],
        )


async def test_an_ecard_channel_shaped_like_a_phone_or_id_number_is_refused_and_not_stored(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """An e-card's `channel` (the issuing app's name) is stored in the e-card row and answered with it, to
    card.read terminals too. Its pattern let a mobile number through (`13912345678`, or `p13912345678`);
    one shaped like a mobile, ID or bank card number is now refused `invalid_field`, unechoed."""
    from protocols import ecard, sm

    c = await svc.new_card()
    device = ecard.EcardDevice.generate(1, sm.ALG_ED25519)
    body = {"card_no": c["card_no"], "alg": sm.ALG_ED25519, "device_public_key": device.public_key_bytes.hex()}
    for personal in (PHONE, "p" + PHONE, ID_NUMBER.lower()):
        r = await svc.post("/v1/ecards", {**body, "channel": personal}, as_="ecard_channel")
        assert r.status == 400 and r.body["code"] == "invalid_field" and r.body["field"] == "channel", r.body
        assert personal not in _text(r.body)
    assert await db.fetchval("SELECT count(*) FROM ecard WHERE card_id = (SELECT card_id FROM card "
                             "WHERE card_no = $1)", c["card_no"]) == 0  # fmt: skip
    r = await svc.post("/v1/ecards", {**body, "channel": "gov_app_2024"}, as_="ecard_channel")
    assert r.status == 201 and r.body["channel"] == "gov_app_2024", r.body


async def test_the_cli_refuses_an_operator_shaped_like_an_id_number(
    svc: ServiceHarness, db: asyncpg.Connection, db_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`cardsvc card ... --operator` is the same field, from a shell."""
    c = await svc.new_card()
    monkeypatch.setenv("CARDSVC_DATABASE_URL", db_dsn)
    monkeypatch.setenv("CARDSVC_DATA_DIR", str(tmp_path))
    rc = await asyncio.to_thread(cli.main, ["card", "lock-pin", c["card_no"], "--operator", ID_NUMBER])
    out = capsys.readouterr()
    stored = await db.fetchval("SELECT count(*) FROM card_event WHERE operator = $1", ID_NUMBER)
    assert rc != 0 and stored == 0, (rc, stored, out.err)
    assert ID_NUMBER not in out.err + out.out


# ------------------------------------------------------------------ problem+json echoing input


async def test_an_unknown_field_is_not_echoed_unless_shaped_like_a_field_name(svc: ServiceHarness) -> None:
    """A field name the API does not know was echoed in `detail` and `field`: a client that keyed its body by
    the person got the ID number or name back in an error message. A field-name-shaped key still is."""
    leaks = []
    for body in ({ID_NUMBER: NAME}, {"id_number": ID_NUMBER, NAME: "name"}):
        r = await svc.post("/v1/holders", body)
        assert r.status == 400, r.body
        for secret in (ID_NUMBER, NAME):
            if secret in _text(r.body):
                leaks.append((secret, r.body))
    r = await svc.post("/v1/holders/lookup", {"id_number": ID_NUMBER, ID_NUMBER: 1}, as_="agency")
    if ID_NUMBER in _text(r.body):
        leaks.append((ID_NUMBER, r.body))
    assert not leaks, leaks
    r = await svc.post("/v1/holders", {"id_numbr": ID_NUMBER})
    assert (r.status, r.body["code"], r.body["field"]) == (400, "unknown_field", "id_numbr"), r.body


async def test_an_unknown_field_name_holding_an_id_number_is_not_echoed(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """A key shaped like a field name was echoed in `detail` and `field` even when it carried an ID number
    (a client keying its body by the person, with a prefix): the problem body held the ID number. Such a
    key is refused unnamed, like a key of any other shape, and nothing is stored."""
    for key in ("id_" + ID_NUMBER, "p" + PHONE):
        r = await svc.post("/v1/holders", {"id_number": ID_NUMBER, "name": NAME, key: 1})
        assert (r.status, r.body["code"], r.body.get("field")) == (400, "unknown_field", None), r.body
        assert ID_NUMBER not in _text(r.body) and PHONE not in _text(r.body), r.body
    assert await db.fetchval("SELECT count(*) FROM cardholder") == 0


async def test_an_unknown_card_operation_is_not_echoed(svc: ServiceHarness) -> None:
    """POST /v1/cards/{card_no}/{op}: an op that is not one was quoted back in `detail` (an ID number sent in
    the URL came back in the error message)."""
    c = await svc.new_card()
    r = await svc.post(f"/v1/cards/{c['card_no']}/{ID_NUMBER}", {})
    assert r.status == 404, r.body
    assert ID_NUMBER not in _text(r.body), r.body


# ------------------------------------------------------------------ request ids: logs and audit trail


async def test_a_request_id_shaped_like_a_mobile_number_is_replaced(
    svc: ServiceHarness, db: asyncpg.Connection, captured_logs: Capture  # noqa: F811
) -> None:
    """X-Request-Id was replaced only when shaped like an ID or bank card number: a mobile number went into
    every log line of the request, the problem body and card_event.request_id."""
    c = await svc.new_card()
    r = await svc.post(f"/v1/cards/{c['card_no']}/lock-pin", {}, headers={"X-Request-Id": PHONE})
    assert r.status == 200, r.body
    in_logs = [line for line in captured_logs.lines if PHONE in line]
    stored = await db.fetchval("SELECT count(*) FROM card_event WHERE request_id = $1", PHONE)
    assert not in_logs and stored == 0, (r.headers["X-Request-Id"], in_logs[:1], stored)


# ------------------------------------------------------------------ the JSON formatter's second line of defence


def test_the_json_formatter_redacts_extras_of_every_type() -> None:
    """docs/security.md: the formatter redacts anything shaped like an ID number. One carried in a non-string
    extra (an int, a list, a dict) was written as is."""
    fmt = logs.JsonFormatter()
    digits_only = idnumber.make_id_number("500101", dt.date(1980, 1, 1), 123)
    assert digits_only[-1] != "X"
    leaks = []
    for extra in ({"ids": [ID_NUMBER]}, {"who": {"id": ID_NUMBER}}, {"n": int(digits_only)}):
        rec = logging.LogRecord("cardsvc.test", logging.INFO, __file__, 1, "x", (), None)
        rec.__dict__.update(extra)
        line = fmt.format(rec)
        if ID_NUMBER in line or digits_only in line:
            leaks.append(line)
    assert not leaks, leaks


# ------------------------------------------------------------------ the embedded PostgreSQL's log (doubtful)


async def test_the_embedded_database_logs_slow_statements_without_their_values(
    svc: ServiceHarness, pg_admin_dsn: str
) -> None:
    """The embedded server logs statements over 1 s (log_min_duration_statement). With their parameters
    (log_parameter_max_length at its default), a tap batch that waited on a purse lock wrote the tapping
    card's card_sn, with the time, to <pg data>/server.log: a card tied to when it tapped."""
    if os.environ.get("CARDSVC_DATABASE_URL"):
        pytest.skip("the embedded server's settings (an external server is configured by its operator)")
    c = await svc.new_card(has_purse=True)
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        log = Path(await admin.fetchval("SHOW data_directory")) / "server.log"
    finally:
        await admin.close()
    before = log.stat().st_size if log.exists() else 0
    locker = await asyncpg.connect(svc.dsn)
    tr = locker.transaction()
    await tr.start()
    await locker.execute(
        "SELECT 1 FROM purse WHERE card_id = (SELECT card_id FROM card WHERE card_no = $1) FOR UPDATE", c["card_no"]
    )
    tap = {**svc.card_auth_body(c["card_sn"]), "terminal_seq": 7, "time": int(time.time()), "mode": "metro",
           "line_id": "L1", "station_id": "l1-chaotianmen", "direction": "in", "credential": "card"}  # fmt: skip
    task = asyncio.create_task(svc.post("/v1/transit/taps", tap, as_="transit_validator"))
    await asyncio.sleep(1.5)
    await tr.rollback()
    await locker.close()
    r = await task
    assert r.status == 200, r.body
    await asyncio.sleep(0.3)
    with log.open("rb") as fh:
        fh.seek(before)
        text = fh.read().decode(errors="replace")
    assert c["card_sn"] not in text, [ln for ln in text.splitlines() if c["card_sn"] in ln]


async def test_a_credential_check_names_the_holder_only_to_those_who_check_the_holder(svc: ServiceHarness) -> None:
    """A gate or a shop checking a card needs to know whether it may be used; the holder's masked name and ID
    number went to every acceptance terminal. They go to the kinds that check the holder in person."""
    c = await svc.new_card()
    device = await svc.new_ecard(c["card_no"])
    for kind, shown in (("transit_validator", False), ("merchant_pos", False), ("hospital_his", True),
                        ("pharmacy_pos", True), ("government_service", True), ("agency", True)):  # fmt: skip
        r1 = await svc.post("/v1/card-auth", svc.card_auth_body(c["card_sn"]), as_=kind)
        r2 = await svc.post(
            "/v1/ecard-codes/verify", {"code": device.next_code(int(time.time())), "business_type": "02"}, as_=kind
        )
        for r in (r1, r2):
            assert r.status == 200 and r.body["card"]["card_no"] == c["card_no"], (kind, r.body)
            assert ("holder" in r.body["card"]) == shown, (kind, r.body)
            if shown:
                assert r.body["card"]["holder"]["name_masked"] == "张**"


def test_a_generated_request_id_is_never_all_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 random hex digits are all decimal once in ~1,900 ids: shaped like a bank card number, that id was
    redacted from every log line of its request, so nobody could find the request it named."""
    from cardsvc.http import middlewares

    drawn = iter(["9869030797966512", "0123456789abcdef"])
    monkeypatch.setattr(middlewares.secrets, "token_hex", lambda n: next(drawn))
    rid = middlewares.new_request_id()
    assert rid == "0123456789abcdef" and logs.redact(rid) == rid
