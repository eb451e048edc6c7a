"""Transit ride codes (乘车码) verified OFFLINE at the gate: issuer certificate, phone-signed code, gate
verifier and the ride record the gate uploads later. See ridecode.md for the byte layouts.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import struct
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from protocols import sm
from protocols.errors import CodecError, KeyInvalid
from protocols.strict import b32_canonical, check_exact_keys, check_upload, decode_upload, nested_field
from protocols.transit import DIRECTIONS, OFFLINE_BATCH_RECORDS_MAX

__all__ = [
    "ACCOUNT_ID_MAX",
    "CERT_FIXED_LEN_BYTES",
    "CERT_SERIAL_MAX",
    "CERT_SIGNING_DOMAIN",
    "CERT_VERSION",
    "CODE_COUNTER_MAX",
    "CODE_LIFETIME_S_DEFAULT",
    "CODE_SIGNING_DOMAIN",
    "CODE_SKEW_S_DEFAULT",
    "CODE_TEXT_CHARS",
    "CODE_TEXT_PREFIX",
    "RIDE_BATCH_RECORDS_MAX",
    "RIDE_RECORD_KEYS",
    "GateDecision",
    "GateOutcome",
    "IssuerKeys",
    "RideBatch",
    "RideBatchInvalid",
    "RideCert",
    "RideCertInvalid",
    "RideCode",
    "RideCodeMalformed",
    "RidePhone",
    "RideRecord",
    "RideRecordInvalid",
    "cert_signed_bytes",
    "code_signed_bytes",
    "code_to_bytes",
    "decode_cert",
    "decode_code",
    "encode_cert",
    "encode_code",
    "issue_cert",
    "ride_batch_from_dict",
    "ride_batch_to_dict",
    "ride_record_from_dict",
    "ride_record_to_dict",
    "verify_at_gate",
    "verify_cert",
]

CERT_VERSION = 0x01
CERT_SIGNING_DOMAIN = b"CARDSVC-RIDE-CERT-V1"
CODE_SIGNING_DOMAIN = b"CARDSVC-RIDE-CODE-V1"
CODE_TEXT_PREFIX = "RC1"
CERT_SERIAL_MAX = 2**63 - 1
ACCOUNT_ID_MAX = 2**63 - 1
CODE_COUNTER_MAX = 2**32 - 1
TIME_S_MAX = 2**32 - 1
FEN_MAX = 2**32 - 1
CODE_LIFETIME_S_DEFAULT = 60
CODE_SKEW_S_DEFAULT = 30
RIDE_BATCH_RECORDS_MAX = OFFLINE_BATCH_RECORDS_MAX
GATE_SEQ_MAX = 2**32 - 1
DENY_LIST_VERSION_MAX = 2**63 - 1
BATCH_ID_MAX = 2**63 - 1
ISSUER_SIGNATURE_LEN_BYTES = sm.SM2_SIGNATURE_LEN_BYTES
USER_SIGNATURE_LEN_BYTES = 64

_CERT_FIXED = struct.Struct(">BBBQQIIII")
CERT_FIXED_LEN_BYTES = _CERT_FIXED.size  # 35
_CODE_TAIL = struct.Struct(">II")


def _cert_len(alg: int) -> int:
    return CERT_FIXED_LEN_BYTES + sm.public_key_length(alg) + ISSUER_SIGNATURE_LEN_BYTES


def _code_len(alg: int) -> int:
    return _cert_len(alg) + _CODE_TAIL.size + USER_SIGNATURE_LEN_BYTES


def _b32_chars(n_bytes: int) -> int:
    return (n_bytes * 8 + 4) // 5


# Text length for each user-key algorithm: SM2 381, Ed25519 328 characters.
CODE_TEXT_CHARS: dict[int, int] = {
    alg: len(CODE_TEXT_PREFIX) + _b32_chars(_code_len(alg)) for alg in sorted(sm.ALGORITHMS)
}
_TEXT_LEN_TO_ALG = {n: alg for alg, n in CODE_TEXT_CHARS.items()}
_GATE_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
_LINE_RE = re.compile(r"[A-Za-z0-9._-]{1,16}")
_STATION_RE = re.compile(r"[A-Za-z0-9._-]{0,16}")

IssuerKeys = bytes | Mapping[int, bytes]


class RideCodeMalformed(CodecError):
    default_code = "ride_code_malformed"


class RideCertInvalid(CodecError):
    default_code = "ride_cert_invalid"


class RideRecordInvalid(CodecError):
    default_code = "ride_record_invalid"


class RideBatchInvalid(CodecError):
    default_code = "ride_batch_invalid"


# ------------------------------------------------------------------------------------ certificate


@dataclass(frozen=True, slots=True)
class RideCert:
    """The issuer's statement: this user key may ride on account ``account_id`` within these limits."""

    version: int
    alg: int  # the user key's algorithm: sm.ALG_SM2_SM3 or sm.ALG_ED25519
    issuer_key_id: int  # 1..255: which issuer key signed (rotation)
    cert_serial: int
    account_id: int  # our card_id
    valid_from: int  # unix s
    valid_to: int  # unix s, inclusive
    max_fare_fen: int  # per ride
    credit_limit_fen: int  # post-paid rides not yet settled
    user_public_key: bytes
    issuer_signature: bytes  # SM2 raw r||s, 64 bytes


