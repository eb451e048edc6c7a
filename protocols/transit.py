"""Transit purse (T-Union style) offline records, their TAC, upload batches and back-office verdicts.

See transit.md for the byte layout the TAC covers, the JSON forms and the meaning of every verdict.
Pure: no I/O. Only the issuer's back office holds ``MK_TAC``; validators never verify a TAC.
"""

from __future__ import annotations

import functools
import hmac
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import IntEnum, StrEnum
from typing import Any

from protocols.card import KEY_PURPOSE_TAC, HotlistAction, derive_card_key, validate_card_sn
from protocols.errors import CodecError, KeyInvalid
from protocols.hotlist import HotlistEntry
from protocols.sm import SM4_BLOCK_LEN_BYTES, SM4_KEY_LEN_BYTES, sm3, sm4_cbc_last_block
from protocols.strict import check_exact_keys, check_int, check_str, check_upload, decode_upload, nested_field

__all__ = [
    "AMOUNT_FEN_MAX",
    "BALANCE_FEN_MAX",
    "BATCH_ID_MAX",
    "DIRECTIONS",
    "HOTLIST_VERSION_MAX",
    "LINE_ID_LEN_CHARS_MAX",
    "OFFLINE_BATCH_RECORDS_MAX",
    "PURSE_SEQ_MODULUS",
    "RECORD_KEYS",
    "RESULT_PRECEDENCE",
    "STATION_ID_LEN_CHARS_MAX",
    "TAC_INPUT_LEN_BYTES",
    "TAC_INPUT_VERSION",
    "TAC_LEN_BYTES",
    "TERMINAL_SEQ_MAX",
    "TERMINAL_TAG_LEN_BYTES",
    "TXN_TIME_S_MAX",
    "OfflineBatch",
    "OfflineRecord",
    "PurseCard",
    "PurseDebit",
    "PurseLoad",
    "PurseRefused",
    "RecordResult",
    "TransitBatchInvalid",
    "TransitRecordInvalid",
    "TxnType",
    "batch_from_dict",
    "batch_to_dict",
    "blocked_at_version",
    "compute_tac",
    "extend_purse_seq",
    "iso9797_pad_method2",
    "judge_record",
    "purse_seq_delta",
    "purse_seq_next",
    "record_from_dict",
    "record_to_dict",
    "sm4_cbc_mac",
    "tac_input",
    "terminal_tag",
    "validate_record",
    "verify_tac",
]

TAC_LEN_BYTES = 4
TAC_INPUT_VERSION = 0x01
TERMINAL_TAG_LEN_BYTES = 6
PURSE_SEQ_MODULUS = 2**16  # the card's offline transaction counter is a u16 and wraps to 0
AMOUNT_FEN_MAX = 2**32 - 1
BALANCE_FEN_MAX = 2**32 - 1
TERMINAL_SEQ_MAX = 2**32 - 1
TXN_TIME_S_MAX = 2**32 - 1
HOTLIST_VERSION_MAX = 2**63 - 1
BATCH_ID_MAX = 2**63 - 1
OFFLINE_BATCH_RECORDS_MAX = 500
LINE_ID_LEN_CHARS_MAX = 16
STATION_ID_LEN_CHARS_MAX = 16
DIRECTIONS: frozenset[str] = frozenset({"in", "out", "single"})

_TAC_INPUT = struct.Struct(">BIIHB6sII")
TAC_INPUT_LEN_BYTES = _TAC_INPUT.size  # 26
_TERMINAL_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")  # same as terminal_auth.md
_LINE_RE = re.compile(r"[A-Za-z0-9._-]{1,16}")
_STATION_RE = re.compile(r"[A-Za-z0-9._-]{0,16}")
_TAC_HEX_RE = re.compile(r"[0-9a-fA-F]{8}")


class TransitRecordInvalid(CodecError):
    default_code = "transit_record_invalid"


