from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import terminal_auth as ta
from protocols.errors import CodecError

SECRET = bytes(range(32))
NOW = 1_767_225_600
BODY = b'{"card_sn":"411600D156000005C38275EEFC9B9648"}'


def _sign(**kw: Any) -> dict[str, str]:
    args: dict[str, Any] = {
        "terminal_id": "T-0001",
        "key_id": "k1",
        "secret": SECRET,
        "method": "POST",
        "path_and_query": "/v1/cards/auth?b=2&a=1",
        "body": BODY,
        "now_s": NOW,
        "nonce": "AAAAAAAAAAAAAAAAAAAAAA",
    }
    args.update(kw)
    return ta.sign_request(**args)


def _verify(
    headers: dict[str, str],
    method: str = "POST",
    target: str = "/v1/cards/auth?b=2&a=1",
    body: bytes = BODY,
    secret: bytes = SECRET,
) -> bool:
    try:
        auth = ta.parse_auth_headers(headers)
    except CodecError:
        return False
    return ta.verify_request(secret, method, target, body, auth)


def test_sign_and_verify() -> None:
    h = _sign()
    assert set(h) == set(ta.HEADER_NAMES)
    assert len(h[ta.HEADER_SIGNATURE]) == 64
    assert _verify(h)
    assert _verify(h, method="post")
    assert _verify(h, target="/v1/cards/auth?a=1&b=2")  # query order does not matter
    auth = ta.parse_auth_headers({k.lower(): v for k, v in h.items()})
    assert auth.timestamp == NOW and auth.terminal_id == "T-0001"


def test_random_nonce_and_time() -> None:
    a = ta.sign_request("T1", "k", SECRET, "GET", "/x", b"")
    b = ta.sign_request("T1", "k", SECRET, "GET", "/x", b"")
    assert a[ta.HEADER_NONCE] != b[ta.HEADER_NONCE]
    assert len(a[ta.HEADER_NONCE]) == 22
    assert _verify(a, "GET", "/x", b"")


def test_canonical_request_layout() -> None:
    c = ta.canonical_request("get", "/v1/a%2Fb", "z=1&a=2&a=1&&", "T", "k", 5, "n" * 16, ta.body_digest(b""))
    assert c.decode().split("\n") == [
        "CARDSVC-HMAC-SM3",
        "GET",
        "/v1/a%2Fb",
        "a=1&a=2&z=1",
        "T",
        "k",
        "5",
        "n" * 16,
        "1ab21d8355cfa17f8e61194831e81a8f22bec8c728fefb747ed035eb5082aa2b",
    ]
    assert ta.canonical_query("") == ""
    assert ta.canonical_query("a&b=") == "a&b="


def test_every_change_refused() -> None:
    h = _sign()
    for name in ta.HEADER_NAMES:
        value = h[name]
        for i in range(len(value)):
            for repl in ("0", "a", "Z", "-"):
                if value[i] == repl:
                    continue
                bad = dict(h)
                bad[name] = value[:i] + repl + value[i + 1 :]
                assert not _verify(bad), (name, i, repl)
    for i in range(len(BODY) * 8):
        body = bytearray(BODY)
        body[i // 8] ^= 1 << (i % 8)
        assert not _verify(h, body=bytes(body))
    assert not _verify(h, body=BODY + b" ")
    assert not _verify(h, method="PUT")
    assert not _verify(h, target="/v1/cards/auth?b=2&a=1&c=3")
    assert not _verify(h, target="/v1/cards/auth?b=2")
    assert not _verify(h, target="/v1/cards/Auth?b=2&a=1")
    assert not _verify(h, target="/v1/cards/auth?b=%32&a=1")
    assert not _verify(h, secret=SECRET[:-1] + b"\x00")


def test_missing_and_malformed() -> None:
    h = _sign()
    for name in ta.HEADER_NAMES:
        bad = {k: v for k, v in h.items() if k != name}
        with pytest.raises(CodecError) as ei:
            ta.parse_auth_headers(bad)
        assert ei.value.code == "auth_missing" and ei.value.field == name
    cases = {
        ta.HEADER_TERMINAL: ["", "x" * 33, "a b", "终端"],
        ta.HEADER_KEY_ID: ["", "x" * 17, "k/1"],
        ta.HEADER_TIMESTAMP: ["", "-1", "01", "1.5", "1e9", "１２", "1" * 13],
        ta.HEADER_NONCE: ["short", "x" * 65, "A" * 15 + "=", "A" * 15 + "+"],
        ta.HEADER_SIGNATURE: ["0" * 63, "0" * 65, "A" * 64, "g" * 64],
    }
    for name, values in cases.items():
        for v in values:
            bad = dict(h)
            bad[name] = v
            with pytest.raises(CodecError) as ei:
                ta.parse_auth_headers(bad)
            assert ei.value.code == "auth_malformed" and ei.value.field == name, (name, v)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([*ta.HEADER_NAMES, "x-cardsvc-nonce", "other"]), st.text(max_size=70)))
def test_parse_only_codec_error(headers: dict[str, str]) -> None:
    try:
        ta.parse_auth_headers(headers)
    except CodecError:
        pass


def test_timestamp_window() -> None:
    assert ta.check_timestamp(NOW, NOW) is None
    assert ta.check_timestamp(NOW - 300, NOW) is None
    assert ta.check_timestamp(NOW - 301, NOW) == "expired"
    assert ta.check_timestamp(NOW + 300, NOW) is None
    assert ta.check_timestamp(NOW + 301, NOW) == "future"
    assert ta.SKEW_S_DEFAULT == 300


def test_secrets() -> None:
    s = ta.generate_secret()
    enc = ta.encode_secret(s)
    assert len(enc) == 43 and "=" not in enc
    assert ta.decode_secret(enc) == s
    for bad in ["", enc[:-1], enc + "A", enc[:-1] + "+", "=" * 43]:
        with pytest.raises(CodecError) as ei:
            ta.decode_secret(bad)
        assert ei.value.code == "secret_invalid"
    with pytest.raises(CodecError):
        ta.encode_secret(b"short")


@settings(max_examples=300)
@given(st.text(max_size=50))
def test_decode_secret_only_codec_error(s: str) -> None:
    try:
        assert len(ta.decode_secret(s)) == 32
    except CodecError:
        pass


def test_signature_matches() -> None:
    assert ta.signature_matches("ab" * 32, "ab" * 32)
    assert not ta.signature_matches("ab" * 32, "ab" * 31 + "ac")
    assert not ta.signature_matches("ab" * 32, "终端")
