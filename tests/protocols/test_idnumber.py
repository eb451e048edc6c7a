from __future__ import annotations

from datetime import date

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocols import idnumber
from protocols.errors import CodecError, IdNumberInvalid

TODAY = date(2026, 1, 1)
provinces = st.sampled_from(sorted(idnumber.PROVINCE_CODES))
areas = st.builds(lambda p, rest: p + rest, provinces, st.from_regex(r"[0-9]{4}", fullmatch=True))
births = st.dates(min_value=date(1900, 1, 1), max_value=TODAY)
seqs = st.integers(0, 999)


def test_known_number() -> None:
    assert idnumber.validate_id_number("11010519491231002x", TODAY) == "11010519491231002X"
    assert idnumber.check_character("11010519491231002") == "X"
    assert idnumber.gender_of("11010519491231002X") == "female"
    assert idnumber.birth_date_of("11010519491231002X") == date(1949, 12, 31)


@settings(max_examples=200)
@given(areas, births, seqs)
def test_make_always_validates(area: str, birth: date, seq: int) -> None:
    n = idnumber.make_id_number(area, birth, seq)
    assert idnumber.validate_id_number(n, TODAY) == n
    assert idnumber.birth_date_of(n) == birth
    assert idnumber.gender_of(n) == ("male" if seq % 2 else "female")


@settings(max_examples=150)
@given(areas, births, seqs, st.integers(0, 17), st.sampled_from("0123456789X"))
def test_single_change_breaks_it(area: str, birth: date, seq: int, pos: int, ch: str) -> None:
    n = idnumber.make_id_number(area, birth, seq)
    assume(n[pos] != ch)
    changed = n[:pos] + ch + n[pos + 1 :]
    with pytest.raises(IdNumberInvalid):
        idnumber.validate_id_number(changed, TODAY)


@settings(max_examples=100)
@given(areas, births, seqs, st.integers(6, 13), st.sampled_from("0123456789"))
def test_recomputed_check_only_fails_on_date(area: str, birth: date, seq: int, pos: int, ch: str) -> None:
    n = idnumber.make_id_number(area, birth, seq)
    first17 = n[:pos] + ch + n[pos + 1 : 17]
    candidate = first17 + idnumber.check_character(first17)
    try:
        idnumber.validate_id_number(candidate, TODAY)
    except IdNumberInvalid as exc:
        assert exc.code == "id_number_birth_date"


@pytest.mark.parametrize(
    ("s", "code"),
    [
        ("", "id_number_format"),
        ("1101051949123100", "id_number_format"),
        ("1101051949123100２X", "id_number_format"),
        ("11010519491231002Y", "id_number_format"),
        ("A1010519491231002X", "id_number_format"),
        ("110105194912310021" + "1", "id_number_format"),
        ("11010519491231002" + "0", "id_number_check"),
    ],
)
def test_codes(s: str, code: str) -> None:
    with pytest.raises(IdNumberInvalid) as ei:
        idnumber.validate_id_number(s, TODAY)
    assert ei.value.code == code
    assert ei.value.field == "id_number"


def _with_check(first17: str) -> str:
    return first17 + idnumber.check_character(first17)


@pytest.mark.parametrize(
    ("first17", "code"),
    [
        ("10010519491231002", "id_number_area"),
        ("99010519491231002", "id_number_area"),
        ("11010518991231002", "id_number_birth_date"),
        ("11010519490229002", "id_number_birth_date"),
        ("11010519491301002", "id_number_birth_date"),
        ("11010520260102002", "id_number_birth_date"),
    ],
)
def test_area_and_dates(first17: str, code: str) -> None:
    with pytest.raises(IdNumberInvalid) as ei:
        idnumber.validate_id_number(_with_check(first17), TODAY)
    assert ei.value.code == code