class TransitBatchInvalid(CodecError):
    default_code = "transit_batch_invalid"


class PurseRefused(CodecError):
    """The (simulated) card refuses: ``purse_insufficient``, ``purse_overdrawn``, ``purse_balance_cap``."""

    default_code = "purse_insufficient"


class TxnType(IntEnum):
    """Transaction type byte (PBOC electronic purse numbering)."""

    PURSE_DEBIT = 0x06  # single-tap fare (bus flat fare, ...): direction "single"
    COMPOSITE = 0x09  # composite (复合消费) record: metro tap-in ("in", amount 0) and tap-out ("out")


# ------------------------------------------------------------------------------------------ record


@dataclass(frozen=True, slots=True)
class OfflineRecord:
    """One offline purse transaction as the validator stores and uploads it. Validated on construction."""

    terminal_id: str
    terminal_seq: int  # u32, the validator's own transaction counter
    card_sn: str  # canonical (uppercase)
    purse_seq: int  # u16, the card's offline transaction counter used for this transaction
    amount_fen: int  # u32
    balance_before_fen: int  # u32, the purse balance before this transaction
    txn_time: int  # unix seconds, u32
    txn_type: TxnType
    line_id: str
    station_id: str
    direction: str  # "in" | "out" | "single"
    hotlist_version: int  # deny-list version the validator held
    tac: bytes  # 4 bytes

    def __post_init__(self) -> None:
        validate_record(self)


PurseDebit = OfflineRecord

RECORD_KEYS: tuple[str, ...] = tuple(f.name for f in fields(OfflineRecord))
_RECORD_KEY_SET = frozenset(RECORD_KEYS)


def _bad(message: str, field_name: str | None = None) -> TransitRecordInvalid:
    return TransitRecordInvalid("transit_record_invalid", message, field=field_name)


def _check_int(v: object, name: str, hi: int, lo: int = 0) -> int:
    return check_int(v, name, lo, hi, _bad)


def _check_str(v: object, name: str, pattern: re.Pattern[str]) -> str:
    return check_str(v, name, pattern, _bad)


def validate_record(r: OfflineRecord) -> None:
    """All field rules of transit.md (TransitRecordInvalid ``transit_record_invalid``)."""
    _check_str(r.terminal_id, "terminal_id", _TERMINAL_RE)
    _check_int(r.terminal_seq, "terminal_seq", TERMINAL_SEQ_MAX)
    try:
        sn = validate_card_sn(r.card_sn)
    except CodecError as exc:
        raise _bad("card_sn invalid", "card_sn") from exc
    if sn != r.card_sn:
        raise _bad("card_sn must be uppercase", "card_sn")
    _check_int(r.purse_seq, "purse_seq", PURSE_SEQ_MODULUS - 1)
    _check_int(r.amount_fen, "amount_fen", AMOUNT_FEN_MAX)
    _check_int(r.balance_before_fen, "balance_before_fen", BALANCE_FEN_MAX)
    _check_int(r.txn_time, "txn_time", TXN_TIME_S_MAX)
    if not isinstance(r.txn_type, TxnType):
        raise _bad("txn_type must be 6 or 9", "txn_type")
    _check_str(r.line_id, "line_id", _LINE_RE)
    _check_str(r.station_id, "station_id", _STATION_RE)
    if not isinstance(r.direction, str) or r.direction not in DIRECTIONS:
        raise _bad("direction must be in, out or single", "direction")
    if (r.txn_type == TxnType.COMPOSITE) != (r.direction in ("in", "out")):
        raise _bad("txn_type 9 goes with direction in/out, 6 with single", "txn_type")
    if r.direction == "in" and r.amount_fen != 0:
        raise _bad("a tap-in record carries amount 0", "amount_fen")
    _check_int(r.hotlist_version, "hotlist_version", HOTLIST_VERSION_MAX)
    if not isinstance(r.tac, bytes) or len(r.tac) != TAC_LEN_BYTES:
        raise _bad("tac is 4 bytes", "tac")


