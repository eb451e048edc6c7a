"""Daily clearing file: vector, round trip, and refusal of any changed, dropped or added byte."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import clearing
from protocols.clearing import (
    ClearingCorrection,
    ClearingFileInvalid,
    ClearingHeader,
    ClearingLine,
    ClearingSource,
    CorrectionReason,
)
from protocols.sm import sm3

VECTOR = json.loads(
    (Path(clearing.__file__).parent / "vectors" / "transit.json").read_text(encoding="utf-8")
)["clearing_file"]
T0 = 1_767_225_600


def _lines(n: int = 3) -> list[ClearingLine]:
    return [
        ClearingLine(
            100 + 2 * i, 7 + i, ClearingSource(["purse", "ridecode"][i % 2]), 150 + i, T0 + i, "M3", "S1"
        )
        for i in range(n)
    ]


def _file(n: int = 3) -> bytes:
    lines = _lines(n)
    return clearing.write_clearing_file(
        clearing.make_header("CQMETRO", date(2026, 1, 1), T0 + 86_400, lines), lines
    )


def test_vector() -> None:
    data = VECTOR["text"].encode("ascii")
    header, lines = clearing.read_clearing_file(data)
    h = VECTOR["header"]
    assert header == ClearingHeader(
        h["operator_id"], date(2026, 1, 1), h["record_count"], h["total_fen"], h["created_at"]
    )
    assert [
        {
            "txn_id": ln.txn_id,
            "card_id": ln.card_id,
            "source": ln.source.value,
            "amount_fen": ln.amount_fen,
            "txn_time": ln.txn_time,
            "line_id": ln.line_id,
            "station_id": ln.station_id,
        }
        for ln in lines
    ] == VECTOR["lines"]
    assert clearing.write_clearing_file(header, lines) == data
    rows = VECTOR["text"].split("\n")
    assert rows[0].startswith("H|CARDSVC-CLEARING|1|") and rows[-1] == ""
    body = "\n".join(rows[:-2]) + "\n"
    assert rows[-2] == f"T|{len(lines)}|{sm3(body.encode()).hex()}"


# The fields fare and correction lines share (txn_id is set by the tests, in ascending order).
_LINE_FIELDS: dict[str, Any] = {
    "txn_id": st.just(1),
    "card_id": st.integers(1, 2**63 - 1),
    "source": st.sampled_from(ClearingSource),
    "txn_time": st.integers(0, 2**32 - 1),
    "line_id": st.from_regex(r"[A-Za-z0-9._-]{1,16}", fullmatch=True),
    "station_id": st.from_regex(r"[A-Za-z0-9._-]{0,16}", fullmatch=True),
}
_line = st.builds(ClearingLine, amount_fen=st.integers(0, 2**32 - 1), **_LINE_FIELDS)


@settings(max_examples=100, deadline=None)
@given(
    raw=st.lists(_line, max_size=30),
    gaps=st.lists(st.integers(1, 2**40), min_size=30, max_size=30),
    operator=st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True),
    day=st.dates(min_value=date(2000, 1, 1), max_value=date(2099, 12, 31)),
    created=st.integers(0, 2**32 - 1),
)
def test_round_trip(raw: list[ClearingLine], gaps: list[int], operator: str, day: date, created: int) -> None:
    txn = 0
    lines = []
    for ln, gap in zip(raw, gaps, strict=False):
        txn += gap
        lines.append(
            ClearingLine(txn, ln.card_id, ln.source, ln.amount_fen, ln.txn_time, ln.line_id, ln.station_id)
        )
    header = clearing.make_header(operator, day, created, lines)
    data = clearing.write_clearing_file(header, lines)
    assert clearing.read_clearing_file(data) == (header, lines)
    assert data.isascii() and data.endswith(b"\n") and b"\r" not in data


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_changed_byte_is_refused(data: st.DataObject) -> None:
    good = _file()
    pos = data.draw(st.integers(0, len(good) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != good[pos]))
    bad = good[:pos] + bytes([new]) + good[pos + 1 :]
    with pytest.raises(ClearingFileInvalid):
        clearing.read_clearing_file(bad)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_dropped_or_inserted_byte_is_refused(data: st.DataObject) -> None:
    good = _file()
    pos = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(ClearingFileInvalid):
        clearing.read_clearing_file(good[:pos] + good[pos + 1 :])
    ins = bytes([data.draw(st.integers(0, 255))])
    with pytest.raises(ClearingFileInvalid):
        clearing.read_clearing_file(good[:pos] + ins + good[pos:])


def _refit(rows: list[str]) -> bytes:
    """Recompute a valid trailer for edited body rows (so only the rule under test can fail)."""
    body = ("\n".join(rows) + "\n").encode()
    return body + f"T|{len(rows) - 1}|{sm3(body).hex()}\n".encode()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda r: [r[0], *r[1:-1]], "header.record_count"),  # a detail line dropped
        (lambda r: [r[0].replace("|453|", "|454|"), *r[1:]], "header.total_fen"),
        (
            lambda r: [r[0], r[2].replace("D|2|", "D|1|"), r[1].replace("D|1|", "D|2|"), r[3]],
            "detail[1].txn_id",
        ),
        (lambda r: [r[0], r[1].replace("D|1|", "D|01|"), *r[2:]], "detail[0].seq"),
        (lambda r: [r[0], r[1].replace("|purse|", "|cash|"), *r[2:]], "detail[0].source"),
        (lambda r: [r[0].replace("|20260101|", "|20260230|"), *r[1:]], "header.business_date"),
        (lambda r: [r[0].replace("|1|", "|3|", 1), *r[1:]], "header.version"),
        (lambda r: [r[0].replace("|1|", "|2|", 1), *r[1:]], "header"),  # a version 2 header has 10 fields
        (lambda r: [r[0].replace("|1|", "|2|", 1) + "|0|0", *r[1:]], "header.correction_count"),
        (lambda r: [r[0], r[1].replace("D|", "C|", 1) + "|1|goodwill", *r[2:]], "detail[0]"),  # no C in v1
        (lambda r: [r[0], r[1].replace("D|", "C|", 1), *r[2:]], "detail[0]"),  # not even shaped as a fare
        (lambda r: [r[0], r[1] + "|x", *r[2:]], "detail[0]"),
    ],
)
def test_consistent_but_wrong_files_are_refused(edit: Any, field: str) -> None:
    rows = _file().decode().split("\n")[:-2]
    assert rows[0] == f"H|CARDSVC-CLEARING|1|CQMETRO|20260101|3|{150 + 151 + 152}|{T0 + 86_400}"
    with pytest.raises(ClearingFileInvalid) as ei:
        clearing.read_clearing_file(_refit(edit(rows)))
    assert ei.value.field == field


def test_empty_day_and_trailer_rules() -> None:
    header = ClearingHeader("BUS1", date(2026, 1, 2), 0, 0, T0)
    data = clearing.write_clearing_file(header, [])
    assert clearing.read_clearing_file(data) == (header, [])
    for bad in (b"", b"\n", data[:-1], data + b"\n", data.replace(b"\n", b"\r\n"), "é".encode() + data, b"x"):
        with pytest.raises(ClearingFileInvalid):
            clearing.read_clearing_file(bad)
    with pytest.raises(ClearingFileInvalid):
        clearing.read_clearing_file("not bytes")  # type: ignore[arg-type]


def test_writer_refuses_inconsistent_input() -> None:
    lines = _lines()
    good = clearing.make_header("CQMETRO", date(2026, 1, 1), T0, lines)
    cases: list[tuple[ClearingHeader, list[ClearingLine], str]] = [
        (ClearingHeader("CQMETRO", date(2026, 1, 1), 2, good.total_fen, T0), lines, "header.record_count"),
        (ClearingHeader("CQMETRO", date(2026, 1, 1), 3, 1, T0), lines, "header.total_fen"),
        (good, [lines[1], lines[0], lines[2]], "detail[1].txn_id"),
        (ClearingHeader("CQ|METRO", date(2026, 1, 1), 3, good.total_fen, T0), lines, "header.operator_id"),
        (
            good,
            [*lines[:2], ClearingLine(999, 1, ClearingSource.PURSE, 152, T0, "M|3", "")],
            "detail[2].line_id",
        ),
    ]
    for header, ls, field in cases:
        with pytest.raises(ClearingFileInvalid) as ei:
            clearing.write_clearing_file(header, ls)
        assert ei.value.field == field


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=300).map(lambda s: ("H|CARDSVC-CLEARING|1|" + s).encode()))
def test_reader_raises_only_codec_error(data: bytes) -> None:
    with pytest.raises(ClearingFileInvalid):
        clearing.read_clearing_file(data)


def test_spec_names_every_field() -> None:
    spec = (Path(clearing.__file__).parent / "clearing.md").read_text(encoding="utf-8")
    words = (
        "record_count",
        "total_fen",
        "created_at",
        "txn_id",
        "card_id",
        "digest",
        "YYYYMMDD",
        "correction_count",
    )
    for word in (*words, "correction_fen", "corrects_txn_id", *(r.value for r in CorrectionReason)):
        assert word in spec


# ------------------------------------------------------------------ version 2: corrections

VECTOR_V2 = json.loads(
    (Path(clearing.__file__).parent / "vectors" / "transit.json").read_text(encoding="utf-8")
)["clearing_file_v2"]


def test_vector_v2() -> None:
    data = VECTOR_V2["text"].encode("ascii")
    header, lines = clearing.read_clearing_file(data)
    h = VECTOR_V2["header"]
    assert header == ClearingHeader(
        h["operator_id"], date(2026, 1, 2), h["record_count"], h["total_fen"], h["created_at"],
        h["correction_count"], h["correction_fen"],
    )  # fmt: skip
    assert header.version == 2 and header.net_fen == h["net_fen"] == 300 - 520
    got = []
    for ln in lines:
        row = {"type": "C" if isinstance(ln, ClearingCorrection) else "D", "txn_id": ln.txn_id,
               "card_id": ln.card_id, "source": ln.source.value, "amount_fen": ln.amount_fen,
               "txn_time": ln.txn_time, "line_id": ln.line_id, "station_id": ln.station_id}  # fmt: skip
        if isinstance(ln, ClearingCorrection):
            row |= {"corrects_txn_id": ln.corrects_txn_id, "reason": ln.reason.value}
        got.append(row)
    assert got == VECTOR_V2["lines"]
    assert clearing.write_clearing_file(header, lines) == data
    rows = VECTOR_V2["text"].split("\n")
    assert rows[0].startswith("H|CARDSVC-CLEARING|2|") and rows[2].startswith("C|2|1011|")
    assert rows[-2].startswith(f"T|{len(lines)}|")  # the trailer counts fare and correction lines


_correction = st.builds(
    ClearingCorrection,
    amount_fen=st.integers(1, 2**32 - 1),
    corrects_txn_id=st.just(1),
    reason=st.sampled_from(CorrectionReason),
    **_LINE_FIELDS,
)


@settings(max_examples=150, deadline=None)
@given(
    raw=st.lists(_line | _correction, max_size=30),
    gaps=st.lists(st.integers(1, 2**40), min_size=30, max_size=30),
    back=st.lists(st.integers(1, 2**40), min_size=30, max_size=30),
    created=st.integers(0, 2**32 - 1),
)
def test_round_trip_with_corrections(raw: list[Any], gaps: list[int], back: list[int], created: int) -> None:
    """Any mix of fare and correction lines round-trips; the version is 2 exactly when there is a
    correction, and the header's net is fares minus corrections."""
    txn = 0
    lines: list[clearing.DetailLine] = []
    for ln, gap, b in zip(raw, gaps, back, strict=False):
        txn += gap
        if isinstance(ln, ClearingCorrection):
            lines.append(
                dataclasses.replace(ln, txn_id=txn, corrects_txn_id=max(1, txn - b))
                if txn > 1
                else ClearingLine(txn, ln.card_id, ln.source, ln.amount_fen, ln.txn_time, ln.line_id, "")
            )
        else:
            lines.append(dataclasses.replace(ln, txn_id=txn))
    header = clearing.make_header("CQ-BUS", date(2026, 3, 1), created, lines)
    data = clearing.write_clearing_file(header, lines)
    assert clearing.read_clearing_file(data) == (header, lines)
    corrections = [ln for ln in lines if isinstance(ln, ClearingCorrection)]
    assert header.version == (2 if corrections else 1)
    assert data.startswith(f"H|CARDSVC-CLEARING|{header.version}|".encode())
    assert header.net_fen == sum(ln.amount_fen for ln in lines if ln not in corrections) - sum(
        c.amount_fen for c in corrections
    )


