"""社会保障号码 (the 18-character citizen ID number), names, bank card PANs; validation and masking.

See idnumber.md. Pure functions; validators raise :class:`protocols.errors.CodecError` subclasses only.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import date

from protocols.errors import CodecError, IdNumberInvalid

__all__ = [
    "ID_BIRTH_DATE_MIN",
    "ID_NUMBER_LEN_CHARS",
    "NAME_LEN_CHARS_MAX",
    "PAN_LEN_CHARS_MAX",
    "PAN_LEN_CHARS_MIN",
    "PROVINCE_CODES",
    "age_on",
    "birth_date_of",
    "check_character",
    "gender_of",
    "luhn_valid",
    "make_id_number",
    "mask_id_number",
    "mask_name",
    "mask_pan",
    "use_calendar",
    "validate_id_number",
    "validate_name",
    "validate_pan",
]

ID_NUMBER_LEN_CHARS = 18
ID_BIRTH_DATE_MIN = date(1900, 1, 1)
NAME_LEN_CHARS_MAX = 64
PAN_LEN_CHARS_MIN = 16
PAN_LEN_CHARS_MAX = 19

PROVINCE_CODES: frozenset[str] = frozenset(
    [str(c) for c in range(11, 16)]
    + [str(c) for c in range(21, 24)]
    + [str(c) for c in range(31, 38)]
    + [str(c) for c in range(41, 47)]
    + [str(c) for c in range(50, 55)]
    + [str(c) for c in range(61, 66)]
    + ["71", "81", "82", "91"]
)

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK_CHARS = "10X98765432"
_ID_RE = re.compile(r"[0-9]{17}[0-9X]")
_DIGITS17_RE = re.compile(r"[0-9]{17}")
_DIGITS_RE = re.compile(r"[0-9]+")
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def check_character(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits ('0'-'9' or 'X')."""
    if not isinstance(first17, str) or not _DIGITS17_RE.fullmatch(first17):
        raise IdNumberInvalid("id_number_format", "17 ASCII digits expected", field="id_number")
    total = sum(int(c) * w for c, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK_CHARS[total % 11]


def _birth(s: str) -> date | None:
    try:
        return date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return None


def _host_today() -> date:
    return date.today()


_today: Callable[[], date] = _host_today


def use_calendar(today: Callable[[], date]) -> None:
    """The calendar whose date a birth date may not be after when `validate_id_number` is given no `today`:
    the host's by default. A service whose dates are a city's sets the city's, which a host in another time
    zone would not have (a child born today there refused, or one born tomorrow accepted)."""
    global _today
    _today = today


def validate_id_number(s: str, today: date | None = None) -> str:
    """Normalised (uppercase X) ID number, or IdNumberInvalid with code
    id_number_format / id_number_area / id_number_birth_date / id_number_check."""
    if not isinstance(s, str) or len(s) != ID_NUMBER_LEN_CHARS:
        raise IdNumberInvalid("id_number_format", "18 characters expected", field="id_number")
    s = s[:17] + ("X" if s[17] == "x" else s[17])
    if not _ID_RE.fullmatch(s):
        raise IdNumberInvalid("id_number_format", "17 digits and a digit or X expected", field="id_number")
    if s[:2] not in PROVINCE_CODES:
        raise IdNumberInvalid("id_number_area", "unknown province code", field="id_number")
    born = _birth(s)
    limit = today if today is not None else _today()
    if born is None or born < ID_BIRTH_DATE_MIN or born > limit:
        raise IdNumberInvalid("id_number_birth_date", "invalid birth date", field="id_number")
    if check_character(s[:17]) != s[17]:
        raise IdNumberInvalid("id_number_check", "check character mismatch", field="id_number")
    return s


def make_id_number(area6: str, birth: date, seq3: int) -> str:
    """Build a valid ID number (demo data, tests). ``seq3`` 0..999; odd = male."""
    if not isinstance(area6, str) or not re.fullmatch(r"[0-9]{6}", area6):
        raise IdNumberInvalid("id_number_area", "6 digits expected", field="area")
    if not 0 <= seq3 <= 999:
        raise IdNumberInvalid("id_number_format", "sequence is 0..999", field="seq")
    first17 = f"{area6}{birth.year:04d}{birth.month:02d}{birth.day:02d}{seq3:03d}"
    return first17 + check_character(first17)


def gender_of(id_number: str) -> str:
    """'male' (odd sequence) or 'female' (even) from a validated-format ID number."""
    s = _format_only(id_number)
    return "male" if int(s[16]) % 2 == 1 else "female"


def age_on(born: date, day: date) -> int:
    """Completed years of age on `day` (a 29 February birthday falls on 1 March in other years)."""
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def birth_date_of(id_number: str) -> date:
    s = _format_only(id_number)
    born = _birth(s)
    if born is None:
        raise IdNumberInvalid("id_number_birth_date", "invalid birth date", field="id_number")
    return born


def _format_only(s: str) -> str:
    if not isinstance(s, str) or len(s) != ID_NUMBER_LEN_CHARS:
        raise IdNumberInvalid("id_number_format", "18 characters expected", field="id_number")
    s = s.upper()
    if not _ID_RE.fullmatch(s):
        raise IdNumberInvalid("id_number_format", "17 digits and a digit or X expected", field="id_number")
    return s


def _mask_middle(s: str, head: int, tail: int) -> str:
    # Reveal head+tail only if at least 4 characters stay hidden; otherwise hide everything.
    n = len(s)
    if n < head + tail + 4:
        return "*" * n
    return s[:head] + "*" * (n - head - tail) + s[n - tail :]


def mask_id_number(s: str) -> str:
    """First 6 + '*' x 8 + last 4 for an 18-char number (never more than 10 characters revealed)."""
    return _mask_middle(str(s), 6, 4)


def mask_pan(pan: str) -> str:
    """First 6 + '*'... + last 4 (bank card, JR/T 0171)."""
    return _mask_middle(str(pan), 6, 4)


def mask_name(name: str) -> str:
    """First character + one '*' per remaining character (at least one '*'): 张三丰 -> 张**, 张 -> 张*."""
    name = str(name)
    if not name:
        return "*"
    return name[0] + "*" * max(1, len(name) - 1)


def luhn_valid(pan: str) -> bool:
    if not isinstance(pan, str) or not pan.isascii() or not _DIGITS_RE.fullmatch(pan):
        return False
    total = 0
    for i, c in enumerate(reversed(pan)):
        d = int(c)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def validate_pan(pan: str) -> str:
    """16-19 ASCII digits with a valid Luhn check digit (CodecError ``pan_invalid``)."""
    if (
        not isinstance(pan, str)
        or not PAN_LEN_CHARS_MIN <= len(pan) <= PAN_LEN_CHARS_MAX
        or not luhn_valid(pan)
    ):
        raise CodecError("pan_invalid", "bank card number invalid", field="pan")
    return pan


def validate_name(name: str) -> str:
    """NFC-normalised name: 1-64 characters, no control characters, surrogates or line separators,
    no leading/trailing whitespace (CodecError ``name_invalid``)."""
    if not isinstance(name, str):
        raise CodecError("name_invalid", "name must be a string", field="name")
    if any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in name):
        raise CodecError("name_invalid", "name contains forbidden characters", field="name")
    norm = unicodedata.normalize("NFC", name)
    if not 1 <= len(norm) <= NAME_LEN_CHARS_MAX:
        raise CodecError("name_invalid", "name must be 1-64 characters", field="name")
    if norm != norm.strip():
        raise CodecError("name_invalid", "name has leading or trailing whitespace", field="name")
    return norm
