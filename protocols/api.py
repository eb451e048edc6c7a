"""The cardsvc HTTP API's request messages and error codes: validation shared by the service, the
signing client, simulators and load tests. Pure: no I/O, no cardsvc imports.

Each request body is a `Message`: a closed set of fields (unknown fields are refused), each with a type
(booleans are not integers), bounds and an optional value validator. `Message.parse` returns a plain dict
of normalised values or raises `ApiInputError` naming the field. `Message.json_schema()` gives the JSON
Schema that protocols/openapi.yaml must carry for the same body (a test checks they agree).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from . import card, clearing, ecard, idnumber
from .errors import CodecError
from .strict import looks_personal, shown_key

__all__ = [
    "CARD_AUTH",
    "CARD_ISSUE",
    "CARD_OPERATIONS",
    "CONCESSION_ACTION",
    "CONCESSION_KINDS",
    "CONCESSION_SET",
    "ECARD_ISSUE",
    "ECARD_VERIFY",
    "ERRORS",
    "FARE_CORRECTION",
    "HOLDER_CREATE",
    "HOLDER_LOOKUP",
    "LIFECYCLE",
    "QUOTA_RIDE_RETURN",
    "REPLACE",
    "RIDE_CERT_ISSUE",
    "TAP",
    "TOPUP",
    "ApiInputError",
    "Field",
    "Message",
]

INT_MAX = 2**63 - 1
STRING_CHARS_MAX_DEFAULT = 256

# Stable machine codes of every problem the API can answer: code -> (HTTP status, title).
ERRORS: dict[str, tuple[int, str]] = {
    "bad_json": (400, "The body is not valid JSON"),
    "bad_content_type": (415, "The body must be application/json"),
    "invalid_field": (400, "A field has an invalid value"),
    "missing_field": (400, "A required field is missing"),
    "unknown_field": (400, "The body has a field this operation does not take"),
    "invalid_parameter": (400, "A query or path parameter is invalid"),
    "body_too_large": (413, "The body is larger than allowed"),
    "auth_missing": (401, "The request is not signed"),
    "auth_malformed": (401, "The request signature headers are malformed"),
    "auth_unknown_terminal": (401, "Unknown or disabled terminal, or unknown key"),
    "auth_bad_signature": (401, "The request signature does not match"),
    "auth_expired": (401, "The request timestamp is outside the allowed clock skew"),
    "auth_replayed": (401, "The request nonce was already used"),
    "forbidden_operation": (403, "This terminal may not call this operation"),
    "not_found": (404, "No such resource"),
    "method_not_allowed": (405, "Method not allowed"),
    "holder_exists": (409, "A cardholder with this ID number already exists"),
    "card_exists": (409, "A card with this card number or identification code already exists"),
    "holder_has_live_card": (409, "The cardholder already has a live card"),
    "ecard_exists": (409, "The card already has an electronic card"),
    "illegal_transition": (409, "The card's status does not allow this operation"),
    "ecard_revoked": (409, "The electronic card is revoked"),
    "idempotency_conflict": (409, "This terminal sequence number was used for a different request"),
    "purse_balance_cap": (422, "The top-up would take the purse over its maximum balance"),
    "fare_not_correctable": (409, "The transaction is not a fare the purse paid"),
    "correction_exceeds_fare": (409, "The fare's corrections would exceed the fare"),
    "no_quota_ride": (409, "The transaction did not use an elderly quota ride"),
    "quota_ride_returned": (409, "The transaction's quota ride was already given back"),
    "quota_year_ended": (409, "The ride's year is over: its quota rides cannot be given back"),
    "no_transit_purse": (422, "The card has no transit purse"),
    "card_not_active": (422, "The card is not active"),
    "concession_not_eligible": (422, "The cardholder is not eligible for this concession"),
    "no_elderly_concession": (422, "The cardholder has no elderly concession"),
    "extra_quota_granted": (409, "The extra elderly rides were already granted this year"),
    "credential_forged": (422, "The credential does not verify"),
    "credential_replayed": (422, "The credential was already used"),
    "credential_expired": (422, "The credential is expired or not yet valid"),
    "credential_malformed": (422, "The credential cannot be read"),
    "card_unusable": (422, "The card is lost, replaced, cancelled, locked or not activated"),
    "unknown_card": (422, "No such card"),
    "db_unavailable": (503, "The database is unavailable; retry later"),
    "overloaded": (503, "The service is overloaded; retry later"),
    "timeout": (503, "The request took too long; retry later"),
    "internal": (500, "Internal error"),
}


class ApiInputError(ValueError):
    def __init__(self, code: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.field = field
        self.detail = detail


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def clean_text(value: str, max_chars: int) -> str:
    """NFC, no control/format characters, no lone surrogates, bounded length."""
    if value.isascii():  # the common case (codes, ids, hex): no surrogates, format characters or NFC work
        if len(value) > max_chars:
            raise ValueError(f"longer than {max_chars} characters")
        if not value.isprintable():
            raise ValueError("contains control or invisible characters")
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired surrogate") from None
    value = unicodedata.normalize("NFC", value)
    if _CONTROL.search(value) or any(unicodedata.category(c) == "Cf" for c in value):
        raise ValueError("contains control or invisible characters")
    if len(value) > max_chars:
        raise ValueError(f"longer than {max_chars} characters")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: type
    required: bool = True
    minimum: int | None = None
    maximum: int | None = None
    min_chars: int | None = None
    max_chars: int = STRING_CHARS_MAX_DEFAULT
    pattern: str | None = None
    enum: tuple[Any, ...] | None = None
    check: Callable[[Any], Any] | None = None
    description: str = ""
    fmt: str | None = None

    def parse(self, raw: Any) -> Any:
        if self.kind is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ApiInputError("invalid_field", self.name, f"{self.name} must be an integer")
            lo = self.minimum if self.minimum is not None else -INT_MAX
            hi = self.maximum if self.maximum is not None else INT_MAX
            if not lo <= raw <= hi:
                raise ApiInputError("invalid_field", self.name, f"{self.name} must be in [{lo}, {hi}]")
        elif self.kind is bool:
            if not isinstance(raw, bool):
                raise ApiInputError("invalid_field", self.name, f"{self.name} must be true or false")
        elif self.kind is str:
            if not isinstance(raw, str):
                raise ApiInputError("invalid_field", self.name, f"{self.name} must be a string")
            try:
                raw = clean_text(raw, self.max_chars)
            except ValueError as exc:
                raise ApiInputError("invalid_field", self.name, f"{self.name} {exc}") from None
            if self.min_chars is not None and len(raw) < self.min_chars:
                raise ApiInputError("invalid_field", self.name, f"{self.name} is too short")
            if self.pattern is not None and not re.fullmatch(self.pattern, raw):
                raise ApiInputError("invalid_field", self.name, f"{self.name} has the wrong format")
        else:  # pragma: no cover - programmer error
            raise AssertionError(f"unsupported field kind {self.kind}")
        if self.enum is not None and raw not in self.enum:
            allowed = ", ".join(str(e) for e in self.enum)
            raise ApiInputError("invalid_field", self.name, f"{self.name} must be one of {allowed}")
        if self.check is not None:
            try:
                raw = self.check(raw)
            except CodecError as exc:
                raise ApiInputError("invalid_field", self.name, f"{self.name}: {exc}") from None
            except ValueError as exc:
                raise ApiInputError("invalid_field", self.name, f"{self.name}: {exc}") from None
        return raw

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": {int: "integer", bool: "boolean", str: "string"}[self.kind]}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.kind is str:
            schema["maxLength"] = self.max_chars
            if self.min_chars is not None:
                schema["minLength"] = self.min_chars
            if self.pattern is not None:
                # Grouped: "^a|b$" would anchor only the first alternative's start and the last's end.
                schema["pattern"] = f"^(?:{self.pattern})$" if "|" in self.pattern else f"^{self.pattern}$"
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        if self.fmt is not None:
            schema["format"] = self.fmt
        return schema


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    name: str
    fields: tuple[Field, ...]

    def parse(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, Mapping):
            raise ApiInputError("invalid_field", None, f"{self.name} body must be a JSON object")
        known = {f.name for f in self.fields}
        for key in data:
            if key not in known:
                shown = shown_key(key)
                raise ApiInputError(
                    "unknown_field", shown, f"unknown field {shown!r}" if shown else "an unknown field (not shown)"
                )
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.name not in data or data[f.name] is None:
                if f.required:
                    raise ApiInputError("missing_field", f.name, f"{f.name} is required")
                out[f.name] = None
                continue
            out[f.name] = f.parse(data[f.name])
        return out

    def json_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "required": [f.name for f in self.fields if f.required],
            "properties": {f.name: f.json_schema() for f in self.fields},
        }


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError("must be a date YYYY-MM-DD") from None


_HEX = "[0-9A-Fa-f]"
def _staff_id(value: str) -> str:
    """A staff id is stored in the audit trail, which holds no personal data: refuse one shaped like an ID,
    bank card or mobile number (typed in its place)."""
    if looks_personal(value):
        raise ValueError("must be a staff id, not an ID, phone or card number")
    return value


def _channel(value: str) -> str:
    # Stricter than a staff id's check: an app's name has no run of 11 digits, where a staff id may
    # (`EMP20240115001`), so `p13912345678` (a mobile number with a letter before it) is refused too.
    if looks_personal(value) or re.search(r"\d{11}", value):
        raise ValueError("must name the issuing app, not an ID, phone or card number")
    return value


OPERATOR = Field(
    "operator",
    str,
    required=False,
    pattern=r"[A-Za-z0-9._-]{1,32}",
    max_chars=32,
    check=_staff_id,
    description="Staff id of the person at the terminal (not personal data: nothing shaped like an ID, bank card or mobile number).",
)
EXPIRES_ON = Field("expires_on", str, pattern=r"\d{4}-\d{2}-\d{2}", max_chars=10, check=_date, fmt="date")

HOLDER_CREATE = Message(
    "HolderCreate",
    (
        Field("id_number", str, max_chars=18, check=idnumber.validate_id_number),
        Field("name", str, max_chars=64, check=idnumber.validate_name),
        OPERATOR,
    ),
)

HOLDER_LOOKUP = Message(
    "HolderLookup", (Field("id_number", str, max_chars=18, check=idnumber.validate_id_number),)
)

CARD_ISSUE = Message(
    "CardIssue",
    (
        Field("holder_id", int, minimum=1),
        Field("card_no", str, max_chars=9, check=card.validate_card_no),
        Field("card_sn", str, max_chars=32, check=card.validate_card_sn),
        Field("generation", int, required=False, minimum=1, maximum=3),
        Field("bank_code", str, required=False, pattern=r"[0-9A-Z]{3,12}", max_chars=12),
        Field("has_purse", bool, required=False),
        EXPIRES_ON,
        OPERATOR,
    ),
)

LIFECYCLE = Message("LifecycleOperation", (OPERATOR,))

REPLACE = Message(
    "CardReplace",
    (
        Field("new_card_no", str, max_chars=9, check=card.validate_card_no),
        Field("new_card_sn", str, max_chars=32, check=card.validate_card_sn),
        EXPIRES_ON,
        OPERATOR,
    ),
)

# Path segment -> the body it takes.
CARD_OPERATIONS: dict[str, Message] = {
    "activate": LIFECYCLE,
    "temporary-loss": LIFECYCLE,
    "lift-loss": LIFECYCLE,
    "formal-loss": LIFECYCLE,
    "replace": REPLACE,
    "cancel": LIFECYCLE,
    "lock-pin": LIFECYCLE,
    "unlock-pin": LIFECYCLE,
    "lock-app": LIFECYCLE,
    "unlock-app": LIFECYCLE,
}

ECARD_ISSUE = Message(
    "EcardIssue",
    (
        Field("card_no", str, max_chars=9, check=card.validate_card_no),
        # The issuing app's name (`gov_app`), stored in the e-card row and answered with it: refused when
        # shaped like the holder's mobile or ID number, as a staff id is.
        Field(
            "channel",
            str,
            pattern=r"[a-z0-9_]{2,32}",
            max_chars=32,
            check=_channel,
            description="The issuing app's name (nothing shaped like an ID, bank card or mobile number).",
        ),
        Field("alg", int, enum=(1, 2)),
        Field("device_public_key", str, pattern=f"{_HEX}{{64}}|{_HEX}{{130}}", max_chars=130),
        OPERATOR,
    ),
)

CARD_AUTH = Message(
    "CardAuth",
    (
        Field("card_sn", str, max_chars=32, check=card.validate_card_sn),
        Field("card_challenge", str, pattern=f"{_HEX}{{16}}", max_chars=16),
        Field("terminal_challenge", str, pattern=f"{_HEX}{{16}}", max_chars=16),
        Field("cryptogram", str, pattern=f"{_HEX}{{32}}", max_chars=32),
    ),
)

_ID16 = r"[A-Za-z0-9._-]{1,16}"
U32_MAX = 2**32 - 1

TAP = Message(
    "TransitTap",
    (
        Field("terminal_seq", int, minimum=0, maximum=U32_MAX),
        Field("time", int, minimum=0, maximum=U32_MAX, description="unix seconds at the validator"),
        Field("mode", str, enum=("bus", "metro")),
        Field("line_id", str, pattern=_ID16, max_chars=16),
        Field("station_id", str, required=False, pattern=_ID16, max_chars=16),
        Field("direction", str, enum=("single", "in", "out")),
        Field("credential", str, enum=("card", "ecard_code", "ride_code")),
        Field("card_sn", str, required=False, max_chars=32, check=card.validate_card_sn),
        Field("card_challenge", str, required=False, pattern=f"{_HEX}{{16}}", max_chars=16),
        Field("terminal_challenge", str, required=False, pattern=f"{_HEX}{{16}}", max_chars=16),
        Field("cryptogram", str, required=False, pattern=f"{_HEX}{{32}}", max_chars=32),
        Field("code", str, required=False, max_chars=512),
    ),
)

TOPUP = Message(
    "PurseTopUp",
    (
        Field("terminal_seq", int, minimum=0, maximum=U32_MAX),
        Field("amount_fen", int, minimum=1, maximum=1_000_000),
        Field("channel", str, enum=("cash", "bank", "wechat", "alipay", "refund")),
        OPERATOR,
    ),
)

FARE_CORRECTION = Message(
    "FareCorrection",
    (
        Field("terminal_seq", int, minimum=0, maximum=U32_MAX),
        Field("txn_id", int, minimum=1, maximum=INT_MAX, description="The fare's txn_id (the purse's history)."),
        Field("amount_fen", int, minimum=1, maximum=1_000_000, description="How much of the fare to give back."),
        Field("reason", str, enum=tuple(r.value for r in clearing.CorrectionReason)),
        dataclasses.replace(OPERATOR, required=True),
    ),
)

QUOTA_RIDE_RETURN = Message(
    "QuotaRideReturn",
    (
        Field("terminal_seq", int, minimum=0, maximum=U32_MAX),
        Field("txn_id", int, minimum=1, maximum=INT_MAX, description="The ride's txn_id (the purse's history)."),
        Field("reason", str, enum=tuple(r.value for r in clearing.CorrectionReason)),
        dataclasses.replace(OPERATOR, required=True),
    ),
)

RIDE_CERT_ISSUE = Message(
    "RideCertIssue",
    (
        Field("card_no", str, max_chars=9, check=card.validate_card_no),
        Field("alg", int, enum=(1, 2)),
        Field("user_public_key", str, pattern=f"{_HEX}{{64}}|{_HEX}{{130}}", max_chars=130),
    ),
)

ECARD_VERIFY = Message(
    "EcardVerify",
    (
        Field("code", str, max_chars=ecard.CODE_TEXT_CHARS_MAX),
        Field("business_type", str, enum=tuple(b.value for b in ecard.BusinessType)),
    ),
)

CONCESSION_KINDS = ("elderly", "disabled_free", "disabled_half")

CONCESSION_SET = Message(
    "ConcessionSet",
    (
        Field(
            "kind",
            str,
            enum=CONCESSION_KINDS,
            description="elderly (free rides within the annual quota, from the fare table's minimum age), "
            "disabled_free or disabled_half (on the card office's check of the certificate)",
        ),
        OPERATOR,
    ),
)

CONCESSION_ACTION = Message("ConcessionAction", (OPERATOR,))
