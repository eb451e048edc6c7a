"""CARDSVC-HMAC-SM3: signing of every API request by terminals and operators. See terminal_auth.md."""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from protocols.errors import AuthHeaderInvalid, CodecError
from protocols.sm import hmac_sm3, sm3

__all__ = [
    "HEADER_KEY_ID",
    "HEADER_NAMES",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TERMINAL",
    "HEADER_TIMESTAMP",
    "NONCE_LEN_BYTES_DEFAULT",
    "SCHEME",
    "SECRET_LEN_BYTES",
    "SKEW_S_DEFAULT",
    "AuthHeaders",
    "body_digest",
    "canonical_query",
    "canonical_request",
    "check_timestamp",
    "decode_secret",
    "encode_secret",
    "expected_signature",
    "generate_secret",
    "make_nonce",
    "parse_auth_headers",
    "sign_request",
    "signature_matches",
    "split_path_and_query",
    "verify_request",
]

SCHEME = "CARDSVC-HMAC-SM3"
HEADER_TERMINAL = "X-Cardsvc-Terminal"
HEADER_KEY_ID = "X-Cardsvc-Key-Id"
HEADER_TIMESTAMP = "X-Cardsvc-Timestamp"
HEADER_NONCE = "X-Cardsvc-Nonce"
HEADER_SIGNATURE = "X-Cardsvc-Signature"
HEADER_NAMES = (HEADER_TERMINAL, HEADER_KEY_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
SKEW_S_DEFAULT = 300
SECRET_LEN_BYTES = 32
NONCE_LEN_BYTES_DEFAULT = 16

_TERMINAL_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,16}")
_TIMESTAMP_RE = re.compile(r"0|[1-9][0-9]{0,11}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def valid_key_id(key_id: str) -> bool:
    """Whether `key_id` can be sent in X-Cardsvc-Key-Id (1-16 of A-Z a-z 0-9 . _ -): a key stored under any
    other id could never sign a request."""
    return key_id.isascii() and _KEY_ID_RE.fullmatch(key_id) is not None


@dataclass(frozen=True, slots=True)
class AuthHeaders:
    terminal_id: str
    key_id: str
    timestamp: int
    nonce: str
    signature: str


def body_digest(body: bytes) -> str:
    """Lowercase hex SM3 of the raw body bytes (of b"" when there is no body)."""
    return sm3(body).hex()


def canonical_query(query: str) -> str:
    """'&'-separated pairs sorted by (key, value) as encoded; empty segments dropped; no decoding."""
    pairs = []
    for seg in query.split("&"):
        if not seg:
            continue
        key, _, value = seg.partition("=")
        pairs.append((key, value, seg))
    pairs.sort(key=lambda p: (p[0], p[1]))
    return "&".join(p[2] for p in pairs)


def split_path_and_query(path_and_query: str) -> tuple[str, str]:
    """Split the raw request target at the first '?' (fragment is never sent)."""
    path, _, query = path_and_query.partition("?")
    return path, query


def canonical_request(
    method: str,
    path: str,
    query: str,
    terminal_id: str,
    key_id: str,
    timestamp: int,
    nonce: str,
    body_digest_hex: str,
) -> bytes:
    return "\n".join(
        [
            SCHEME,
            method.upper(),
            path,
            canonical_query(query),
            terminal_id,
            key_id,
            str(timestamp),
            nonce,
            body_digest_hex,
        ]
    ).encode("utf-8", "surrogateescape")


def expected_signature(secret: bytes, canonical: bytes) -> str:
    return hmac_sm3(secret, canonical).hex()


def signature_matches(expected_hex: str, given_hex: str) -> bool:
    return hmac.compare_digest(expected_hex.encode("ascii", "replace"), given_hex.encode("ascii", "replace"))


def make_nonce(n_bytes: int = NONCE_LEN_BYTES_DEFAULT) -> str:
    """base64url (no padding) of ``n_bytes`` (>= 12) random bytes."""
    assert n_bytes >= 12
    return base64.urlsafe_b64encode(os.urandom(n_bytes)).decode("ascii").rstrip("=")


def sign_request(
    terminal_id: str,
    key_id: str,
    secret: bytes,
    method: str,
    path_and_query: str,
    body: bytes,
    now_s: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The five X-Cardsvc-* headers for one request. ``path_and_query`` is the raw target as sent."""
    ts = int(time.time()) if now_s is None else now_s
    n = make_nonce() if nonce is None else nonce
    path, query = split_path_and_query(path_and_query)
    canonical = canonical_request(method, path, query, terminal_id, key_id, ts, n, body_digest(body))
    return {
        HEADER_TERMINAL: terminal_id,
        HEADER_KEY_ID: key_id,
        HEADER_TIMESTAMP: str(ts),
        HEADER_NONCE: n,
        HEADER_SIGNATURE: expected_signature(secret, canonical),
    }


def _get(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None:
        lname = name.lower()
        v = headers.get(lname)
        if v is None:
            for k, val in headers.items():
                if isinstance(k, str) and k.lower() == lname:
                    v = val
                    break
    return v


def parse_auth_headers(headers: Mapping[str, str]) -> AuthHeaders:
    """Extract and syntax-check the five headers (case-insensitive names).

    AuthHeaderInvalid ``auth_missing`` if one is absent, ``auth_malformed`` if one is badly formed;
    ``.field`` is the header name.
    """
    values: dict[str, str] = {}
    for name in HEADER_NAMES:
        v = _get(headers, name)
        if v is None:
            raise AuthHeaderInvalid("auth_missing", f"{name} header missing", field=name)
        if not isinstance(v, str):
            raise AuthHeaderInvalid("auth_malformed", f"{name} header malformed", field=name)
        values[name] = v
    checks = (
        (HEADER_TERMINAL, _TERMINAL_RE),
        (HEADER_KEY_ID, _KEY_ID_RE),
        (HEADER_TIMESTAMP, _TIMESTAMP_RE),
        (HEADER_NONCE, _NONCE_RE),
        (HEADER_SIGNATURE, _SIGNATURE_RE),
    )
    for name, rx in checks:
        if not values[name].isascii() or not rx.fullmatch(values[name]):
            raise AuthHeaderInvalid("auth_malformed", f"{name} header malformed", field=name)
    return AuthHeaders(
        terminal_id=values[HEADER_TERMINAL],
        key_id=values[HEADER_KEY_ID],
        timestamp=int(values[HEADER_TIMESTAMP]),
        nonce=values[HEADER_NONCE],
        signature=values[HEADER_SIGNATURE],
    )


def check_timestamp(timestamp: int, now_s: int, skew_s: int = SKEW_S_DEFAULT) -> str | None:
    """None if |now - timestamp| <= skew_s, else 'expired' (too old) or 'future'."""
    if timestamp > now_s + skew_s:
        return "future"
    if now_s - timestamp > skew_s:
        return "expired"
    return None


def verify_request(secret: bytes, method: str, path_and_query: str, body: bytes, auth: AuthHeaders) -> bool:
    """Signature check only (the caller also checks the timestamp window and nonce replay)."""
    path, query = split_path_and_query(path_and_query)
    canonical = canonical_request(
        method, path, query, auth.terminal_id, auth.key_id, auth.timestamp, auth.nonce, body_digest(body)
    )
    return signature_matches(expected_signature(secret, canonical), auth.signature)


def generate_secret() -> bytes:
    return os.urandom(SECRET_LEN_BYTES)


def encode_secret(secret: bytes) -> str:
    """base64url without padding (43 characters for 32 bytes)."""
    if len(secret) != SECRET_LEN_BYTES:
        raise CodecError("secret_invalid", "a terminal secret is 32 bytes")
    return base64.urlsafe_b64encode(secret).decode("ascii").rstrip("=")


def decode_secret(s: str) -> bytes:
    """Inverse of :func:`encode_secret`; CodecError ``secret_invalid``. Canonical form only."""
    if not isinstance(s, str) or not s.isascii() or not _SECRET_RE.fullmatch(s):
        raise CodecError("secret_invalid", "secret is 43 base64url characters", field="secret")
    try:
        raw = base64.urlsafe_b64decode(s + "=")
    except (binascii.Error, ValueError) as exc:
        raise CodecError("secret_invalid", "secret is not base64url", field="secret") from exc
    if len(raw) != SECRET_LEN_BYTES or encode_secret(raw) != s:
        raise CodecError("secret_invalid", "secret is not canonical base64url", field="secret")
    return raw