def _cert_bad(message: str, field_name: str | None = None) -> RideCertInvalid:
    return RideCertInvalid("ride_cert_invalid", message, field=field_name)


def _u(v: object, name: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _cert_bad(f"{name} must be an integer in [{lo}, {hi}]", name)
    return v


def _tbs(c: RideCert) -> bytes:
    """The certificate's fields before the issuer signature (validated)."""
    if c.version != CERT_VERSION:
        raise _cert_bad("unsupported certificate version", "version")
    if type(c.alg) is not int or c.alg not in sm.ALGORITHMS:
        raise _cert_bad("unknown user key algorithm", "alg")
    _u(c.issuer_key_id, "issuer_key_id", 1, 255)
    _u(c.cert_serial, "cert_serial", 1, CERT_SERIAL_MAX)
    _u(c.account_id, "account_id", 1, ACCOUNT_ID_MAX)
    _u(c.valid_from, "valid_from", 0, TIME_S_MAX)
    _u(c.valid_to, "valid_to", c.valid_from, TIME_S_MAX)
    _u(c.max_fare_fen, "max_fare_fen", 0, FEN_MAX)
    _u(c.credit_limit_fen, "credit_limit_fen", 0, FEN_MAX)
    pk = c.user_public_key
    if not isinstance(pk, bytes) or len(pk) != sm.public_key_length(c.alg):
        raise _cert_bad("user public key has the wrong length", "user_public_key")
    if c.alg == sm.ALG_SM2_SM3 and pk[0] != 0x04:
        raise _cert_bad("SM2 public key must be uncompressed", "user_public_key")
    fixed = _CERT_FIXED.pack(
        c.version,
        c.alg,
        c.issuer_key_id,
        c.cert_serial,
        c.account_id,
        c.valid_from,
        c.valid_to,
        c.max_fare_fen,
        c.credit_limit_fen,
    )
    return fixed + pk


def cert_signed_bytes(c: RideCert) -> bytes:
    """CERT_SIGNING_DOMAIN || the certificate bytes before the issuer signature."""
    return CERT_SIGNING_DOMAIN + _tbs(c)


def encode_cert(c: RideCert) -> bytes:
    if not isinstance(c.issuer_signature, bytes) or len(c.issuer_signature) != ISSUER_SIGNATURE_LEN_BYTES:
        raise _cert_bad("issuer signature is 64 bytes", "issuer_signature")
    return _tbs(c) + c.issuer_signature


def _parse_cert(raw: bytes) -> tuple[RideCert, int]:
    """Parse a certificate at the start of ``raw``; returns it and its length."""
    if len(raw) < CERT_FIXED_LEN_BYTES:
        raise _cert_bad("certificate too short")
    version, alg, key_id, serial, account, vf, vt, max_fare, limit = _CERT_FIXED.unpack_from(raw)
    if alg not in sm.ALGORITHMS:
        raise _cert_bad("unknown user key algorithm", "alg")
    pk_len = sm.public_key_length(alg)
    n = _cert_len(alg)
    if len(raw) < n:
        raise _cert_bad("certificate too short")
    pk = bytes(raw[CERT_FIXED_LEN_BYTES : CERT_FIXED_LEN_BYTES + pk_len])
    sig = bytes(raw[CERT_FIXED_LEN_BYTES + pk_len : n])
    cert = RideCert(version, alg, key_id, serial, account, vf, vt, max_fare, limit, pk, sig)
    _tbs(cert)  # range checks
    return cert, n


def decode_cert(raw: bytes) -> RideCert:
    """Exact-length binary certificate -> RideCert (RideCertInvalid ``ride_cert_invalid``)."""
    if not isinstance(raw, bytes | bytearray):
        raise _cert_bad("bytes expected")
    cert, n = _parse_cert(bytes(raw))
    if n != len(raw):
        raise _cert_bad("trailing bytes after the certificate")
    return cert


def issue_cert(
    issuer_private_key: sm.Sm2PrivateKey,
    *,
    issuer_key_id: int,
    cert_serial: int,
    account_id: int,
    alg: int,
    user_public_key: bytes,
    valid_from: int,
    valid_to: int,
    max_fare_fen: int,
    credit_limit_fen: int,
) -> RideCert:
    """The issuer signs (SM2) a user key. KeyInvalid if the user key is not a valid key for ``alg``."""
    sm.validate_public_key(alg, user_public_key)
    unsigned = RideCert(
        CERT_VERSION,
        alg,
        issuer_key_id,
        cert_serial,
        account_id,
        valid_from,
        valid_to,
        max_fare_fen,
        credit_limit_fen,
        bytes(user_public_key),
        b"",
    )
    sig = issuer_private_key.sign_raw(cert_signed_bytes(unsigned))
    return dataclasses.replace(unsigned, issuer_signature=sig)


def verify_cert(issuer_public_key_bytes: bytes, cert: RideCert) -> bool:
    """True iff the issuer's SM2 signature over the certificate verifies. Never raises."""
    try:
        return sm.verify(
            sm.ALG_SM2_SM3, issuer_public_key_bytes, cert.issuer_signature, cert_signed_bytes(cert)
        )
    except CodecError:
        return False


# ------------------------------------------------------------------------------------------- code


@dataclass(frozen=True, slots=True)
class RideCode:
    cert: RideCert
    time: int  # unix s, when the phone made the code
    counter: int  # u32, incremented per code by the phone (starts at 1)
    signature: bytes  # by the user key (cert.alg), 64 bytes


def _malformed(message: str) -> RideCodeMalformed:
    return RideCodeMalformed("ride_code_malformed", message)


def _tail(code: RideCode) -> bytes:
    if type(code.time) is not int or not 0 <= code.time <= TIME_S_MAX:
        raise _malformed("time out of range")
    if type(code.counter) is not int or not 0 <= code.counter <= CODE_COUNTER_MAX:
        raise _malformed("counter out of range")
    return _CODE_TAIL.pack(code.time, code.counter)


def code_signed_bytes(code: RideCode) -> bytes:
    """CODE_SIGNING_DOMAIN || certificate (with issuer signature) || time || counter."""
    return CODE_SIGNING_DOMAIN + encode_cert(code.cert) + _tail(code)


def code_to_bytes(code: RideCode) -> bytes:
    if not isinstance(code.signature, bytes) or len(code.signature) != USER_SIGNATURE_LEN_BYTES:
        raise _malformed("user signature is 64 bytes")
    return encode_cert(code.cert) + _tail(code) + code.signature


def encode_code(code: RideCode) -> str:
    """QR text: 'RC1' + base32 (RFC 4648, uppercase, no padding) of the code bytes."""
    return CODE_TEXT_PREFIX + base64.b32encode(code_to_bytes(code)).decode("ascii").rstrip("=")


def decode_code(text: str) -> RideCode:
    """Strict parse of the QR text (RideCodeMalformed ``ride_code_malformed``); signatures unchecked."""
    if not isinstance(text, str) or len(text) not in _TEXT_LEN_TO_ALG:
        raise _malformed("not a ride code (length)")
    if not text.startswith(CODE_TEXT_PREFIX):
        raise _malformed("not a ride code (prefix)")
    raw = b32_canonical(text[len(CODE_TEXT_PREFIX) :], _malformed)
    try:
        cert, n = _parse_cert(raw)
    except RideCertInvalid as exc:
        raise _malformed(f"bad certificate: {exc.message}") from exc
    if len(raw) != _code_len(cert.alg) or len(text) != CODE_TEXT_CHARS[cert.alg]:
        raise _malformed("length does not match the certificate's algorithm")
    t, counter = _CODE_TAIL.unpack_from(raw, n)
    return RideCode(cert, t, counter, raw[n + _CODE_TAIL.size :])


class RidePhone:
    """The phone side: holds the user private key and certificate, produces codes."""

    def __init__(
        self,
        cert: RideCert,
        user_private_key: sm.Sm2PrivateKey | ed25519.Ed25519PrivateKey,
        counter: int = 0,
    ) -> None:
        expected = sm.Sm2PrivateKey if cert.alg == sm.ALG_SM2_SM3 else ed25519.Ed25519PrivateKey
        if not isinstance(user_private_key, expected):
            raise KeyInvalid("private_key_invalid", "private key does not match the certificate's alg")
        if sm.public_key_bytes(user_private_key) != cert.user_public_key:
            raise KeyInvalid("private_key_invalid", "private key does not match the certificate")
        encode_cert(cert)
        self.cert = cert
        self.private_key = user_private_key
        self.counter = counter

    def make_code(self, now_s: int, counter: int) -> RideCode:
        unsigned = RideCode(self.cert, now_s, counter, b"")
        return RideCode(self.cert, now_s, counter, sm.sign(self.private_key, code_signed_bytes(unsigned)))

    def next_code(self, now_s: int) -> str:
        """Increment the counter and return the signed code's QR text."""
        if self.counter >= CODE_COUNTER_MAX:
            raise OverflowError("ride code counter exhausted")
        self.counter += 1
        return encode_code(self.make_code(now_s, self.counter))


# ------------------------------------------------------------------------------------------- gate


class GateOutcome(StrEnum):
    """Stable outcome strings, in the order the gate checks them (first failure wins)."""

    OK = "ok"
    MALFORMED = "malformed"
    BAD_ISSUER_SIGNATURE = "bad_issuer_signature"
    BAD_USER_SIGNATURE = "bad_user_signature"
    DENIED = "denied"
    CERT_EXPIRED = "cert_expired"
    CODE_EXPIRED = "code_expired"


@dataclass(frozen=True, slots=True)
class GateDecision:
    outcome: GateOutcome
    code: RideCode | None = None  # the decoded code, when it decoded

    @property
    def ok(self) -> bool:
        return self.outcome == GateOutcome.OK


def _issuer_key(keys: IssuerKeys, key_id: int) -> bytes | None:
    if isinstance(keys, bytes | bytearray):
        return bytes(keys)
    try:
        key = keys.get(key_id)
    except TypeError:
        return None
    return bytes(key) if isinstance(key, bytes | bytearray) else None


def verify_at_gate(
    code_text: str,
    issuer_public_key_bytes: IssuerKeys,
    now_s: int,
    deny_serials: Container[int],
    deny_accounts: Container[int],
    lifetime_s: int = CODE_LIFETIME_S_DEFAULT,
    skew_s: int = CODE_SKEW_S_DEFAULT,
) -> GateDecision:
    """Offline check of a scanned ride code. Never raises on bad input (see ridecode.md for the order).

    ``issuer_public_key_bytes``: the issuer's SM2 public key (65 bytes), or a mapping issuer_key_id ->
    key during a key rotation. The server re-verifies uploaded rides with ``now_s`` = the gate's time.
    """
    try:
        code = decode_code(code_text)
    except CodecError:
        return GateDecision(GateOutcome.MALFORMED)
    cert = code.cert
    issuer_key = _issuer_key(issuer_public_key_bytes, cert.issuer_key_id)
    if issuer_key is None or not verify_cert(issuer_key, cert):
        return GateDecision(GateOutcome.BAD_ISSUER_SIGNATURE, code)
    try:
        user_ok = sm.verify(cert.alg, cert.user_public_key, code.signature, code_signed_bytes(code))
    except CodecError:
        user_ok = False
    if not user_ok:
        return GateDecision(GateOutcome.BAD_USER_SIGNATURE, code)
    if cert.cert_serial in deny_serials or cert.account_id in deny_accounts:
        return GateDecision(GateOutcome.DENIED, code)
    if now_s + skew_s < cert.valid_from or now_s - skew_s > cert.valid_to:
        return GateDecision(GateOutcome.CERT_EXPIRED, code)
    if code.time > now_s + skew_s or now_s - code.time > lifetime_s + skew_s:
        return GateDecision(GateOutcome.CODE_EXPIRED, code)
    return GateDecision(GateOutcome.OK, code)


# ------------------------------------------------------------------------------------ ride record


@dataclass(frozen=True, slots=True)
class RideRecord:
    """What the gate uploads for a ride it let through. Validated on construction."""

    code_text: str
    gate_id: str  # the gate's terminal id
    gate_seq: int  # u32, the gate's own transaction counter
    line_id: str
    station_id: str
    direction: str  # "in" | "out" | "single"
    time: int  # unix s, the gate's clock at the scan
    deny_list_version: int  # version of the deny-list the gate held

    def __post_init__(self) -> None:
        _validate_ride_record(self)


RIDE_RECORD_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RideRecord))
_RIDE_RECORD_KEY_SET = frozenset(RIDE_RECORD_KEYS)


