from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import ecard, sm
from protocols.errors import CodecError

NOW = 1_767_225_600


@pytest.fixture(scope="module", params=sorted(sm.ALGORITHMS))
def device(request: pytest.FixtureRequest) -> ecard.EcardDevice:
    return ecard.EcardDevice.from_seed(b"\x07" * 32, 123456789, request.param)


def test_round_trip(device: ecard.EcardDevice) -> None:
    text = device.next_code(NOW)
    assert text.startswith("EC1") and len(text) == ecard.CODE_TEXT_CHARS
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" + "1")  # QR alphanumeric mode
    code = ecard.decode_code(text)
    assert (code.version, code.alg, code.ecard_id, code.issued_at) == (1, device.alg, 123456789, NOW)
    assert code.counter == device.counter
    assert ecard.encode_code(code) == text
    assert ecard.verify_code(code, device.public_key_bytes)
    assert ecard.signed_bytes(code).startswith(ecard.SIGNING_DOMAIN)
    assert len(ecard.signed_bytes(code)) == len(ecard.SIGNING_DOMAIN) + 18


def test_counter_increments(device: ecard.EcardDevice) -> None:
    a = ecard.decode_code(device.next_code(NOW)).counter
    b = ecard.decode_code(device.next_code(NOW)).counter
    assert b == a + 1


def test_wrong_key_or_alg(device: ecard.EcardDevice) -> None:
    code = ecard.decode_code(device.next_code(NOW))
    other = ecard.EcardDevice.from_seed(b"\x08" * 32, 123456789, device.alg)
    assert not ecard.verify_code(code, other.public_key_bytes)
    other_alg = sm.ALG_ED25519 if device.alg == sm.ALG_SM2_SM3 else sm.ALG_SM2_SM3
    swapped = dataclasses.replace(code, alg=other_alg)
    assert not ecard.verify_code(swapped, device.public_key_bytes)
    assert not ecard.verify_code(code, b"")


def test_every_bit_flip_refused(device: ecard.EcardDevice) -> None:
    text = device.next_code(NOW)
    raw = base64.b32decode(text[3:] + "=" * (-len(text[3:]) % 8))
    assert len(raw) == ecard.CODE_LEN_BYTES
    for i in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[i // 8] ^= 1 << (i % 8)
        bad_text = "EC1" + base64.b32encode(bytes(bad)).decode().rstrip("=")
        try:
            code = ecard.decode_code(bad_text)
        except CodecError as exc:
            assert exc.code == "ecard_code_malformed"
            continue
        assert not ecard.verify_code(code, device.public_key_bytes), i


def test_every_text_char_change_refused(device: ecard.EcardDevice) -> None:
    text = device.next_code(NOW)
    for i in range(len(text)):
        for repl in ("A", "7", "a"):
            if text[i] == repl:
                continue
            bad = text[:i] + repl + text[i + 1 :]
            try:
                code = ecard.decode_code(bad)
            except CodecError:
                continue
            assert not ecard.verify_code(code, device.public_key_bytes)


def test_freshness() -> None:
    code = ecard.EcardCode(1, 2, 1, NOW, 1, b"\x00" * 64)
    assert ecard.check_freshness(code, NOW) is None
    assert ecard.check_freshness(code, NOW + 60, 60, 30) is None
    assert ecard.check_freshness(code, NOW + 61, 60, 30) == "expired"  # the skew never stretches the lifetime
    assert ecard.check_freshness(code, NOW - 30, 60, 30) is None
    assert ecard.check_freshness(code, NOW - 31, 60, 30) == "future"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "EC1",
        "EC1" + "A" * 132,
        "ec1" + "A" * 132,
        "EC1" + "A" * 1000,
        "EC1" + "=" * 132,
        "EC1" + "Ä" * 132,
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(CodecError) as ei:
        ecard.decode_code(text)
    assert ei.value.code == "ecard_code_malformed"


def test_header_ranges() -> None:
    good = ecard.EcardCode(1, 1, 1, NOW, 0, b"\x01" * 64)
    assert ecard.decode_code(ecard.encode_code(good)) == good
    for change in (
        {"version": 2},
        {"alg": 3},
        {"ecard_id": 0},
        {"ecard_id": 2**63},
        {"counter": 2**32},
        {"issued_at": -1},
        {"signature": b"\x01" * 63},
    ):
        with pytest.raises(CodecError):
            ecard.encode_code(dataclasses.replace(good, **change))
    # a high-bit ecard_id (not a PostgreSQL bigint) in the raw bytes is refused on decode
    raw = bytearray(ecard.code_to_bytes(good))
    raw[2] = 0x80
    with pytest.raises(CodecError):
        ecard.decode_code("EC1" + base64.b32encode(bytes(raw)).decode().rstrip("="))


@settings(max_examples=500)
@given(st.text(max_size=300))
def test_decode_text_only_codec_error(s: str) -> None:
    try:
        ecard.decode_code(s)
    except CodecError:
        pass


@settings(max_examples=500)
@given(st.binary(min_size=82, max_size=82))
def test_decode_random_payload_only_codec_error(raw: bytes) -> None:
    try:
        code = ecard.decode_code("EC1" + base64.b32encode(raw).decode().rstrip("="))
    except CodecError:
        return
    assert ecard.code_to_bytes(code) == raw


def test_business_type() -> None:
    assert ecard.validate_business_type("02") is ecard.BusinessType.PAYMENT
    assert [b.value for b in ecard.BusinessType] == ["01", "02", "03", "04"]
    for bad in ["", "2", "05", " 01", None, 1]:
        with pytest.raises(CodecError) as ei:
            ecard.validate_business_type(bad)  # type: ignore[arg-type]
        assert ei.value.code == "business_type_invalid"


def test_device_checks() -> None:
    with pytest.raises(CodecError):
        ecard.EcardDevice.from_seed(b"\x00" * 32, 1, 9)
    with pytest.raises(ValueError):
        ecard.EcardDevice(sm.ALG_ED25519, sm.sm2_generate(), 1)
    dev = ecard.EcardDevice.generate(5, sm.ALG_ED25519)
    assert len(dev.public_key_bytes) == 32
    dev.counter = ecard.CODE_COUNTER_MAX
    with pytest.raises(OverflowError):
        dev.next_code(NOW)
