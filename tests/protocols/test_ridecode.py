"""Ride codes: certificate and code layouts (vectors), the gate's offline decision table, tampering,
and the ride record upload codec."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import ridecode, sm
from protocols.errors import CodecError, KeyInvalid
from protocols.ridecode import GateOutcome, RidePhone

VECTORS = json.loads(
    (Path(ridecode.__file__).parent / "vectors" / "ridecode.json").read_text(encoding="utf-8")
)
ISSUER = sm.private_key_from_seed(sm.ALG_SM2_SM3, bytes.fromhex(VECTORS["issuer_seed"]))
assert isinstance(ISSUER, sm.Sm2PrivateKey)
ISSUER_PUB = sm.public_key_bytes(ISSUER)
T0 = 1_767_225_600
NO: frozenset[int] = frozenset()


def _phone(alg: int, serial: int = 77, account: int = 1234, valid_to: int = T0 + 86_400) -> RidePhone:
    user = sm.private_key_from_seed(alg, bytes([alg]) * 32)
    cert = ridecode.issue_cert(
        ISSUER,
        issuer_key_id=1,
        cert_serial=serial,
        account_id=account,
        alg=alg,
        user_public_key=sm.public_key_bytes(user),
        valid_from=T0 - 3600,
        valid_to=valid_to,
        max_fare_fen=700,
        credit_limit_fen=5000,
    )
    return RidePhone(cert, user)


PHONES = {alg: _phone(alg) for alg in sorted(sm.ALGORITHMS)}
CODES = {alg: PHONES[alg].next_code(T0) for alg in PHONES}


def _gate(text: str, now: int = T0 + 5, **kw: Any) -> GateOutcome:
    return ridecode.verify_at_gate(
        text, kw.pop("keys", ISSUER_PUB), now, kw.pop("serials", NO), kw.pop("accounts", NO), **kw
    ).outcome


# ------------------------------------------------------------------------------------------ vectors


def test_vector_issuer_key() -> None:
    assert ISSUER_PUB.hex() == VECTORS["issuer_public_key"]


@pytest.mark.parametrize("v", VECTORS["codes"], ids=lambda v: f"alg{v['alg']}")
def test_code_vectors(v: dict[str, Any]) -> None:
    code = ridecode.decode_code(v["text"])
    cert = code.cert
    assert cert.alg == v["alg"] and cert.version == ridecode.CERT_VERSION
    assert {k: getattr(cert, k) for k in v["cert"]} == v["cert"]
    assert cert.user_public_key.hex() == v["user_public_key"]
    user = sm.private_key_from_seed(v["alg"], bytes.fromhex(v["user_seed"]))
    assert sm.public_key_bytes(user).hex() == v["user_public_key"]
    assert ridecode.cert_signed_bytes(cert).hex() == v["cert_signed_bytes"]
    assert ridecode.cert_signed_bytes(cert).startswith(ridecode.CERT_SIGNING_DOMAIN)
    assert cert.issuer_signature.hex() == v["issuer_signature"]
    assert ridecode.encode_cert(cert).hex() == v["cert_bytes"]
    assert ridecode.decode_cert(bytes.fromhex(v["cert_bytes"])) == cert
    assert ridecode.verify_cert(ISSUER_PUB, cert)
    assert (code.time, code.counter) == (v["time"], v["counter"])
    assert ridecode.code_signed_bytes(code).hex() == v["code_signed_bytes"]
    assert code.signature.hex() == v["user_signature"]
    assert ridecode.code_to_bytes(code).hex() == v["code_bytes"]
    assert ridecode.encode_code(code) == v["text"]
    assert len(v["text"]) == ridecode.CODE_TEXT_CHARS[v["alg"]]
    assert sm.verify(v["alg"], cert.user_public_key, code.signature, ridecode.code_signed_bytes(code))
    if v["alg"] == sm.ALG_ED25519:  # deterministic signatures: the phone reproduces the code exactly
        assert RidePhone(cert, user).make_code(v["time"], v["counter"]) == code


@pytest.mark.parametrize("g", VECTORS["gate"], ids=lambda g: f"{g['outcome']}")
def test_gate_vectors(g: dict[str, Any]) -> None:
    key = bytes.fromhex(g.get("issuer_public_key", VECTORS["issuer_public_key"]))
    decision = ridecode.verify_at_gate(
        g["text"],
        key,
        g["now"],
        set(g.get("deny_serials", [])),
        set(g.get("deny_accounts", [])),
        VECTORS["lifetime_s"],
        VECTORS["skew_s"],
    )
    assert decision.outcome == g["outcome"]
    assert decision.ok == (g["outcome"] == "ok")
    assert (decision.code is None) == (g["outcome"] == "malformed")


def test_ride_batch_vector() -> None:
    b = ridecode.ride_batch_from_dict(VECTORS["ride_batch"])
    assert ridecode.ride_batch_to_dict(b) == VECTORS["ride_batch"]
    r = b.records[0]
    # the server re-verifies with the same function, at the gate's time
    assert _gate(r.code_text, now=r.time) == GateOutcome.OK


# --------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("alg", sorted(sm.ALGORITHMS))
def test_round_trip_and_counter(alg: int) -> None:
    phone = _phone(alg)
    a, b = phone.next_code(T0), phone.next_code(T0)
    ca, cb = ridecode.decode_code(a), ridecode.decode_code(b)
    assert (ca.counter, cb.counter) == (1, 2) and ca.cert == cb.cert == phone.cert
    assert ridecode.encode_code(ca) == a
    assert a.startswith("RC1") and set(a[3:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert _gate(a) == _gate(b) == GateOutcome.OK


def test_time_windows_at_the_edges() -> None:
    text = CODES[sm.ALG_SM2_SM3]
    assert _gate(text, now=T0 + 90) == GateOutcome.OK  # lifetime 60 + skew 30
    assert _gate(text, now=T0 + 91) == GateOutcome.CODE_EXPIRED
    assert _gate(text, now=T0 - 30) == GateOutcome.OK
    assert _gate(text, now=T0 - 31) == GateOutcome.CODE_EXPIRED
    assert _gate(text, now=T0 + 200, lifetime_s=300) == GateOutcome.OK
    late = _phone(sm.ALG_SM2_SM3, valid_to=T0 + 100)
    t = late.next_code(T0 + 120)
    assert _gate(t, now=T0 + 130) == GateOutcome.OK  # valid_to + skew
    assert _gate(t, now=T0 + 131) == GateOutcome.CERT_EXPIRED
    early = _phone(sm.ALG_ED25519).next_code(T0 - 3600 - 30)
    assert _gate(early, now=T0 - 3600 - 30) == GateOutcome.OK
    early2 = _phone(sm.ALG_ED25519).next_code(T0 - 3600 - 31)
    assert _gate(early2, now=T0 - 3600 - 31) == GateOutcome.CERT_EXPIRED


def test_deny_lists_and_key_rotation() -> None:
    text = CODES[sm.ALG_ED25519]
    assert _gate(text, serials={77}) == GateOutcome.DENIED
    assert _gate(text, accounts={1234}) == GateOutcome.DENIED
    assert _gate(text, serials={78}, accounts={1235}) == GateOutcome.OK
    assert _gate(text, keys={1: ISSUER_PUB}) == GateOutcome.OK
    assert _gate(text, keys={2: ISSUER_PUB}) == GateOutcome.BAD_ISSUER_SIGNATURE
    assert _gate(text, keys=b"") == GateOutcome.BAD_ISSUER_SIGNATURE
    assert _gate(text, keys=b"\x04" + bytes(64)) == GateOutcome.BAD_ISSUER_SIGNATURE


def test_self_signed_certificate_is_refused() -> None:
    rogue = sm.private_key_from_seed(sm.ALG_SM2_SM3, b"\x66" * 32)
    assert isinstance(rogue, sm.Sm2PrivateKey)
    user = sm.private_key_from_seed(sm.ALG_SM2_SM3, b"\x67" * 32)
    cert = ridecode.issue_cert(
        rogue,
        issuer_key_id=1,
        cert_serial=1,
        account_id=1,
        alg=sm.ALG_SM2_SM3,
        user_public_key=sm.public_key_bytes(user),
        valid_from=0,
        valid_to=T0 * 2,
        max_fare_fen=0,
        credit_limit_fen=0,
    )
    assert not ridecode.verify_cert(ISSUER_PUB, cert)
    assert _gate(RidePhone(cert, user).next_code(T0)) == GateOutcome.BAD_ISSUER_SIGNATURE


def test_phone_needs_the_certified_key() -> None:
    cert = PHONES[sm.ALG_SM2_SM3].cert
    with pytest.raises(KeyInvalid):
        RidePhone(cert, sm.private_key_from_seed(sm.ALG_SM2_SM3, b"\x09" * 32))
    with pytest.raises(KeyInvalid):
        RidePhone(cert, sm.private_key_from_seed(sm.ALG_ED25519, b"\x01" * 32))
    with pytest.raises(CodecError):
        ridecode.issue_cert(
            ISSUER,
            issuer_key_id=1,
            cert_serial=1,
            account_id=1,
            alg=sm.ALG_SM2_SM3,
            user_public_key=b"\x04" + bytes(64),
            valid_from=0,
            valid_to=1,
            max_fare_fen=0,
            credit_limit_fen=0,
        )


def test_cert_field_rules() -> None:
    cert = PHONES[sm.ALG_ED25519].cert
    for change in (
        {"valid_to": cert.valid_from - 1},
        {"cert_serial": 0},
        {"account_id": 2**63},
        {"issuer_key_id": 0},
        {"version": 2},
        {"alg": 3},
        {"user_public_key": cert.user_public_key[:-1]},
        {"max_fare_fen": True},
        {"issuer_signature": b"\x00" * 63},
    ):
        with pytest.raises(ridecode.RideCertInvalid):
            ridecode.encode_cert(dataclasses.replace(cert, **change))
    raw = ridecode.encode_cert(cert)
    for bad in (raw[:-1], raw + b"\x00", b"", raw[:10]):
        with pytest.raises(ridecode.RideCertInvalid):
            ridecode.decode_cert(bad)


# ---------------------------------------------------------------------------------- tampering


@settings(max_examples=200, deadline=None)
@given(alg=st.sampled_from(sorted(sm.ALGORITHMS)), data=st.data())
def test_any_flipped_bit_in_a_code_is_refused(alg: int, data: st.DataObject) -> None:
    raw = bytearray(ridecode.code_to_bytes(ridecode.decode_code(CODES[alg])))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    text = ridecode.CODE_TEXT_PREFIX + base64.b32encode(bytes(raw)).decode("ascii").rstrip("=")
    assert _gate(text) != GateOutcome.OK


@settings(max_examples=200, deadline=None)
@given(alg=st.sampled_from(sorted(sm.ALGORITHMS)), data=st.data())
def test_any_changed_character_is_refused(alg: int, data: st.DataObject) -> None:
    text = CODES[alg]
    pos = data.draw(st.integers(0, len(text) - 1))
    ch = data.draw(st.characters(codec="utf-8").filter(lambda c: c != text[pos]))
    assert _gate(text[:pos] + ch + text[pos + 1 :]) != GateOutcome.OK


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=400), st.binary(max_size=300).map(lambda b: "RC1" + base64.b32encode(b).decode())
    )
)
def test_decoder_raises_only_codec_error_and_gate_never_raises(text: str) -> None:
    try:
        ridecode.decode_code(text)
    except CodecError:
        pass
    assert _gate(text) != GateOutcome.OK


@settings(max_examples=100, deadline=None)
@given(b=st.binary(max_size=200))
def test_decode_cert_raises_only_codec_error(b: bytes) -> None:
    try:
        ridecode.decode_cert(b)
    except CodecError:
        pass


def test_gate_never_raises_on_odd_types() -> None:
    for text in (None, 5, b"RC1", ["RC1"], "RC1" + "A" * 378):
        assert _gate(text) == GateOutcome.MALFORMED  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- ride record


def _record(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "code_text": CODES[sm.ALG_SM2_SM3],
        "gate_id": "G-1",
        "gate_seq": 5,
        "line_id": "M3",
        "station_id": "S1",
        "direction": "in",
        "time": T0 + 3,
        "deny_list_version": 9,
    }
    d.update(kw)
    return d


def test_ride_record_codec() -> None:
    r = ridecode.ride_record_from_dict(_record())
    assert ridecode.ride_record_to_dict(r) == _record()
    for change, field in (
        ({"code_text": "RC1AAAA"}, "code_text"),
        ({"gate_seq": -1}, "gate_seq"),
        ({"direction": "up"}, "direction"),
        ({"time": 1.5}, "time"),
        ({"station_id": "x" * 17}, "station_id"),
        ({"extra": 0}, "extra"),
    ):
        with pytest.raises(ridecode.RideRecordInvalid) as ei:
            ridecode.ride_record_from_dict(_record(**change))
        assert ei.value.field == field
    d = _record()
    del d["time"]
    with pytest.raises(ridecode.RideRecordInvalid):
        ridecode.ride_record_from_dict(d)


def test_ride_batch_rules() -> None:
    ok = {"gate_id": "G-1", "batch_id": 1, "records": [_record(gate_seq=1), _record(gate_seq=2)]}
    assert len(ridecode.ride_batch_from_dict(ok).records) == 2
    for d, field in (
        ({**ok, "records": []}, "records"),
        ({**ok, "gate_id": "G-2"}, "records[0].gate_id"),
        ({**ok, "records": ok["records"][::-1]}, "records[1].gate_seq"),
        ({**ok, "records": [_record(gate_seq=1, direction="x")]}, "records[0].direction"),
        ({**ok, "batch_id": 2**63}, "batch_id"),
        ({**ok, "x": 1}, "x"),
    ):
        with pytest.raises(CodecError) as ei:
            ridecode.ride_batch_from_dict(d)
        assert ei.value.field == field


def test_spec_sizes() -> None:
    spec = (Path(ridecode.__file__).parent / "ridecode.md").read_text(encoding="utf-8")
    sizes = {alg: len(bytes.fromhex(v["code_bytes"])) for v in VECTORS["codes"] for alg in [v["alg"]]}
    assert sizes == {sm.ALG_SM2_SM3: 236, sm.ALG_ED25519: 203}
    assert ridecode.CODE_TEXT_CHARS == {sm.ALG_SM2_SM3: 381, sm.ALG_ED25519: 328}
    for n in ("236 bytes → 381 characters", "203 bytes → 328 characters", "164 bytes", "131 bytes"):
        assert n in spec