# --------------------------------------------------------------------------------------------- TAC


@functools.lru_cache(maxsize=4096)  # every record of an upload has the same terminal
def terminal_tag(terminal_id: str) -> bytes:
    """Fixed-width terminal identifier inside the TAC input: SM3(ASCII terminal_id)[:6]."""
    return sm3(_check_str(terminal_id, "terminal_id", _TERMINAL_RE).encode("ascii"))[:TERMINAL_TAG_LEN_BYTES]


def tac_input(r: OfflineRecord) -> bytes:
    """The 26 bytes the TAC covers (transit.md): version, amount, balance_before, purse_seq, txn_type,
    terminal tag, terminal_seq, txn_time; integers big-endian unsigned."""
    return _TAC_INPUT.pack(
        TAC_INPUT_VERSION,
        r.amount_fen,
        r.balance_before_fen,
        r.purse_seq,
        int(r.txn_type),
        terminal_tag(r.terminal_id),
        r.terminal_seq,
        r.txn_time,
    )


def iso9797_pad_method2(data: bytes) -> bytes:
    """ISO/IEC 9797-1 padding method 2: append 0x80, then 0x00 up to a multiple of 16 bytes (always pads)."""
    padded = bytes(data) + b"\x80"
    return padded + b"\x00" * (-len(padded) % SM4_BLOCK_LEN_BYTES)


def sm4_cbc_mac(key16: bytes, data: bytes) -> bytes:
    """SM4-CBC-MAC (ISO/IEC 9797-1 MAC algorithm 1, padding method 2, IV zero): the last 16-byte block."""
    if not isinstance(key16, bytes | bytearray) or len(key16) != SM4_KEY_LEN_BYTES:
        raise KeyInvalid("key_invalid", "an SM4 key is 16 bytes")
    return sm4_cbc_last_block(bytes(key16), iso9797_pad_method2(data))


def compute_tac(tac_key16: bytes, record: OfflineRecord) -> bytes:
    """TAC = first 4 bytes of SM4-CBC-MAC(card TAC key, tac_input(record))."""
    return sm4_cbc_mac(tac_key16, tac_input(record))[:TAC_LEN_BYTES]


def verify_tac(tac_key16: bytes, record: OfflineRecord) -> bool:
    """Constant-time TAC check. KeyInvalid for a malformed key (configuration error)."""
    expected = compute_tac(tac_key16, record)
    return hmac.compare_digest(expected, bytes(record.tac))


# ------------------------------------------------------------------------------ purse sequence


def purse_seq_next(seq: int) -> int:
    """The counter value after ``seq`` (65535 is followed by 0)."""
    return (seq + 1) % PURSE_SEQ_MODULUS


def purse_seq_delta(last: int, seq: int) -> int:
    """Signed distance from ``last`` to ``seq`` modulo 2^16, in [-32768, 32767]: 1 = the next one,
    > 1 = ahead with a gap, <= 0 = the same or an older one (late upload)."""
    d = (seq - last) % PURSE_SEQ_MODULUS
    return d - PURSE_SEQ_MODULUS if d >= PURSE_SEQ_MODULUS // 2 else d


def extend_purse_seq(last_ext: int, seq: int) -> int:
    """Unwrap a u16 ``seq`` to the unbounded counter nearest ``last_ext`` (the highest extended value
    posted for the card; its issuance purse_seq for a new card). The back office keys records by
    (card, extended seq). A result below the card's issuance value claims to precede the card: malformed."""
    _check_int(seq, "purse_seq", PURSE_SEQ_MODULUS - 1)
    return last_ext + purse_seq_delta(last_ext % PURSE_SEQ_MODULUS, seq)


# ------------------------------------------------------------------------------ card simulator


