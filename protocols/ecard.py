"""Electronic social security card QR codes (identity/payment codes, single-use, verified online).

Layout (82 bytes) and text form are specified in ecard.md.
"""

from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric import ed25519

from protocols import sm
from protocols.errors import AlgorithmUnknown, CodecError, EcardCodeMalformed
from protocols.strict import b32_canonical

__all__ = [
    "CODE_COUNTER_MAX",
    "CODE_HEADER_LEN_BYTES",
    "CODE_LEN_BYTES",
    "CODE_LIFETIME_S_DEFAULT",
    "CODE_SIGNATURE_LEN_BYTES",
    "CODE_SKEW_S_DEFAULT",
    "CODE_TEXT_CHARS",
    "CODE_TEXT_CHARS_MAX",
    "CODE_TEXT_PREFIX",
    "CODE_VERSION",
    "ECARD_ID_MAX",
    "SIGNING_DOMAIN",
    "BusinessType",
    "EcardCode",
    "EcardDevice",
    "check_freshness",
    "code_to_bytes",
    "decode_code",
    "encode_code",
    "signed_bytes",
    "validate_business_type",
    "verify_code",
]

CODE_VERSION = 0x01
CODE_TEXT_PREFIX = "EC1"
SIGNING_DOMAIN = b"CARDSVC-ECARD-CODE-V1"
CODE_HEADER_LEN_BYTES = 18
CODE_SIGNATURE_LEN_BYTES = 64
CODE_LEN_BYTES = CODE_HEADER_LEN_BYTES + CODE_SIGNATURE_LEN_BYTES  # 82
CODE_TEXT_CHARS = len(CODE_TEXT_PREFIX) + (CODE_LEN_BYTES * 8 + 4) // 5  # 3 + 132 = 135
CODE_TEXT_CHARS_MAX = 256
CODE_LIFETIME_S_DEFAULT = 60
CODE_SKEW_S_DEFAULT = 30
ECARD_ID_MAX = 2**63 - 1  # fits a PostgreSQL bigint
CODE_COUNTER_MAX = 2**32 - 1
ISSUED_AT_MAX = 2**32 - 1

_HEADER = struct.Struct(">BBQII")


class BusinessType(StrEnum):
    """Business type a terminal names when it verifies a code."""

    QUERY = "01"
    PAYMENT = "02"
    OTHER = "03"
    CROSS_REGION_MEDICAL = "04"


def validate_business_type(s: str) -> BusinessType:
    if isinstance(s, str):
        for bt in BusinessType:
            if bt.value == s:
                return bt
    raise CodecError("business_type_invalid", "business type is one of 01, 02, 03, 04", field="business_type")


@dataclass(frozen=True, slots=True)
class EcardCode:
    version: int
    alg: int
    ecard_id: int
    issued_at: int
    counter: int
    signature: bytes


def _malformed(message: str, field: str | None = None) -> EcardCodeMalformed:
    return EcardCodeMalformed("ecard_code_malformed", message, field=field)


def _header(version: int, alg: int, ecard_id: int, issued_at: int, counter: int) -> bytes:
    if version != CODE_VERSION:
        raise _malformed("unsupported version", "version")
    if alg not in sm.ALGORITHMS:
        raise _malformed("unknown algorithm", "alg")
    if not 1 <= ecard_id <= ECARD_ID_MAX:
        raise _malformed("ecard_id out of range", "ecard_id")
    if not 0 <= issued_at <= ISSUED_AT_MAX:
        raise _malformed("issued_at out of range", "issued_at")
    if not 0 <= counter <= CODE_COUNTER_MAX:
        raise _malformed("counter out of range", "counter")
    return _HEADER.pack(version, alg, ecard_id, issued_at, counter)


def signed_bytes(code: EcardCode) -> bytes:
    """SIGNING_DOMAIN || header (18 bytes): what the signature covers."""
    return SIGNING_DOMAIN + _header(code.version, code.alg, code.ecard_id, code.issued_at, code.counter)


def code_to_bytes(code: EcardCode) -> bytes:
    if len(code.signature) != CODE_SIGNATURE_LEN_BYTES:
        raise _malformed("signature is 64 bytes", "signature")
    return _header(code.version, code.alg, code.ecard_id, code.issued_at, code.counter) + code.signature


