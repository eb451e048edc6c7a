"""Daily clearing file per operator and business day: header, one detail line per approved fare,
trailer with an SM3 digest. Layout in clearing.md. Pure: bytes in, bytes out.
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
    "CLEARING_RECORDS_MAX",
    "OPERATOR_ID_RE",
    "ClearingFileInvalid",
    "ClearingHeader",
    "ClearingLine",
    "ClearingSource",
    "make_header",
    "read_clearing_file",
    "write_clearing_file",
]

CLEARING_FILE_TYPE = "CARDSVC-CLEARING"
CLEARING_FILE_VERSION = 1
CLEARING_RECORDS_MAX = 20_000_000
ID_MAX = 2**63 - 1
AMOUNT_FEN_MAX = 2**32 - 1
TIME_S_MAX = 2**32 - 1
TOTAL_FEN_MAX = 2**63 - 1
SEPARATOR = "|"

_HEADER_FIELDS = 8
_DETAIL_FIELDS = 9
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


@dataclass(frozen=True, slots=True)
class ClearingHeader:
    operator_id: str
    business_date: date
    record_count: int
    total_fen: int
    created_at: int  # unix s


@dataclass(frozen=True, slots=True)
class ClearingLine:
    txn_id: int  # the back office's journal id, strictly ascending in the file
    card_id: int
    source: ClearingSource
    amount_fen: int
    txn_time: int  # unix s
    line_id: str
    station_id: str


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


def _validate_line(i: int, ln: ClearingLine, prev_txn_id: int) -> None:
    where = f"detail[{i}]."
    _check_int(ln.txn_id, where + "txn_id", 1, ID_MAX)
    if ln.txn_id <= prev_txn_id:
        raise _bad("txn_id must ascend strictly", where + "txn_id")
    _check_int(ln.card_id, where + "card_id", 1, ID_MAX)
    if not isinstance(ln.source, ClearingSource):
        raise _bad("source must be purse or ridecode", where + "source")
    _check_int(ln.amount_fen, where + "amount_fen", 0, AMOUNT_FEN_MAX)
    _check_int(ln.txn_time, where + "txn_time", 0, TIME_S_MAX)
    _check_str(ln.line_id, where + "line_id", _LINE_RE)
    _check_str(ln.station_id, where + "station_id", _STATION_RE)


def make_header(
    operator_id: str, business_date: date, created_at: int, lines: Sequence[ClearingLine]
) -> ClearingHeader:
    """A header whose count and total match ``lines``."""
    return ClearingHeader(
        operator_id, business_date, len(lines), sum(ln.amount_fen for ln in lines), created_at
    )


def _header_line(h: ClearingHeader) -> str:
    return SEPARATOR.join(
        [
            "H",
            CLEARING_FILE_TYPE,
            str(CLEARING_FILE_VERSION),
            h.operator_id,
            h.business_date.strftime("%Y%m%d"),
            str(h.record_count),
            str(h.total_fen),
            str(h.created_at),
        ]
    )


def _detail_line(seq: int, ln: ClearingLine) -> str:
    return SEPARATOR.join(
        [
            "D",
            str(seq),
            str(ln.txn_id),
            str(ln.card_id),
            ln.source.value,
            str(ln.amount_fen),
            str(ln.txn_time),
            ln.line_id,
            ln.station_id,
        ]
    )


def write_clearing_file(header: ClearingHeader, lines: Sequence[ClearingLine]) -> bytes:
    """The file bytes (ASCII, LF). ClearingFileInvalid if a field is out of range, txn_ids do not ascend,
    or the header's record_count / total_fen do not match ``lines``."""
    _validate_header(header)
    if header.record_count != len(lines):
        raise _bad("record_count does not match the lines", "header.record_count")
    prev = 0
    total = 0
    out = [_header_line(header)]
    for i, ln in enumerate(lines):
        if not isinstance(ln, ClearingLine):
            raise _bad("ClearingLine expected", f"detail[{i}]")
        _validate_line(i, ln, prev)
        prev = ln.txn_id
        total += ln.amount_fen
        out.append(_detail_line(i + 1, ln))
    if total != header.total_fen:
        raise _bad("total_fen does not match the lines", "header.total_fen")
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


def read_clearing_file(data: bytes) -> tuple[ClearingHeader, list[ClearingLine]]:
    """Parse and check a clearing file: structure, every field, seq numbers, txn_id order, counts,
    total and the trailer digest. ClearingFileInvalid (``clearing_file_invalid``) on any mismatch."""
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
    if len(h) != _HEADER_FIELDS or h[0] != "H":
        raise _bad("first line must be the header", "header")
    if h[1] != CLEARING_FILE_TYPE:
        raise _bad("not a clearing file", "header.file_type")
    if h[2] != str(CLEARING_FILE_VERSION):
        raise _bad("unsupported version", "header.version")
    header = ClearingHeader(
        operator_id=_check_str(h[3], "header.operator_id", OPERATOR_ID_RE),
        business_date=_parse_date(h[4]),
        record_count=_uint(h[5], "header.record_count", 0, CLEARING_RECORDS_MAX),
        total_fen=_uint(h[6], "header.total_fen", 0, TOTAL_FEN_MAX),
        created_at=_uint(h[7], "header.created_at", 0, TIME_S_MAX),
    )

    lines: list[ClearingLine] = []
    prev = 0
    total = 0
    for i, row in enumerate(rows[1:-1]):
        f = row.split(SEPARATOR)
        where = f"detail[{i}]."
        if len(f) != _DETAIL_FIELDS or f[0] != "D":
            raise _bad("detail line expected", f"detail[{i}]")
        if _uint(f[1], where + "seq", 1, CLEARING_RECORDS_MAX) != i + 1:
            raise _bad("seq must count 1, 2, 3, ...", where + "seq")
        try:
            source = ClearingSource(f[4])
        except ValueError as exc:
            raise _bad("source must be purse or ridecode", where + "source") from exc
        ln = ClearingLine(
            txn_id=_uint(f[2], where + "txn_id", 1, ID_MAX),
            card_id=_uint(f[3], where + "card_id", 1, ID_MAX),
            source=source,
            amount_fen=_uint(f[5], where + "amount_fen", 0, AMOUNT_FEN_MAX),
            txn_time=_uint(f[6], where + "txn_time", 0, TIME_S_MAX),
            line_id=f[7],
            station_id=f[8],
        )
        _validate_line(i, ln, prev)
        prev = ln.txn_id
        total += ln.amount_fen
        lines.append(ln)
    if header.record_count != len(lines) or trailer_count != len(lines):
        raise _bad("record count mismatch", "header.record_count")
    if header.total_fen != total:
        raise _bad("total_fen mismatch", "header.total_fen")
    return header, lines
