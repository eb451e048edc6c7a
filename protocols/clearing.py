"""Daily clearing file per operator and business day: header, one detail line per approved fare and one
correction line per fare correction (version 2), trailer with an SM3 digest. Layout in clearing.md. Pure:
bytes in, bytes out.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from protocols.errors import CodecError
from protocols.sm import sm3
from protocols.strict import check_int, check_str

__all__ = [
    "CLEARING_FILE_TYPE",
    "CLEARING_FILE_VERSION",
    "CLEARING_FILE_VERSIONS",
    "CLEARING_RECORDS_MAX",
    "OPERATOR_ID_RE",
    "ClearingCorrection",
    "ClearingFileInvalid",
    "ClearingHeader",
    "ClearingLine",
    "ClearingSource",
    "CorrectionReason",
    "DetailLine",
    "make_header",
    "read_clearing_file",
    "write_clearing_file",
]

CLEARING_FILE_TYPE = "CARDSVC-CLEARING"
CLEARING_FILE_VERSION = 2  # the newest; a day without corrections is still written as version 1
CLEARING_FILE_VERSIONS = (1, 2)
CLEARING_RECORDS_MAX = 20_000_000
ID_MAX = 2**63 - 1
AMOUNT_FEN_MAX = 2**32 - 1
TIME_S_MAX = 2**32 - 1
TOTAL_FEN_MAX = 2**63 - 1
SEPARATOR = "|"

_HEADER_FIELDS = {1: 8, 2: 10}  # by version
_DETAIL_FIELDS = 9
_CORRECTION_FIELDS = 11
_TRAILER_FIELDS = 3
_UINT_RE = re.compile(r"0|[1-9][0-9]{0,18}")
OPERATOR_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,16}")  # also what a fare table may name an operator
_LINE_RE = re.compile(r"[A-Za-z0-9._-]{1,16}")
_STATION_RE = re.compile(r"[A-Za-z0-9._-]{0,16}")
_DATE_RE = re.compile(r"[0-9]{8}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


class ClearingFileInvalid(CodecError):
    default_code = "clearing_file_invalid"


class ClearingSource(StrEnum):
    """Where the money came from."""

    PURSE = "purse"  # an offline purse debit with a verified TAC
    RIDE_CODE = "ridecode"  # a post-paid ride code charge


class CorrectionReason(StrEnum):
    """Why the card office gave (part of) a fare back; each is a stable code of the API too."""

    LATE_ENTRY = "late_entry"  # the entry arrived after the journey was charged the maximum fare
    LATE_EXIT = "late_exit"  # the exit arrived after the journey was charged the maximum fare
    TERMINAL_FAULT = "terminal_fault"  # a validator or gate charged wrongly (a double tap, a wrong station)
    FARE_ERROR = "fare_error"  # the fare table or the engine priced the ride wrongly
    GOODWILL = "goodwill"  # a service failure (a closed station, a breakdown) compensated by the operator


@dataclass(frozen=True, slots=True)
class ClearingHeader:
    operator_id: str
    business_date: date
    record_count: int  # fare lines (D)
    total_fen: int  # their sum: what the purses paid the operator
    created_at: int  # unix s
    correction_count: int = 0  # correction lines (C); a file with any is version 2
    correction_fen: int = 0  # their sum: what the operator gives back to the purses

    @property
    def version(self) -> int:
        return 2 if self.correction_count else 1

    @property
    def net_fen(self) -> int:
        """What the operator is owed for the day (negative when its corrections exceed its fares)."""
        return self.total_fen - self.correction_fen


@dataclass(frozen=True, slots=True)
class ClearingLine:
    txn_id: int  # the back office's journal id, strictly ascending in the file
    card_id: int
    source: ClearingSource
    amount_fen: int
    txn_time: int  # unix s
    line_id: str
    station_id: str


@dataclass(frozen=True, slots=True)
class ClearingCorrection:
    """A fare given back: the purse is credited and the operator debited `amount_fen`."""

    txn_id: int  # the correction's journal id, in the same ascending order as the fare lines
    card_id: int
    source: ClearingSource  # the corrected fare's
    amount_fen: int  # 1 ... at most the corrected fare (all corrections of one fare together)
    txn_time: int  # unix s when the correction was made (back office clock)
    line_id: str  # the corrected fare's
    station_id: str
    corrects_txn_id: int  # the corrected fare's txn_id: an earlier line of this file or of an earlier one
    reason: CorrectionReason


DetailLine = ClearingLine | ClearingCorrection


def _bad(message: str, field: str | None = None) -> ClearingFileInvalid:
    return ClearingFileInvalid("clearing_file_invalid", message, field=field)


def _check_int(v: object, name: str, lo: int, hi: int) -> int:
    return check_int(v, name, lo, hi, _bad)


def _check_str(v: object, name: str, pattern: re.Pattern[str]) -> str:
    return check_str(v, name, pattern, _bad)


def _validate_header(h: ClearingHeader) -> None:
    _check_str(h.operator_id, "header.operator_id", OPERATOR_ID_RE)
    if type(h.business_date) is not date or h.business_date.year < 1000:
        raise _bad("business_date must be a date", "header.business_date")
    _check_int(h.record_count, "header.record_count", 0, CLEARING_RECORDS_MAX)
    _check_int(h.total_fen, "header.total_fen", 0, TOTAL_FEN_MAX)
    _check_int(h.created_at, "header.created_at", 0, TIME_S_MAX)
    _check_int(h.correction_count, "header.correction_count", 0, CLEARING_RECORDS_MAX - h.record_count)
    _check_int(h.correction_fen, "header.correction_fen", 0, TOTAL_FEN_MAX)
    if h.correction_count == 0 and h.correction_fen != 0:
        raise _bad("correction_fen without corrections", "header.correction_fen")


def _validate_line(i: int, ln: DetailLine, prev_txn_id: int) -> None:
    where = f"detail[{i}]."
    _check_int(ln.txn_id, where + "txn_id", 1, ID_MAX)
    if ln.txn_id <= prev_txn_id:
        raise _bad("txn_id must ascend strictly", where + "txn_id")
    _check_int(ln.card_id, where + "card_id", 1, ID_MAX)
    if not isinstance(ln.source, ClearingSource):
        raise _bad("source must be purse or ridecode", where + "source")
    correction = isinstance(ln, ClearingCorrection)
    _check_int(ln.amount_fen, where + "amount_fen", 1 if correction else 0, AMOUNT_FEN_MAX)
    _check_int(ln.txn_time, where + "txn_time", 0, TIME_S_MAX)
    _check_str(ln.line_id, where + "line_id", _LINE_RE)
    _check_str(ln.station_id, where + "station_id", _STATION_RE)
    if isinstance(ln, ClearingCorrection):
        _check_int(ln.corrects_txn_id, where + "corrects_txn_id", 1, ID_MAX)
        if ln.corrects_txn_id >= ln.txn_id:
            raise _bad("a correction comes after the fare it corrects", where + "corrects_txn_id")
        if not isinstance(ln.reason, CorrectionReason):
            raise _bad(
                "reason must be one of " + ", ".join(r.value for r in CorrectionReason), where + "reason"
            )


def make_header(
    operator_id: str, business_date: date, created_at: int, lines: Sequence[DetailLine]
) -> ClearingHeader:
    """A header whose counts and totals match ``lines``."""
    fares = [ln.amount_fen for ln in lines if not isinstance(ln, ClearingCorrection)]
    credits = [ln.amount_fen for ln in lines if isinstance(ln, ClearingCorrection)]
    return ClearingHeader(
        operator_id, business_date, len(fares), sum(fares), created_at, len(credits), sum(credits)
    )


def _header_line(h: ClearingHeader) -> str:
    fields = [
        "H",
        CLEARING_FILE_TYPE,
        str(h.version),
        h.operator_id,
        h.business_date.strftime("%Y%m%d"),
        str(h.record_count),
        str(h.total_fen),
        str(h.created_at),
    ]
    if h.version >= 2:
        fields += [str(h.correction_count), str(h.correction_fen)]
    return SEPARATOR.join(fields)


def _detail_line(seq: int, ln: DetailLine) -> str:
    fields = [
        "C" if isinstance(ln, ClearingCorrection) else "D",
        str(seq),
        str(ln.txn_id),
        str(ln.card_id),
        ln.source.value,
        str(ln.amount_fen),
        str(ln.txn_time),
        ln.line_id,
        ln.station_id,
    ]
    if isinstance(ln, ClearingCorrection):
        fields += [str(ln.corrects_txn_id), ln.reason.value]
    return SEPARATOR.join(fields)


def _check_sums(header: ClearingHeader, lines: Sequence[DetailLine]) -> None:
    """The header's counts and totals against the lines (the caller has validated each line)."""
    fares = [ln.amount_fen for ln in lines if not isinstance(ln, ClearingCorrection)]
    credits = [ln.amount_fen for ln in lines if isinstance(ln, ClearingCorrection)]
    if header.record_count != len(fares):
        raise _bad("record_count does not match the fare lines", "header.record_count")
    if header.total_fen != sum(fares):
        raise _bad("total_fen does not match the fare lines", "header.total_fen")
    if header.correction_count != len(credits):
        raise _bad("correction_count does not match the correction lines", "header.correction_count")
    if header.correction_fen != sum(credits):
        raise _bad("correction_fen does not match the correction lines", "header.correction_fen")