@dataclass(frozen=True, slots=True)
class PurseLoad:
    """A top-up (online): the loading device reports it with the card's current offline purse_seq, so
    the back office applies it to the shadow balance after the debit with that purse_seq."""

    card_sn: str
    purse_seq: int
    amount_fen: int
    balance_before_fen: int  # may be negative (an overdraft being repaid)
    balance_after_fen: int


class PurseCard:
    """The card side of the transit purse (tests, simulators, load tests). Deterministic.

    ``purse_seq`` is the counter of the last offline transaction (0 for a new card); each debit
    advances it by one (wrapping) and signs with the new value. A debit is allowed when the balance is
    not negative and balance - amount >= -overdraft_fen (so records never carry a negative balance).
    """

    def __init__(
        self,
        card_sn: str,
        tac_key: bytes | None = None,
        master_key: bytes | None = None,
        balance_fen: int = 0,
        purse_seq: int = 0,
        overdraft_fen: int = 0,
        balance_cap_fen: int = BALANCE_FEN_MAX,
    ) -> None:
        self.card_sn = validate_card_sn(card_sn)
        if (tac_key is None) == (master_key is None):
            raise ValueError("give exactly one of tac_key, master_key")
        key = (
            tac_key
            if tac_key is not None
            else derive_card_key(master_key or b"", self.card_sn, KEY_PURPOSE_TAC)
        )
        if not isinstance(key, bytes | bytearray) or len(key) != SM4_KEY_LEN_BYTES:
            raise KeyInvalid("key_invalid", "a TAC key is 16 bytes")
        self.tac_key = bytes(key)
        _check_int(purse_seq, "purse_seq", PURSE_SEQ_MODULUS - 1)
        _check_int(overdraft_fen, "overdraft_fen", BALANCE_FEN_MAX)
        _check_int(balance_cap_fen, "balance_cap_fen", BALANCE_FEN_MAX)
        _check_int(balance_fen, "balance_fen", balance_cap_fen, -overdraft_fen)
        self.balance_fen = balance_fen
        self.purse_seq = purse_seq
        self.overdraft_fen = overdraft_fen
        self.balance_cap_fen = balance_cap_fen

    def debit(
        self,
        amount_fen: int,
        terminal_id: str,
        terminal_seq: int,
        txn_time: int,
        *,
        line_id: str = "L1",
        station_id: str = "",
        direction: str = "single",
        txn_type: TxnType | None = None,
        hotlist_version: int = 0,
    ) -> OfflineRecord:
        """Debit the purse and return the signed record; PurseRefused if the card says no."""
        _check_int(amount_fen, "amount_fen", AMOUNT_FEN_MAX)
        if self.balance_fen < 0:
            raise PurseRefused("purse_overdrawn", "balance is negative: top up first")
        if self.balance_fen - amount_fen < -self.overdraft_fen:
            raise PurseRefused("purse_insufficient", "balance too low")
        if txn_type is None:
            txn_type = TxnType.PURSE_DEBIT if direction == "single" else TxnType.COMPOSITE
        seq = purse_seq_next(self.purse_seq)
        unsigned = OfflineRecord(
            terminal_id=terminal_id,
            terminal_seq=terminal_seq,
            card_sn=self.card_sn,
            purse_seq=seq,
            amount_fen=amount_fen,
            balance_before_fen=self.balance_fen,
            txn_time=txn_time,
            txn_type=txn_type,
            line_id=line_id,
            station_id=station_id,
            direction=direction,
            hotlist_version=hotlist_version,
            tac=bytes(TAC_LEN_BYTES),
        )
        record = _replace_tac(unsigned, compute_tac(self.tac_key, unsigned))
        self.purse_seq = seq
        self.balance_fen -= amount_fen
        return record

    def credit(self, amount_fen: int) -> PurseLoad:
        """Top up (online); PurseRefused ``purse_balance_cap`` above the cap. purse_seq is unchanged."""
        _check_int(amount_fen, "amount_fen", AMOUNT_FEN_MAX, 1)
        if self.balance_fen + amount_fen > self.balance_cap_fen:
            raise PurseRefused("purse_balance_cap", "balance would exceed the purse cap")
        before = self.balance_fen
        self.balance_fen += amount_fen
        return PurseLoad(self.card_sn, self.purse_seq, amount_fen, before, self.balance_fen)