def _rec_bad(message: str, field_name: str | None = None) -> RideRecordInvalid:
    return RideRecordInvalid("ride_record_invalid", message, field=field_name)


def _rec_int(v: object, name: str, hi: int) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise _rec_bad(f"{name} must be an integer in [0, {hi}]", name)
    return v


def _rec_str(v: object, name: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(v, str) or not v.isascii() or not pattern.fullmatch(v):
        raise _rec_bad(f"{name} has the wrong format", name)
    return v


def _validate_ride_record(r: RideRecord) -> None:
    try:
        decode_code(r.code_text)
    except CodecError as exc:
        raise _rec_bad("code_text is not a ride code", "code_text") from exc
    _rec_str(r.gate_id, "gate_id", _GATE_RE)
    _rec_int(r.gate_seq, "gate_seq", GATE_SEQ_MAX)
    _rec_str(r.line_id, "line_id", _LINE_RE)
    _rec_str(r.station_id, "station_id", _STATION_RE)
    if not isinstance(r.direction, str) or r.direction not in DIRECTIONS:
        raise _rec_bad("direction must be in, out or single", "direction")
    _rec_int(r.time, "time", TIME_S_MAX)
    _rec_int(r.deny_list_version, "deny_list_version", DENY_LIST_VERSION_MAX)


def ride_record_to_dict(r: RideRecord) -> dict[str, Any]:
    _validate_ride_record(r)
    return {k: getattr(r, k) for k in RIDE_RECORD_KEYS}


def ride_record_from_dict(d: object, where: str = "") -> RideRecord:
    """Strict decode: exactly RIDE_RECORD_KEYS (RideRecordInvalid ``ride_record_invalid``)."""
    try:
        if not isinstance(d, Mapping):
            raise _rec_bad("record must be an object")
        check_exact_keys(d, RIDE_RECORD_KEYS, _RIDE_RECORD_KEY_SET, _rec_bad)
        return RideRecord(**{k: d[k] for k in RIDE_RECORD_KEYS})
    except RideRecordInvalid as exc:
        raise RideRecordInvalid(exc.code, exc.message, field=nested_field(where, exc.field)) from None


@dataclass(frozen=True, slots=True)
class RideBatch:
    """One upload from a gate: 1..500 records of that gate, gate_seq strictly ascending."""

    gate_id: str
    batch_id: int
    records: Sequence[RideRecord] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.records, tuple):
            object.__setattr__(self, "records", tuple(self.records))
        _validate_ride_batch(self)


