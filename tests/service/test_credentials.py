"""Credentials through the live app and a real database: physical card authentication (POST /v1/card-auth)
and electronic card codes (POST /v1/ecard-codes/verify).

Every refusal is checked for its stable code and for moving cardsvc_credential_verifications_total by
exactly one, under its own {kind, outcome} and nowhere else.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime as dt
import os
import threading
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cardsvc import localtime
from cardsvc.config import ConfigError, Settings, load_settings
from cardsvc.flows import views
from cardsvc.security.keys import KeyRing
from protocols import card, ecard, sm
from tests.helpers import Response, ServiceHarness, new_card_numbers, new_id_number, until_lock_waits

CARD = "card_cryptogram"
CODE = "ecard_code"
ALGS = [pytest.param(sm.ALG_SM2_SM3, id="sm2"), pytest.param(sm.ALG_ED25519, id="ed25519")]


# ----------------------------------------------------------------------------------------- helpers


async def verifications(svc: ServiceHarness) -> collections.Counter[tuple[str, str]]:
    r = await svc.request("GET", "/metrics", sign=False)
    assert r.status == 200
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for family in text_string_to_metric_families(r.body):
        for s in family.samples:
            if s.name == "cardsvc_credential_verifications_total":
                counts[(s.labels["kind"], s.labels["outcome"])] = int(s.value)
    return counts


def delta(
    before: collections.Counter[tuple[str, str]], after: collections.Counter[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    keys = set(before) | set(after)
    return {k: after[k] - before[k] for k in keys if after[k] != before[k]}


async def card_auth(svc: ServiceHarness, body: dict[str, str]) -> Response:
    return await svc.post("/v1/card-auth", body, as_="hospital_his")  # a kind the holder is shown to


async def verify_code(svc: ServiceHarness, code: str, business_type: str = "02") -> Response:
    return await svc.post(
        "/v1/ecard-codes/verify", {"code": code, "business_type": business_type}, as_="merchant_pos"
    )


async def refused(
    svc: ServiceHarness, kind: str, outcome: str, body: Any, *, card_status: str | None = None
) -> Response:
    """Send `body` to the endpoint of `kind`, expect the refusal `outcome` and exactly one count for it."""
    before = await verifications(svc)
    r = await (card_auth(svc, body) if kind == CARD else verify_code(svc, body))
    after = await verifications(svc)
    expected_code = {
        "forged": "credential_forged",
        "replayed": "credential_replayed",
        "expired": "credential_expired",
        "malformed": "credential_malformed",
        "card_unusable": "card_unusable",
        "unknown_card": "unknown_card",
    }[outcome]
    assert r.status == 422 and r.body["code"] == expected_code, r.body
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert delta(before, after) == {(kind, outcome): 1}
    if card_status is not None:
        assert r.body["card_status"] == card_status, r.body
    return r


async def accepted(svc: ServiceHarness, kind: str, body: Any) -> Response:
    before = await verifications(svc)
    r = await (card_auth(svc, body) if kind == CARD else verify_code(svc, body))
    after = await verifications(svc)
    assert r.status == 200, r.body
    assert delta(before, after) == {(kind, "ok"): 1}
    return r


async def op(svc: ServiceHarness, card_no: str, name: str, body: dict[str, Any] | None = None) -> Any:
    r = await svc.post(f"/v1/cards/{card_no}/{name}", body or {})
    assert r.status == 200, r.body
    return r.body


async def replace(svc: ServiceHarness, card_no: str) -> dict[str, Any]:
    new_no, new_sn = new_card_numbers()
    expires = (dt.date.today() + dt.timedelta(days=3650)).isoformat()
    body = await op(
        svc, card_no, "replace", {"new_card_no": new_no, "new_card_sn": new_sn, "expires_on": expires}
    )
    assert body["card_no"] == new_no
    return dict(body)


def flip(hex_value: str, bit: int) -> str:
    raw = bytearray(bytes.fromhex(hex_value))
    raw[bit // 8] ^= 0x80 >> (bit % 8)
    return raw.hex()


def code_bytes(text: str) -> bytes:
    body = text[len(ecard.CODE_TEXT_PREFIX) :]
    return base64.b32decode(body + "=" * (-len(body) % 8))


def code_text(raw: bytes) -> str:
    return ecard.CODE_TEXT_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=")


def signed_code(device: ecard.EcardDevice, *, ecard_id: int, issued_at: int, counter: int) -> str:
    """A correctly signed code with any header (for codes a well-behaved device would not make)."""
    unsigned = ecard.EcardCode(ecard.CODE_VERSION, device.alg, ecard_id, issued_at, counter, b"")
    signature = sm.sign(device.private_key, ecard.signed_bytes(unsigned))
    return ecard.encode_code(
        ecard.EcardCode(ecard.CODE_VERSION, device.alg, ecard_id, issued_at, counter, signature)
    )


def now_s() -> int:
    return int(time.time())


# ------------------------------------------------------------------------------ physical card: valid


async def test_card_auth_valid_answers_status_and_masked_holder(svc: ServiceHarness) -> None:
    id_number = new_id_number()
    r = await svc.post("/v1/holders", {"id_number": id_number, "name": "张三丰"})
    assert r.status == 201, r.body
    card_no, card_sn = new_card_numbers()
    expires = (dt.date.today() + dt.timedelta(days=3650)).isoformat()
    r = await svc.post(
        "/v1/cards",
        {"holder_id": r.body["holder_id"], "card_no": card_no, "card_sn": card_sn, "expires_on": expires},
    )
    assert r.status == 201, r.body
    await op(svc, card_no, "activate")

    r = await accepted(svc, CARD, svc.card_auth_body(card_sn))
    assert r.body["result"] == "ok" and r.body["credential"] == "card"
    c = r.body["card"]
    assert (c["card_no"], c["card_sn"], c["status"], c["usable"]) == (card_no, card_sn, "active", True)
    assert c["holder"]["id_number_masked"] == id_number[:6] + "*" * 8 + id_number[-4:]
    assert c["holder"]["name_masked"] == "张**"
    assert id_number not in str(r.body)


# ----------------------------------------------------------------------------- physical card: forged


async def test_card_auth_random_cryptogram_is_forged(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    body = svc.card_auth_body(c["card_sn"])
    body["cryptogram"] = os.urandom(16).hex()
    await refused(svc, CARD, "forged", body)


_CARD_FLIPS = [
    ("cryptogram", 0),
    ("cryptogram", 77),
    ("cryptogram", 127),
    ("card_challenge", 0),
    ("card_challenge", 63),
    # The terminal challenge is 4 bytes of time and 4 random bytes: a flip in the low bit of the time
    # moves it by one second (still fresh), a flip in the random part keeps the time.
    ("terminal_challenge", 31),
    ("terminal_challenge", 40),
    ("terminal_challenge", 63),
]


async def test_card_auth_one_flipped_bit_is_forged(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    for field, bit in _CARD_FLIPS:
        body = svc.card_auth_body(c["card_sn"])
        tampered = {**body, field: flip(body[field], bit)}
        await refused(svc, CARD, "forged", tampered)
        # The genuine answer was not consumed by the forgery.
        await accepted(svc, CARD, body)


async def test_card_auth_answer_presented_for_another_card_is_forged(svc: ServiceHarness) -> None:
    a = await svc.new_card()
    b = await svc.new_card()
    body = svc.card_auth_body(a["card_sn"])
    body["card_sn"] = b["card_sn"]
    await refused(svc, CARD, "forged", body)


async def test_card_auth_answer_computed_with_another_cards_key_is_forged(svc: ServiceHarness) -> None:
    a = await svc.new_card()
    b = await svc.new_card()
    other_key = card.derive_card_key(svc.keys.card_auth_master, b["card_sn"])
    sim = card.CardSimulator(a["card_sn"], card_key=other_key)
    body = card.build_card_auth_request(sim, now_s(), os.urandom(4))
    await refused(svc, CARD, "forged", body)


async def test_card_auth_with_another_master_key_is_forged(svc: ServiceHarness) -> None:
    a = await svc.new_card()
    sim = card.CardSimulator(a["card_sn"], master_key=os.urandom(16))
    await refused(svc, CARD, "forged", card.build_card_auth_request(sim, now_s(), os.urandom(4)))


# ------------------------------------------------------------------ physical card: replay and window


async def test_card_auth_replayed_body_is_refused(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    body = svc.card_auth_body(c["card_sn"])
    await accepted(svc, CARD, body)
    await refused(svc, CARD, "replayed", body)
    await refused(svc, CARD, "replayed", body)
    await accepted(svc, CARD, svc.card_auth_body(c["card_sn"]))


async def test_card_auth_outside_the_window_is_expired(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    # The challenge age limit (its own setting where there is one), plus at most the clock skew.
    window = getattr(svc.settings, "card_challenge_age_s", svc.settings.ecard_code_lifetime_s)
    skew = svc.settings.clock_skew_s
    await refused(svc, CARD, "expired", svc.card_auth_body(c["card_sn"], now_s=now_s() - window - skew - 5))
    await refused(svc, CARD, "expired", svc.card_auth_body(c["card_sn"], now_s=now_s() - 100_000))
    await refused(svc, CARD, "expired", svc.card_auth_body(c["card_sn"], now_s=now_s() + skew + 60))
    # Inside the window on both sides: accepted.
    await accepted(svc, CARD, svc.card_auth_body(c["card_sn"], now_s=now_s() - window // 2))
    await accepted(svc, CARD, svc.card_auth_body(c["card_sn"], now_s=now_s() + 10))


async def test_card_auth_unknown_card(svc: ServiceHarness) -> None:
    await svc.new_card()
    _, unknown_sn = new_card_numbers()  # a valid identification code, never issued
    await refused(svc, CARD, "unknown_card", svc.card_auth_body(unknown_sn))


# -------------------------------------------------------------------------- physical card: statuses


async def test_card_auth_refused_for_every_unusable_status(svc: ServiceHarness) -> None:
    issued = await svc.new_card(activate=False)
    await refused(svc, CARD, "card_unusable", svc.card_auth_body(issued["card_sn"]), card_status="issued")

    c = await svc.new_card()
    await op(svc, c["card_no"], "temporary-loss")
    await refused(svc, CARD, "card_unusable", svc.card_auth_body(c["card_sn"]), card_status="temporary_loss")
    await op(svc, c["card_no"], "formal-loss")
    await refused(svc, CARD, "card_unusable", svc.card_auth_body(c["card_sn"]), card_status="formal_loss")
    new = await replace(svc, c["card_no"])
    await refused(svc, CARD, "card_unusable", svc.card_auth_body(c["card_sn"]), card_status="replaced")
    await accepted(svc, CARD, svc.card_auth_body(new["card_sn"]))
    await op(svc, new["card_no"], "cancel")
    await refused(svc, CARD, "card_unusable", svc.card_auth_body(new["card_sn"]), card_status="cancelled")

    locked = await svc.new_card()
    await op(svc, locked["card_no"], "lock-app")
    r = await refused(svc, CARD, "card_unusable", svc.card_auth_body(locked["card_sn"]))
    assert r.body["card_status"] == "active"  # the status is unchanged: the application is locked
    await op(svc, locked["card_no"], "unlock-app")
    await accepted(svc, CARD, svc.card_auth_body(locked["card_sn"]))


async def test_card_auth_refused_after_card_expiry(svc: ServiceHarness, db: Any) -> None:
    """A card is valid through its expiry date in the city's local time (UTC+8), not in UTC."""
    c = await svc.new_card()
    today = localtime.local_date(dt.datetime.now(dt.UTC))
    await db.execute("UPDATE card SET expires_on = $2 WHERE card_no = $1", c["card_no"], today)
    # Usable on its expiry date. The service reads its own clock: it may find the card expired only if
    # local midnight passed after `today` was read (read again once answered).
    before = await verifications(svc)
    r = await card_auth(svc, svc.card_auth_body(c["card_sn"]))
    after = await verifications(svc)
    if r.status == 200 or localtime.local_date(dt.datetime.now(dt.UTC)) == today:
        assert r.status == 200 and delta(before, after) == {(CARD, "ok"): 1}, r.body
    else:
        assert r.status == 422 and r.body["code"] == "card_unusable", r.body
        assert delta(before, after) == {(CARD, "card_unusable"): 1}
    await db.execute("UPDATE card SET expires_on = $2 WHERE card_no = $1", c["card_no"], today - dt.timedelta(days=1))
    await refused(svc, CARD, "card_unusable", svc.card_auth_body(c["card_sn"]))