def _replace_tac(r: OfflineRecord, tac: bytes) -> OfflineRecord:
    values = {f: getattr(r, f) for f in RECORD_KEYS}
    values["tac"] = tac
    return OfflineRecord(**values)


# ------------------------------------------------------------------------------------------ JSON


def record_to_dict(r: OfflineRecord) -> dict[str, Any]:
    """JSON-ready dict (keys in RECORD_KEYS order; tac lowercase hex; txn_type an integer). An
    OfflineRecord is valid by construction (validated in __post_init__, frozen)."""
    out: dict[str, Any] = {f: getattr(r, f) for f in RECORD_KEYS}
    out["txn_type"] = int(r.txn_type)
    out["tac"] = r.tac.hex()
    return out


def record_from_dict(d: object, where: str = "") -> OfflineRecord:
    """Strict decode: exactly RECORD_KEYS, JSON integers (not booleans) in range, strings in format,
    tac 8 hex. TransitRecordInvalid ``transit_record_invalid`` with ``field`` = ``where + key``."""
    try:
        if not isinstance(d, Mapping):
            raise _bad("record must be an object")
        check_exact_keys(d, RECORD_KEYS, _RECORD_KEY_SET, _bad)
        txn_type = _check_int(d["txn_type"], "txn_type", 255)
        if txn_type not in TxnType.__members__.values():
            raise _bad("txn_type must be 6 or 9", "txn_type")
        tac = d["tac"]
        if not isinstance(tac, str) or not tac.isascii() or not _TAC_HEX_RE.fullmatch(tac):
            raise _bad("tac is 8 hex characters", "tac")
        values = {k: d[k] for k in RECORD_KEYS}
        values["txn_type"] = TxnType(txn_type)
        values["tac"] = bytes.fromhex(tac)
        return OfflineRecord(**values)
    except TransitRecordInvalid as exc:
        raise TransitRecordInvalid(exc.code, exc.message, field=nested_field(where, exc.field)) from None


@dataclass(frozen=True, slots=True)
class OfflineBatch:
    """One upload from a validator: 1..500 records of that terminal, terminal_seq strictly ascending.
    ``batch_id`` (1 … 2^63 − 1) is chosen by the validator, unique per terminal: re-sending the same
    batch is idempotent."""

    terminal_id: str
    batch_id: int
    records: Sequence[OfflineRecord] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.records, tuple):
            object.__setattr__(self, "records", tuple(self.records))
        _validate_batch(self)


def _batch_bad(message: str, field_name: str | None = None) -> TransitBatchInvalid:
    return TransitBatchInvalid("transit_batch_invalid", message, field=field_name)


def _validate_batch(b: OfflineBatch) -> None:
    check_upload(
        b.terminal_id, b.batch_id, b.records, id_key="terminal_id", id_re=_TERMINAL_RE, batch_id_max=BATCH_ID_MAX,
        record_type=OfflineRecord, records_max=OFFLINE_BATCH_RECORDS_MAX, seq_key="terminal_seq",
        uploader="terminal", bad=_batch_bad,
    )  # fmt: skip


def batch_to_dict(b: OfflineBatch) -> dict[str, Any]:
    _validate_batch(b)
    return {
        "terminal_id": b.terminal_id,
        "batch_id": b.batch_id,
        "records": [record_to_dict(r) for r in b.records],
    }




def batch_from_dict(d: object) -> OfflineBatch:
    """Strict, all-or-nothing decode of an upload. TransitBatchInvalid for the envelope, or
    TransitRecordInvalid with ``field`` like ``records[17].tac`` for a record."""
    terminal_id, batch_id, records = decode_upload(d, "terminal_id", OFFLINE_BATCH_RECORDS_MAX, _batch_bad)
    return OfflineBatch(
        terminal_id=terminal_id,
        batch_id=batch_id,
        records=tuple(record_from_dict(r, f"records[{i}].") for i, r in enumerate(records)),
    )