def _v2_rows() -> list[str]:
    return VECTOR_V2["text"].split("\n")[:-2]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda r: [r[0].replace("|2|520", "|3|520"), *r[1:]], "header.correction_count"),
        (lambda r: [r[0].replace("|2|520", "|2|521"), *r[1:]], "header.correction_fen"),
        (
            lambda r: [r[0].replace("|2|520", "|0|0"), r[1]],
            "header.correction_count",
        ),  # v2 needs a correction
        (lambda r: [r[0], r[1], r[2].replace("|1002|", "|1011|"), r[3]], "detail[1].corrects_txn_id"),
        (lambda r: [r[0], r[1], r[2].replace("|1002|", "|0|"), r[3]], "detail[1].corrects_txn_id"),
        (lambda r: [r[0], r[1], r[2].replace("late_entry", "refund"), r[3]], "detail[1].reason"),
        (
            lambda r: [r[0].replace("|2|520", "|2|200"), r[1], r[2].replace("|320|", "|0|"), r[3]],
            "detail[1].amount_fen",
        ),
        (lambda r: [r[0], r[1], r[2].removesuffix("|late_entry"), r[3]], "detail[1]"),
        (lambda r: [r[0], r[1], r[2], r[3].replace("C|3|", "X|3|")], "detail[2]"),
    ],
)
def test_consistent_but_wrong_v2_files_are_refused(edit: Any, field: str) -> None:
    with pytest.raises(ClearingFileInvalid) as ei:
        clearing.read_clearing_file(_refit(edit(_v2_rows())))
    assert ei.value.field == field