@pytest.mark.parametrize(
    ("utc", "expires_on", "usable"),
    [
        ("2026-11-30T15:59:59", "2026-11-30", True),  # 23:59:59 in Chongqing
        ("2026-11-30T16:00:00", "2026-11-30", False),  # midnight in Chongqing: the UTC date is still the 30th
        ("2026-11-30T16:00:00", "2026-12-01", True),
        ("2026-11-30T00:00:00", "2026-11-29", False),
    ],
)
def test_expiry_is_a_local_date(utc: str, expires_on: str, usable: bool) -> None:
    row = {"status": 2, "temp_loss_until": None, "app_locked": False, "expires_on": dt.date.fromisoformat(expires_on)}
    now = dt.datetime.fromisoformat(utc).replace(tzinfo=dt.UTC)
    assert views.usable(row, now) is usable
    assert localtime.utc_offset_minutes() == 480


async def test_the_service_refuses_a_fare_table_on_another_utc_offset(
    db_dsn: str, keys: KeyRing, settings: Settings, aiohttp_client: Any
) -> None:
    harness = ServiceHarness(db_dsn, keys, settings.replace(utc_offset_minutes=420))
    try:
        with pytest.raises(ConfigError, match="must agree"):
            await harness.start(aiohttp_client)
    finally:
        localtime.configure(settings.utc_offset_minutes)
    with pytest.raises(ConfigError, match="UTC_OFFSET_MINUTES"):
        load_settings({"CARDSVC_UTC_OFFSET_MINUTES": "900"})