def encode_code(code: EcardCode) -> str:
    """Text form for the QR code: 'EC1' + base32 (RFC 4648 alphabet, uppercase, no padding)."""
    return CODE_TEXT_PREFIX + base64.b32encode(code_to_bytes(code)).decode("ascii").rstrip("=")


def decode_code(text: str) -> EcardCode:
    """Parse the text form; EcardCodeMalformed (``ecard_code_malformed``) for anything else.

    Strict: uppercase only, exact length, canonical base32 (unused trailing bits zero). The signature
    is not checked here: see :func:`verify_code`.
    """
    if not isinstance(text, str) or len(text) > CODE_TEXT_CHARS_MAX:
        raise _malformed("code too long or not text")
    if len(text) != CODE_TEXT_CHARS or not text.startswith(CODE_TEXT_PREFIX):
        raise _malformed("not an e-card code")
    raw = b32_canonical(text[len(CODE_TEXT_PREFIX) :], _malformed)
    if len(raw) != CODE_LEN_BYTES:
        raise _malformed("not an e-card code (length)")
    version, alg, ecard_id, issued_at, counter = _HEADER.unpack_from(raw)
    code = EcardCode(version, alg, ecard_id, issued_at, counter, raw[CODE_HEADER_LEN_BYTES:])
    _header(version, alg, ecard_id, issued_at, counter)  # range checks
    return code


def verify_code(code: EcardCode, public_key_bytes: bytes) -> bool:
    """True iff the signature verifies under the e-card's registered key (same alg)."""
    try:
        return sm.verify(code.alg, public_key_bytes, code.signature, signed_bytes(code))
    except CodecError:
        return False


def check_freshness(
    code: EcardCode,
    now_s: int,
    lifetime_s: int = CODE_LIFETIME_S_DEFAULT,
    skew_s: int = CODE_SKEW_S_DEFAULT,
) -> str | None:
    """None if issued_at is in [now - lifetime, now + skew]; else 'expired' or 'future'. The skew is allowed
    on the future side only, so that a clock difference never stretches the lifetime (the verifier's replay
    memory covers lifetime + skew)."""
    if code.issued_at > now_s + skew_s:
        return "future"
    if now_s - code.issued_at > lifetime_s:
        return "expired"
    return None


class EcardDevice:
    """The app side: holds the e-card's private key and counter and produces codes."""

    def __init__(
        self,
        alg: int,
        private_key: sm.Sm2PrivateKey | ed25519.Ed25519PrivateKey,
        ecard_id: int,
        counter: int = 0,
    ) -> None:
        if alg not in sm.ALGORITHMS:
            raise AlgorithmUnknown("algorithm_unknown", f"unknown algorithm {alg!r}")
        expected = sm.Sm2PrivateKey if alg == sm.ALG_SM2_SM3 else ed25519.Ed25519PrivateKey
        if not isinstance(private_key, expected):
            raise ValueError("private key does not match alg")
        if not 1 <= ecard_id <= ECARD_ID_MAX:
            raise _malformed("ecard_id out of range", "ecard_id")
        self.alg = alg
        self.private_key = private_key
        self.ecard_id = ecard_id
        self.counter = counter
        self.public_key_bytes = sm.public_key_bytes(private_key)

    @classmethod
    def from_seed(cls, seed32: bytes, ecard_id: int, alg: int = sm.ALG_SM2_SM3) -> EcardDevice:
        return cls(alg, sm.private_key_from_seed(alg, seed32), ecard_id)

    @classmethod
    def generate(cls, ecard_id: int, alg: int = sm.ALG_SM2_SM3) -> EcardDevice:
        return cls.from_seed(os.urandom(32), ecard_id, alg)

    def make_code(self, now_s: int, counter: int) -> EcardCode:
        unsigned = EcardCode(CODE_VERSION, self.alg, self.ecard_id, now_s, counter, b"")
        signature = sm.sign(self.private_key, signed_bytes(unsigned))
        return EcardCode(CODE_VERSION, self.alg, self.ecard_id, now_s, counter, signature)

    def next_code(self, now_s: int) -> str:
        """Increment the counter and return the signed code's text form."""
        if self.counter >= CODE_COUNTER_MAX:
            raise OverflowError("e-card code counter exhausted")
        self.counter += 1
        return encode_code(self.make_code(now_s, self.counter))