def write_clearing_file(header: ClearingHeader, lines: Sequence[DetailLine]) -> bytes:
    """The file bytes (ASCII, LF): version 1 without corrections, 2 with. ClearingFileInvalid if a field is
    out of range, txn_ids do not ascend, or the header's counts and totals do not match ``lines``."""
    _validate_header(header)
    prev = 0
    out = [_header_line(header)]
    for i, ln in enumerate(lines):
        if not isinstance(ln, ClearingLine | ClearingCorrection):
            raise _bad("ClearingLine or ClearingCorrection expected", f"detail[{i}]")
        _validate_line(i, ln, prev)
        prev = ln.txn_id
        out.append(_detail_line(i + 1, ln))
    _check_sums(header, lines)
    body = ("\n".join(out) + "\n").encode("ascii")
    trailer = SEPARATOR.join(["T", str(len(lines)), sm3(body).hex()]) + "\n"
    return body + trailer.encode("ascii")


def _uint(s: str, name: str, lo: int, hi: int) -> int:
    if not _UINT_RE.fullmatch(s):
        raise _bad(f"{name} must be a decimal integer without leading zeros", name)
    return _check_int(int(s), name, lo, hi)


def _parse_date(s: str) -> date:
    if not _DATE_RE.fullmatch(s):
        raise _bad("business_date is YYYYMMDD", "header.business_date")
    try:
        d = date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError as exc:
        raise _bad("business_date is not a calendar date", "header.business_date") from exc
    if d.year < 1000:
        raise _bad("business_date out of range", "header.business_date")
    return d