def test_boundaries() -> None:
    assert idnumber.validate_id_number(_with_check("11010519000101002"), TODAY)
    assert idnumber.validate_id_number(_with_check("11010520260101002"), TODAY)
    assert idnumber.validate_id_number(_with_check("11010520000229002"), TODAY)
    assert idnumber.validate_id_number(_with_check("11010520000229002"))  # defaults to date.today()


@settings(max_examples=300)
@given(st.text(max_size=30))
def test_validate_only_codec_error(s: str) -> None:
    try:
        idnumber.validate_id_number(s, TODAY)
    except CodecError:
        pass
    for fn in (idnumber.validate_name, idnumber.validate_pan):
        try:
            fn(s)
        except CodecError:
            pass
    for fn2 in (idnumber.mask_id_number, idnumber.mask_pan, idnumber.mask_name):
        assert isinstance(fn2(s), str)
    assert isinstance(idnumber.luhn_valid(s), bool)


def test_masks_examples() -> None:
    assert idnumber.mask_id_number("11010519491231002X") == "110105********002X"
    assert idnumber.mask_pan("6222021234567890128") == "622202*********0128"
    assert idnumber.mask_name("张三") == "张*"
    assert idnumber.mask_name("张") == "张*"
    assert idnumber.mask_name("欧阳娜娜") == "欧***"
    assert idnumber.mask_name("") == "*"
    assert idnumber.mask_id_number("123") == "***"


@settings(max_examples=200)
@given(st.text(max_size=40))
def test_masks_reveal_little(s: str) -> None:
    for fn in (idnumber.mask_id_number, idnumber.mask_pan):
        m = fn(s)
        assert len(m) == len(s)
        revealed = [i for i, c in enumerate(m) if c != "*" or s[i] == "*"]
        assert len([i for i in revealed if m[i] != "*"]) <= 10
        assert sum(1 for i, c in enumerate(m) if c != "*") <= max(0, len(s) - 4)
        for i, c in enumerate(m):
            assert c == "*" or (c == s[i] and (i < 6 or i >= len(s) - 4))
    n = idnumber.mask_name(s)
    assert n.count("*") >= 1 and len(n) == max(2, len(s)) if s else n == "*"
    if s:
        assert n[0] == s[0] and set(n[1:]) == {"*"}


def test_luhn_and_pan() -> None:
    assert idnumber.luhn_valid("4111111111111111")
    assert not idnumber.luhn_valid("4111111111111112")
    assert not idnumber.luhn_valid("")
    assert not idnumber.luhn_valid("41111111111111１1")
    assert idnumber.validate_pan("6222021234567890128") == "6222021234567890128"
    for bad in ["6222021234567890127", "411111111111111", "41111111111111111111111", "4111-1111-1111-1111"]:
        with pytest.raises(CodecError) as ei:
            idnumber.validate_pan(bad)
        assert ei.value.code == "pan_invalid"


@settings(max_examples=100)
@given(st.from_regex(r"[0-9]{15,18}", fullmatch=True))
def test_luhn_single_digit_error_detected(body: str) -> None:
    check = next(d for d in "0123456789" if idnumber.luhn_valid(body + d))
    pan = body + check
    assert idnumber.validate_pan(pan) == pan
    for i in range(len(pan)):
        for d in "0123456789":
            if d != pan[i]:
                assert not idnumber.luhn_valid(pan[:i] + d + pan[i + 1 :])


def test_names() -> None:
    assert idnumber.validate_name("张三") == "张三"
    assert idnumber.validate_name("阿依古丽·买买提") == "阿依古丽·买买提"
    assert idnumber.validate_name("e\u0301") == "\u00e9"  # NFC
    assert idnumber.validate_name("x" * 64)
    for bad in ["", " 张三", "张三 ", "张\n三", "张\x00三", "x" * 65, "\ud800", "张\u2028三", "\u3000张"]:
        with pytest.raises(CodecError) as ei:
            idnumber.validate_name(bad)
        assert ei.value.code == "name_invalid"