async def test_pin_lock_does_not_stop_card_auth(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    await op(svc, c["card_no"], "lock-pin")
    r = await accepted(svc, CARD, svc.card_auth_body(c["card_sn"]))
    assert r.body["card"]["pin_locked"] is True and r.body["card"]["usable"] is True


async def test_loss_report_is_seen_by_the_very_next_verification(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"])
    await accepted(svc, CARD, svc.card_auth_body(c["card_sn"]))
    await accepted(svc, CODE, dev.next_code(now_s()))
    # Reported by the holder through the e-card channel, then used at a gate immediately.
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {}, as_="ecard_channel")
    assert r.status == 200, r.body
    await refused(svc, CARD, "card_unusable", svc.card_auth_body(c["card_sn"]), card_status="temporary_loss")
    await refused(svc, CODE, "card_unusable", dev.next_code(now_s()), card_status="temporary_loss")


# ------------------------------------------------------------------------------------ e-card codes


@pytest.mark.parametrize("alg", ALGS)
async def test_ecard_code_valid(svc: ServiceHarness, alg: int) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"], alg)
    for business_type in ("01", "02", "03", "04"):
        before = await verifications(svc)
        r = await verify_code(svc, dev.next_code(now_s()), business_type)
        assert r.status == 200, r.body
        assert delta(before, await verifications(svc)) == {(CODE, "ok"): 1}
        assert r.body["credential"] == "ecard" and r.body["ecard_id"] == dev.ecard_id
        assert r.body["business_type"] == business_type
        assert r.body["card"]["card_no"] == c["card_no"] and r.body["card"]["status"] == "active"
        assert "holder" not in r.body["card"]  # a shop's POS: whether the card may be used, not who holds it


# Byte positions in the 82-byte code: version, alg, ecard_id (first, last), issued_at (last), counter
# (first, last), signature (first of r, last of r, first of s, last).
_POSITIONS = [0, 1, 2, 9, 13, 14, 17, 18, 49, 50, 81]


@pytest.mark.parametrize("alg", ALGS)
async def test_ecard_code_every_flipped_bit_is_refused(svc: ServiceHarness, alg: int) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"], alg)
    code = dev.next_code(now_s())
    raw = code_bytes(code)
    assert code_text(raw) == code
    attempts = 0
    before = await verifications(svc)
    for pos in _POSITIONS:
        for bit in (0, 7):
            tampered = bytearray(raw)
            tampered[pos] ^= 1 << bit
            r = await verify_code(svc, code_text(bytes(tampered)))
            attempts += 1
            assert r.status == 422, (pos, bit, r.body)
            assert r.body["code"] in {"credential_forged", "credential_malformed", "credential_expired"}, (
                pos,
                bit,
                r.body,
            )
    d = delta(before, await verifications(svc))
    assert (CODE, "ok") not in d and (CODE, "replayed") not in d
    assert sum(d.values()) == attempts
    # None of the tampered codes used up the genuine one.
    await accepted(svc, CODE, code)


@pytest.mark.parametrize("alg", ALGS)
async def test_ecard_code_signed_by_another_device_is_forged(svc: ServiceHarness, alg: int) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"], alg)
    impostor = ecard.EcardDevice.generate(dev.ecard_id, alg)
    await refused(svc, CODE, "forged", impostor.next_code(now_s()))
    # The other algorithm's key for the same e-card id: refused too.
    other_alg = sm.ALG_ED25519 if alg == sm.ALG_SM2_SM3 else sm.ALG_SM2_SM3
    await refused(svc, CODE, "forged", ecard.EcardDevice.generate(dev.ecard_id, other_alg).next_code(now_s()))


async def test_ecard_device_key_of_small_order_is_refused(svc: ServiceHarness, db: Any) -> None:
    """An Ed25519 key of small order (here the identity point) would let anyone sign codes for the e-card
    without its private key (R = identity, S = 0 verifies for every message). Issuing refuses it, and a
    key like it already in the registry verifies nothing."""
    c = await svc.new_card()
    identity = bytes([1]) + bytes(31)
    r = await svc.post(
        "/v1/ecards",
        {"card_no": c["card_no"], "channel": "gov_app", "alg": sm.ALG_ED25519, "device_public_key": identity.hex()},
        as_="ecard_channel",
    )
    assert r.status == 400 and r.body["code"] == "invalid_field", r.body
    assert await db.fetchval("SELECT count(*) FROM ecard WHERE card_id = (SELECT card_id FROM card WHERE card_no = $1)", c["card_no"]) == 0  # fmt: skip
    dev = await svc.new_ecard(c["card_no"], sm.ALG_ED25519)
    await db.execute("UPDATE ecard SET device_key = $1 WHERE ecard_id = $2", identity, dev.ecard_id)
    keyless = ecard.encode_code(
        ecard.EcardCode(ecard.CODE_VERSION, sm.ALG_ED25519, dev.ecard_id, now_s(), 7, identity + bytes(32))
    )
    await refused(svc, CODE, "forged", keyless)


async def test_ecard_code_for_another_ecard_is_forged(svc: ServiceHarness) -> None:
    a = await svc.new_card()
    b = await svc.new_card()
    dev_a = await svc.new_ecard(a["card_no"])
    dev_b = await svc.new_ecard(b["card_no"])
    # A's device signs a code naming B's e-card.
    code = signed_code(dev_a, ecard_id=dev_b.ecard_id, issued_at=now_s(), counter=1)
    await refused(svc, CODE, "forged", code)
    # ... and naming an e-card that does not exist.
    await refused(
        svc, CODE, "forged", signed_code(dev_a, ecard_id=dev_b.ecard_id + 1000, issued_at=now_s(), counter=1)
    )
    await accepted(svc, CODE, dev_b.next_code(now_s()))


async def test_ecard_code_replayed(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"], sm.ALG_ED25519)
    code = dev.next_code(now_s())
    await accepted(svc, CODE, code)
    await refused(svc, CODE, "replayed", code)
    # Same counter, different time: still the same single-use code.
    await refused(
        svc,
        CODE,
        "replayed",
        signed_code(dev, ecard_id=dev.ecard_id, issued_at=now_s() - 1, counter=dev.counter),
    )
    await accepted(svc, CODE, dev.next_code(now_s()))


async def test_ecard_code_outside_its_lifetime_is_expired(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"], sm.ALG_ED25519)
    lifetime = svc.settings.ecard_code_lifetime_s
    skew = svc.settings.clock_skew_s
    # Older than the lifetime (documented: valid ecard_code_lifetime_s after it is generated).
    await refused(svc, CODE, "expired", dev.next_code(now_s() - lifetime - 5))
    await refused(svc, CODE, "expired", dev.next_code(now_s() - lifetime - skew - 5))
    # From the future beyond the allowed clock skew.
    await refused(svc, CODE, "expired", dev.next_code(now_s() + skew + 60))
    # Inside the window: accepted.
    await accepted(svc, CODE, dev.next_code(now_s() - lifetime // 2))
    await accepted(svc, CODE, dev.next_code(now_s() + 5))


async def test_ecard_code_malformed(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"])
    code = dev.next_code(now_s())
    for text in [
        "hello",
        "EC1",
        "EC2" + code[3:],
        code.lower(),
        code[:-1],
        code + "A",
        "EC1" + "1" * 132,
        " " + code[1:],
        "",
    ]:
        await refused(svc, CODE, "malformed", text)
    # 82 bytes = 656 bits; the last base32 character carries 4 unused bits, which must be zero.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    last = alphabet.index(code[-1])
    await refused(svc, CODE, "malformed", code[:-1] + alphabet[last | 1])
    await accepted(svc, CODE, code)


# ------------------------------------------------------------------------- e-card mirrors the card


async def test_revoked_ecard_is_unusable(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"])
    await accepted(svc, CODE, dev.next_code(now_s()))
    r = await svc.post(f"/v1/ecards/{dev.ecard_id}/revoke", {}, as_="ecard_channel")
    assert r.status == 200 and r.body["status"] == "revoked", r.body
    await refused(svc, CODE, "card_unusable", dev.next_code(now_s()), card_status="revoked")
    # The physical card is unaffected.
    await accepted(svc, CARD, svc.card_auth_body(c["card_sn"]))


async def test_ecard_mirrors_temporary_loss_and_its_lifting(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"])
    await op(svc, c["card_no"], "temporary-loss")
    await refused(svc, CODE, "card_unusable", dev.next_code(now_s()), card_status="temporary_loss")
    r = await svc.get(f"/v1/ecards/{dev.ecard_id}", as_="ecard_channel")
    assert r.status == 200 and (r.body["status"], r.body["usable"]) == ("temporary_loss", False), r.body
    await op(svc, c["card_no"], "lift-loss")
    await accepted(svc, CODE, dev.next_code(now_s()))
    await op(svc, c["card_no"], "lock-app")
    await refused(svc, CODE, "card_unusable", dev.next_code(now_s()))


async def test_ecard_follows_the_card_to_its_replacement(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"])
    used = dev.next_code(now_s())
    await accepted(svc, CODE, used)
    await op(svc, c["card_no"], "formal-loss")
    await refused(svc, CODE, "card_unusable", dev.next_code(now_s()), card_status="formal_loss")
    new = await replace(svc, c["card_no"])
    assert new["ecard"] is not None and new["ecard"]["ecard_id"] == dev.ecard_id
    r = await accepted(svc, CODE, dev.next_code(now_s()))
    assert r.body["card"]["card_no"] == new["card_no"]
    assert r.body["card"]["card_sn"] == new["card_sn"]
    assert r.body["card"]["status"] == "active"
    # A code used before the replacement is still single-use after the e-card moved.
    await refused(svc, CODE, "replayed", used)


async def test_a_code_checked_while_its_card_is_replaced_is_accepted_once(
    svc: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card office replaces the card while a code's signature is being checked: the code is used on
    the card the e-card belongs to when the use is recorded (the new one), once, and the answer is about
    that card. (The use used to land on the old card after the replacement had copied its uses, so the
    same code was accepted again.)"""
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"], sm.ALG_ED25519)
    code = dev.next_code(now_s())
    checking, replaced = threading.Event(), threading.Event()
    real_verify = ecard.verify_code

    def verify_during_replacement(code_obj: ecard.EcardCode, key: bytes) -> bool:
        checking.set()
        replaced.wait(10)
        return real_verify(code_obj, key)

    monkeypatch.setattr(ecard, "verify_code", verify_during_replacement)
    before = await verifications(svc)
    first = asyncio.create_task(verify_code(svc, code))
    assert await asyncio.to_thread(checking.wait, 10)
    new = await replace(svc, c["card_no"])
    replaced.set()
    r = await first
    assert r.status == 200 and r.body["card"]["card_no"] == new["card_no"], r.body
    assert r.body["card"]["status"] == "active"
    monkeypatch.setattr(ecard, "verify_code", real_verify)
    again = await verify_code(svc, code)
    assert again.status == 422 and again.body["code"] == "credential_replayed", again.body
    assert delta(before, await verifications(svc)) == {(CODE, "ok"): 1, (CODE, "replayed"): 1}


async def test_a_use_waiting_for_a_replacement_lands_on_the_new_card(svc: ServiceHarness, db: Any) -> None:
    """A code's use that waits for a replacement in progress (on the e-card row) is recorded on the new
    card after the replacement has copied the old card's uses, and the answer reads the new card, which
    was created after the use's statement began."""
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"])
    used = dev.next_code(now_s())
    await accepted(svc, CODE, used)
    code = dev.next_code(now_s())
    async with db.transaction():
        # The replacement moves the e-card and copies the uses, then waits for the hotlist's head row.
        await db.execute("SELECT 1 FROM hotlist_head FOR UPDATE")
        replacing = asyncio.create_task(replace(svc, c["card_no"]))
        await until_lock_waits(db, 1)
        checking = asyncio.create_task(verify_code(svc, code))
        await until_lock_waits(db, 2)  # the use waits for the replacement's lock on the e-card row
    new = await replacing
    r = await checking
    assert r.status == 200, r.body
    assert (r.body["card"]["card_no"], r.body["card"]["status"]) == (new["card_no"], "active")
    uses = await db.fetch(
        "SELECT card_id, token FROM credential_use WHERE kind = 2 AND token >> 32 = $1 ORDER BY token", dev.ecard_id
    )
    new_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", new["card_no"])
    old_id = await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"])
    # The first code: used on the old card and copied; the second: on the new card only.
    assert {(u["card_id"], u["token"] & 0xFFFFFFFF) for u in uses} == {
        (old_id, dev.counter - 1),
        (new_id, dev.counter - 1),
        (new_id, dev.counter),
    }
    await refused(svc, CODE, "replayed", used)
    await refused(svc, CODE, "replayed", code)


async def test_cancelled_card_revokes_its_ecard(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"])
    await op(svc, c["card_no"], "cancel")
    await refused(svc, CODE, "card_unusable", dev.next_code(now_s()), card_status="revoked")