def _batch_bad(message: str, field_name: str | None = None) -> RideBatchInvalid:
    return RideBatchInvalid("ride_batch_invalid", message, field=field_name)


def _validate_ride_batch(b: RideBatch) -> None:
    check_upload(
        b.gate_id, b.batch_id, b.records, id_key="gate_id", id_re=_GATE_RE, batch_id_max=BATCH_ID_MAX,
        record_type=RideRecord, records_max=RIDE_BATCH_RECORDS_MAX, seq_key="gate_seq", uploader="gate",
        bad=_batch_bad,
    )  # fmt: skip


def ride_batch_to_dict(b: RideBatch) -> dict[str, Any]:
    _validate_ride_batch(b)
    return {
        "gate_id": b.gate_id,
        "batch_id": b.batch_id,
        "records": [ride_record_to_dict(r) for r in b.records],
    }


def ride_batch_from_dict(d: object) -> RideBatch:
    """Strict, all-or-nothing (RideBatchInvalid, or RideRecordInvalid with field ``records[i].key``)."""
    gate_id, batch_id, records = decode_upload(d, "gate_id", RIDE_BATCH_RECORDS_MAX, _batch_bad)
    return RideBatch(
        gate_id, batch_id, tuple(ride_record_from_dict(r, f"records[{i}].") for i, r in enumerate(records))
    )