# --------------------------------------------------------------------------------- back office


class RecordResult(StrEnum):
    """The back office's verdict per uploaded record (stable API strings). Evaluated in the order of
    PRECEDENCE: the first that applies wins. See transit.md for what each means for money."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    BAD_TAC = "bad_tac"
    CARD_UNKNOWN = "card_unknown"
    HOTLISTED = "hotlisted"
    SEQUENCE_GAP = "sequence_gap"
    BALANCE_MISMATCH = "balance_mismatch"
    MALFORMED = "malformed"

    @property
    def posted(self) -> bool:
        """The card's purse really moved: the shadow balance and sequence advance."""
        return self in _POSTED

    @property
    def cleared(self) -> bool:
        """The amount is paid to the validator's operator in the daily clearing."""
        return self in _CLEARED


_POSTED = frozenset(
    {RecordResult.ACCEPTED, RecordResult.HOTLISTED, RecordResult.SEQUENCE_GAP, RecordResult.BALANCE_MISMATCH}
)
_CLEARED = frozenset({RecordResult.ACCEPTED, RecordResult.SEQUENCE_GAP, RecordResult.BALANCE_MISMATCH})

RESULT_PRECEDENCE: tuple[RecordResult, ...] = (
    RecordResult.MALFORMED,
    RecordResult.CARD_UNKNOWN,
    RecordResult.BAD_TAC,
    RecordResult.DUPLICATE,
    RecordResult.CONFLICT,
    RecordResult.HOTLISTED,
    RecordResult.SEQUENCE_GAP,
    RecordResult.BALANCE_MISMATCH,
    RecordResult.ACCEPTED,
)


def blocked_at_version(entries: Iterable[HotlistEntry], card_sn: str, version: int) -> bool:
    """Was ``card_sn`` blocked in the deny-list as of ``version``? (The last entry for the card with
    entry.version <= version decides; none means not blocked.)"""
    blocked = False
    best = -1
    for e in entries:
        if e.card_sn == card_sn and best < e.version <= version:
            best = e.version
            blocked = e.action == HotlistAction.BLOCK
    return blocked


def judge_record(
    record: OfflineRecord,
    *,
    card_known: bool,
    tac_ok: bool,
    posted: OfflineRecord | None,
    blocked_at_validator_version: bool,
    last_purse_seq: int | None,
    shadow_balance_fen: int | None,
) -> RecordResult:
    """The verdict for a well-formed record given what the back office knows (pure; transit.md).

    ``posted``: the record already posted for (card, extended purse_seq), if any.
    ``blocked_at_validator_version``: :func:`blocked_at_version` (card, record.hotlist_version).
    ``last_purse_seq``: the highest purse_seq posted for the card (its issuance value when none).
    ``shadow_balance_fen``: the shadow balance after that record (None: unknown, not checked).
    """
    if not card_known:
        return RecordResult.CARD_UNKNOWN
    if not tac_ok:
        return RecordResult.BAD_TAC
    if posted is not None:
        return RecordResult.DUPLICATE if posted == record else RecordResult.CONFLICT
    if blocked_at_validator_version:
        return RecordResult.HOTLISTED
    if last_purse_seq is not None:
        delta = purse_seq_delta(last_purse_seq, record.purse_seq)
        if delta > 1:
            return RecordResult.SEQUENCE_GAP
        if delta <= 0:
            return RecordResult.ACCEPTED  # fills an earlier gap; balance checked by the chain, not here
    if shadow_balance_fen is not None and shadow_balance_fen != record.balance_before_fen:
        return RecordResult.BALANCE_MISMATCH
    return RecordResult.ACCEPTED