def read_clearing_file(data: bytes) -> tuple[ClearingHeader, list[DetailLine]]:
    """Parse and check a clearing file (version 1 or 2): structure, every field, seq numbers, txn_id order,
    counts, totals and the trailer digest. ClearingFileInvalid (``clearing_file_invalid``) on any mismatch."""
    if not isinstance(data, bytes | bytearray):
        raise _bad("bytes expected")
    data = bytes(data)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _bad("the file is ASCII") from exc
    if not text.endswith("\n") or "\r" in text:
        raise _bad("lines end with LF; the file ends with LF")
    rows = text[:-1].split("\n")
    if len(rows) < 2:
        raise _bad("header and trailer required")
    if len(rows) - 2 > CLEARING_RECORDS_MAX:
        raise _bad("too many records")

    trailer = rows[-1].split(SEPARATOR)
    if len(trailer) != _TRAILER_FIELDS or trailer[0] != "T":
        raise _bad("last line must be the trailer", "trailer")
    trailer_count = _uint(trailer[1], "trailer.record_count", 0, CLEARING_RECORDS_MAX)
    digest = trailer[2]
    if not _DIGEST_RE.fullmatch(digest):
        raise _bad("digest is 64 lowercase hex", "trailer.digest")
    body_len = len(data) - len(rows[-1]) - 1
    if not hmac.compare_digest(sm3(data[:body_len]).hex(), digest):
        raise _bad("digest mismatch", "trailer.digest")

    h = rows[0].split(SEPARATOR)
    if len(h) < 3 or h[0] != "H":
        raise _bad("first line must be the header", "header")
    if h[1] != CLEARING_FILE_TYPE:
        raise _bad("not a clearing file", "header.file_type")
    if h[2] not in ("1", "2"):
        raise _bad("unsupported version", "header.version")
    version = int(h[2])
    if len(h) != _HEADER_FIELDS[version]:
        raise _bad(f"a version {version} header has {_HEADER_FIELDS[version]} fields", "header")
    header = ClearingHeader(
        operator_id=_check_str(h[3], "header.operator_id", OPERATOR_ID_RE),
        business_date=_parse_date(h[4]),
        record_count=_uint(h[5], "header.record_count", 0, CLEARING_RECORDS_MAX),
        total_fen=_uint(h[6], "header.total_fen", 0, TOTAL_FEN_MAX),
        created_at=_uint(h[7], "header.created_at", 0, TIME_S_MAX),
        correction_count=_uint(h[8], "header.correction_count", 1, CLEARING_RECORDS_MAX)
        if version == 2
        else 0,
        correction_fen=_uint(h[9], "header.correction_fen", 0, TOTAL_FEN_MAX) if version == 2 else 0,
    )
    _validate_header(header)

    lines: list[DetailLine] = []
    prev = 0
    for i, row in enumerate(rows[1:-1]):
        f = row.split(SEPARATOR)
        where = f"detail[{i}]."
        correction = version == 2 and f[0] == "C"
        if len(f) != (_CORRECTION_FIELDS if correction else _DETAIL_FIELDS) or f[0] != (
            "C" if correction else "D"
        ):
            raise _bad(
                "detail line expected" if version == 1 else "detail or correction line expected",
                f"detail[{i}]",
            )
        if _uint(f[1], where + "seq", 1, CLEARING_RECORDS_MAX) != i + 1:
            raise _bad("seq must count 1, 2, 3, ...", where + "seq")
        try:
            source = ClearingSource(f[4])
        except ValueError as exc:
            raise _bad("source must be purse or ridecode", where + "source") from exc
        txn_id = _uint(f[2], where + "txn_id", 1, ID_MAX)
        card_id = _uint(f[3], where + "card_id", 1, ID_MAX)
        amount = _uint(f[5], where + "amount_fen", 0, AMOUNT_FEN_MAX)
        txn_time = _uint(f[6], where + "txn_time", 0, TIME_S_MAX)
        ln: DetailLine
        if correction:
            try:
                reason = CorrectionReason(f[10])
            except ValueError as exc:
                raise _bad("unknown correction reason", where + "reason") from exc
            corrects = _uint(f[9], where + "corrects_txn_id", 1, ID_MAX)
            ln = ClearingCorrection(txn_id, card_id, source, amount, txn_time, f[7], f[8], corrects, reason)
        else:
            ln = ClearingLine(txn_id, card_id, source, amount, txn_time, f[7], f[8])
        _validate_line(i, ln, prev)
        prev = ln.txn_id
        lines.append(ln)
    if trailer_count != len(lines):
        raise _bad("the trailer's record_count is not the number of lines", "trailer.record_count")
    _check_sums(header, lines)
    return header, lines