def test_v2_trailer_counts_every_line() -> None:
    rows = _v2_rows()
    body = ("\n".join(rows) + "\n").encode()
    with pytest.raises(ClearingFileInvalid) as ei:  # the fare lines only: wrong
        clearing.read_clearing_file(body + f"T|1|{sm3(body).hex()}\n".encode())
    assert ei.value.field == "trailer.record_count"


def test_writer_refuses_inconsistent_corrections() -> None:
    header, lines = clearing.read_clearing_file(VECTOR_V2["text"].encode())
    c = lines[1]
    assert isinstance(c, ClearingCorrection)
    cases: list[tuple[ClearingHeader, list[Any], str]] = [
        (dataclasses.replace(header, correction_count=1), lines, "header.correction_count"),
        (dataclasses.replace(header, correction_fen=1), lines, "header.correction_fen"),
        (
            dataclasses.replace(header, correction_count=0),
            lines[:1],
            "header.correction_fen",
        ),
        (
            header,
            [lines[0], dataclasses.replace(c, corrects_txn_id=c.txn_id), lines[2]],
            "detail[1].corrects_txn_id",
        ),
        (header, [lines[0], dataclasses.replace(c, reason="late_entry"), lines[2]], "detail[1].reason"),
        (header, [lines[0], dataclasses.replace(c, amount_fen=0), lines[2]], "detail[1].amount_fen"),
    ]
    for h, ls, field in cases:
        with pytest.raises(ClearingFileInvalid) as ei:
            clearing.write_clearing_file(h, ls)
        assert ei.value.field == field
