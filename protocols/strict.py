"""Helpers shared by the strict decoders of protocols/ (no network I/O)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from protocols.errors import CodecError

__all__ = [
    "PERSONAL_DATA_PATTERNS",
    "b32_canonical",
    "check_exact_keys",
    "check_int",
    "check_str",
    "check_upload",
    "decode_upload",
    "looks_personal",
    "nested_field",
    "shown_key",
]

# Text shaped like personal data: 18-character ID numbers, 15-19 digit bank card numbers, 11-digit mainland
# mobile numbers. Logs redact it (cardsvc.logs), and fields stored in the audit trail refuse it.
PERSONAL_DATA_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])"),
    re.compile(r"(?<!\d)\d{15,19}(?!\d)"),
    re.compile(r"(?<![0-9A-Za-z])1[3-9]\d{9}(?![0-9A-Za-z])"),
)


def looks_personal(text: str) -> bool:
    """Whether `text` holds something shaped like an ID, bank card or mobile number."""
    return any(p.search(text) for p in PERSONAL_DATA_PATTERNS)


# A key an error message may name: a field name's shape. Anything else (an ID number or a name sent as a
# key) is refused without being echoed into the answer or a log line.
_KEY_SHOWN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


_KEY_DIGITS = re.compile(r"\d{11}")  # no field name has them; ID, bank card and mobile numbers do


def shown_key(key: object) -> str | None:
    """The key as an error may show it, or None when it is not shaped like a field name or holds a run of
    11 or more digits (`id_500104196207193855` and `p13912345678` are a field name's shape)."""
    if isinstance(key, str) and _KEY_SHOWN.fullmatch(key) and not _KEY_DIGITS.search(key):
        return key
    return None


def _unknown(key: str, bad: Bad) -> CodecError:
    shown = shown_key(key)
    return bad(f"unknown key {shown!r}" if shown else "an unknown key (not shown)", shown)

Bad = Callable[[str, str | None], CodecError]
_B32_RE = re.compile(r"[A-Z2-7]*")


def b32_canonical(body: str, malformed: Callable[[str], CodecError]) -> bytes:
    """Unpadded uppercase base32 in its one canonical spelling (unused trailing bits zero), decoded; any
    other text is `malformed(...)`: "not base32" or "non-canonical base32"."""
    if not body.isascii() or not _B32_RE.fullmatch(body):
        raise malformed("not base32")
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError) as exc:
        raise malformed("not base32") from exc
    if base64.b32encode(raw).decode("ascii").rstrip("=") != body:
        raise malformed("non-canonical base32")
    return raw


def check_exact_keys(
    d: Mapping[object, object],
    keys: Sequence[str],
    key_set: Collection[str],
    bad: Bad,
) -> None:
    """An object must have exactly `keys` (`key_set` is the same keys as a set): the first unknown key
    (sorted) or the first missing one (in `keys` order) is raised as `bad(message, key)`."""
    if d.keys() == key_set:  # the usual case costs one comparison
        return
    unknown = sorted(str(k) for k in d if k not in key_set)
    if unknown:
        raise _unknown(unknown[0], bad)
    for k in keys:
        if k not in d:
            raise bad(f"{k} missing", k)


def check_int(v: object, name: str, lo: int, hi: int, bad: Bad) -> int:
    """A JSON integer (not a boolean) in [lo, hi]."""
    if type(v) is not int or not lo <= v <= hi:
        raise bad(f"{name} must be an integer in [{lo}, {hi}]", name)
    return v


def check_str(v: object, name: str, pattern: re.Pattern[str], bad: Bad) -> str:
    """An ASCII string matching `pattern` whole."""
    if not isinstance(v, str) or not v.isascii() or not pattern.fullmatch(v):
        raise bad(f"{name} has the wrong format", name)
    return v


def nested_field(where: str, field: str | None) -> str | None:
    """The name of a field inside an element named by `where` (like "records[3]."): the element itself
    when the error is about the whole element (not an object, say), never a name with a trailing dot."""
    return where + field if field else where.rstrip(".") or None


def decode_upload(d: object, id_key: str, records_max: int, bad: Bad) -> tuple[str, int, list[Any]]:
    """The envelope of an upload `{id_key, "batch_id", "records"}`: (the uploader's id, the batch id, the
    raw records), types checked; the records are decoded by the caller, the rest by `check_upload`."""
    if not isinstance(d, Mapping):
        raise bad("batch must be an object", None)
    unknown = sorted(str(k) for k in d if k not in (id_key, "batch_id", "records"))
    if unknown:
        raise _unknown(unknown[0], bad)
    records = d.get("records")
    if not isinstance(records, list) or not 1 <= len(records) <= records_max:
        raise bad(f"records must be a list of 1 to {records_max}", "records")
    source, batch_id = d.get(id_key), d.get("batch_id")
    if not isinstance(source, str):
        raise bad(f"{id_key} must be a string", id_key)
    if type(batch_id) is not int:
        raise bad("batch_id must be an integer", "batch_id")
    return source, batch_id, records


def check_upload(
    source: object,
    batch_id: object,
    records: Sequence[object],
    *,
    id_key: str,
    id_re: re.Pattern[str],
    batch_id_max: int,
    record_type: type,
    records_max: int,
    seq_key: str,
    uploader: str,
    bad: Bad,
) -> None:
    """An upload's rules: the uploader id's format, batch_id in [1, batch_id_max], 1..records_max records
    of `record_type`, every one from this uploader (`record.<id_key>`) and `record.<seq_key>` strictly
    ascending."""
    if not isinstance(source, str) or not source.isascii() or not id_re.fullmatch(source):
        raise bad(f"{id_key} has the wrong format", id_key)
    if type(batch_id) is not int or not 1 <= batch_id <= batch_id_max:
        raise bad(f"batch_id must be an integer in [1, {batch_id_max}]", "batch_id")
    if not 1 <= len(records) <= records_max:
        raise bad(f"a batch holds 1 to {records_max} records", "records")
    prev = -1
    for i, r in enumerate(records):
        if not isinstance(r, record_type):
            raise bad("record expected", f"records[{i}]")
        if getattr(r, id_key) != source:
            raise bad(f"record from another {uploader}", f"records[{i}].{id_key}")
        seq = getattr(r, seq_key)
        if seq <= prev:
            raise bad(f"{seq_key} must ascend strictly", f"records[{i}].{seq_key}")
        prev = seq
