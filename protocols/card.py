"""Physical third-generation card: identifiers, our SM4 key hierarchy, INTERNAL AUTHENTICATE, statuses.

See card.md for the exact diversification inputs. Pure: no I/O, no stored per-card keys.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum

from protocols.errors import CardFormatInvalid, CodecError
from protocols.sm import Sm4Ecb, sm4_encrypt_block

__all__ = [
    "CARD_CHALLENGE_LEN_BYTES",
    "CARD_NO_LEN_CHARS",
    "CARD_SN_LEN_CHARS",
    "CARD_SN_RID",
    "CHIP_ID_LEN_BYTES",
    "CRYPTOGRAM_LEN_BYTES",
    "KEY_PURPOSES",
    "KEY_PURPOSE_AUTH",
    "KEY_PURPOSE_TAC",
    "TERMINAL_CHALLENGE_AGE_S_MAX_DEFAULT",
    "TERMINAL_CHALLENGE_LEN_BYTES",
    "CardAuthRequest",
    "CardKeyDeriver",
    "CardSimulator",
    "CardStatus",
    "HotlistAction",
    "HotlistReason",
    "build_card_auth_request",
    "card_sn_area",
    "card_sn_chip_id",
    "card_sn_province",
    "check_terminal_challenge",
    "city_diversification_data",
    "derive_card_key",
    "derive_city_key",
    "derive_province_key",
    "diversify",
    "internal_authenticate",
    "make_terminal_challenge",
    "parse_card_auth_request",
    "province_diversification_data",
    "terminal_challenge_time",
    "validate_card_no",
    "validate_card_sn",
    "verify_cryptogram",
]

CARD_NO_LEN_CHARS = 9
CARD_SN_LEN_CHARS = 32
CARD_SN_RID = "D156000005"
CHIP_ID_LEN_BYTES = 8
CARD_CHALLENGE_LEN_BYTES = 8
TERMINAL_CHALLENGE_LEN_BYTES = 8
CRYPTOGRAM_LEN_BYTES = 16
TERMINAL_CHALLENGE_AGE_S_MAX_DEFAULT = 60
CITY_KEYS_CACHED_MAX = 1024

# One master key per purpose; the purpose byte also enters the province-level diversification data so
# that two purposes never share a derived key even if misconfigured with the same master key.
KEY_PURPOSE_AUTH = 0x01  # INTERNAL AUTHENTICATE (MK_AUTH)
KEY_PURPOSE_TAC = 0x02  # transit purse TAC (MK_TAC)
KEY_PURPOSES: frozenset[int] = frozenset({KEY_PURPOSE_AUTH, KEY_PURPOSE_TAC})

_CARD_NO_RE = re.compile(r"[A-Z0-9]{9}")
_CARD_SN_RE = re.compile(r"([0-9]{6})D156000005([0-9A-F]{16})")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")


# ------------------------------------------------------------------------------------- identifiers


def validate_card_no(s: str) -> str:
    """Card number printed on the card: 9 characters [A-Z0-9]; lowercase is accepted and uppercased."""
    if not isinstance(s, str) or len(s) != CARD_NO_LEN_CHARS or not s.isascii():
        raise CardFormatInvalid("card_no_invalid", "card number is 9 characters A-Z 0-9", field="card_no")
    s = s.upper()
    if not _CARD_NO_RE.fullmatch(s):
        raise CardFormatInvalid("card_no_invalid", "card number is 9 characters A-Z 0-9", field="card_no")
    return s


def validate_card_sn(s: str) -> str:
    """Card identification code: 6-digit issuing area + 'D156000005' + 16 hex; normalised uppercase."""
    if not isinstance(s, str) or len(s) != CARD_SN_LEN_CHARS or not s.isascii():
        raise CardFormatInvalid("card_sn_invalid", "card_sn is 32 characters", field="card_sn")
    s = s.upper()
    if not _CARD_SN_RE.fullmatch(s):
        raise CardFormatInvalid(
            "card_sn_invalid", "card_sn is area(6 digits) + D156000005 + 16 hex", field="card_sn"
        )
    return s


def card_sn_area(sn: str) -> str:
    """6-digit issuing area code."""
    return validate_card_sn(sn)[:6]


def card_sn_province(sn: str) -> str:
    """2-digit province code (first two digits of the issuing area)."""
    return validate_card_sn(sn)[:2]


def card_sn_chip_id(sn: str) -> bytes:
    """The 8-byte chip identifier (last 16 hex characters)."""
    return bytes.fromhex(validate_card_sn(sn)[16:])


# ----------------------------------------------------------------------------------- key hierarchy


def _check_key(key16: bytes, what: str) -> bytes:
    if not isinstance(key16, bytes | bytearray) or len(key16) != 16:
        raise CodecError("key_invalid", f"{what} is 16 bytes")
    return bytes(key16)


def diversify(parent_key16: bytes, data8: bytes) -> bytes:
    """child = SM4-ECB(parent, data8 || (data8 XOR FF..FF))."""
    _check_key(parent_key16, "parent key")
    if len(data8) != 8:
        raise CodecError("diversification_data_invalid", "diversification data is 8 bytes")
    block = bytes(data8) + bytes(b ^ 0xFF for b in data8)
    return sm4_encrypt_block(parent_key16, block)


def province_diversification_data(purpose: int, province2: str) -> bytes:
    """purpose (1 byte) || ASCII province code (2 bytes) || 00 x 5."""
    if purpose not in KEY_PURPOSES:
        raise CodecError("key_purpose_unknown", f"unknown key purpose {purpose!r}")
    if not isinstance(province2, str) or not re.fullmatch(r"[0-9]{2}", province2):
        raise CodecError("area_invalid", "province code is 2 digits")
    return bytes([purpose]) + province2.encode("ascii") + b"\x00" * 5


def city_diversification_data(area6: str) -> bytes:
    """BCD of the 6-digit issuing area code (3 bytes) || FF x 5."""
    if not isinstance(area6, str) or not re.fullmatch(r"[0-9]{6}", area6):
        raise CodecError("area_invalid", "area code is 6 digits")
    return bytes.fromhex(area6) + b"\xff" * 5


def derive_province_key(master16: bytes, province2: str, purpose: int = KEY_PURPOSE_AUTH) -> bytes:
    return diversify(master16, province_diversification_data(purpose, province2))


def derive_city_key(province_key16: bytes, area6: str) -> bytes:
    return diversify(province_key16, city_diversification_data(area6))


def derive_card_key(master16: bytes, card_sn: str, purpose: int = KEY_PURPOSE_AUTH) -> bytes:
    """master -> province -> city -> card key for ``card_sn`` (see card.md)."""
    sn = validate_card_sn(card_sn)
    province_key = derive_province_key(master16, sn[:2], purpose)
    city_key = derive_city_key(province_key, sn[:6])
    return diversify(city_key, bytes.fromhex(sn[16:]))


class CardKeyDeriver:
    """Derives card keys from one master key (one purpose) with cached city-level SM4 contexts.

    Per-card keys are never cached; only the (few hundred) city contexts are. ~1-2 us per card key.
    Not thread-safe: one instance per thread / event loop.
    """

    __slots__ = ("_city", "_master", "_purpose")

    def __init__(self, master16: bytes, purpose: int = KEY_PURPOSE_AUTH) -> None:
        self._master = _check_key(master16, "master key")
        if purpose not in KEY_PURPOSES:
            raise CodecError("key_purpose_unknown", f"unknown key purpose {purpose!r}")
        self._purpose = purpose
        self._city: dict[str, Sm4Ecb] = {}

    def card_key(self, card_sn: str) -> bytes:
        sn = validate_card_sn(card_sn)
        area = sn[:6]
        ecb = self._city.get(area)
        if ecb is None:
            province_key = derive_province_key(self._master, sn[:2], self._purpose)
            ecb = Sm4Ecb(derive_city_key(province_key, area))
            if len(self._city) >= CITY_KEYS_CACHED_MAX:
                self._city.clear()
            self._city[area] = ecb
        chip = bytes.fromhex(sn[16:])
        return ecb.encrypt_block(chip + bytes(b ^ 0xFF for b in chip))


# --------------------------------------------------------------------------- INTERNAL AUTHENTICATE


def make_terminal_challenge(now_s: int, rand4: bytes) -> bytes:
    """4-byte big-endian unix seconds || 4 random bytes."""
    if not 0 <= now_s < 2**32 or len(rand4) != 4:
        raise CodecError("terminal_challenge_invalid", "time must fit 4 bytes; 4 random bytes")
    return now_s.to_bytes(4, "big") + bytes(rand4)


def terminal_challenge_time(ch8: bytes) -> int:
    if len(ch8) != TERMINAL_CHALLENGE_LEN_BYTES:
        raise CodecError("terminal_challenge_invalid", "terminal challenge is 8 bytes")
    return int.from_bytes(ch8[:4], "big")


def check_terminal_challenge(
    ch8: bytes, now_s: int, max_age_s: int = TERMINAL_CHALLENGE_AGE_S_MAX_DEFAULT, skew_s: int = 5
) -> str | None:
    """None if the challenge time is within [now - max_age, now + skew]; else 'expired'/'future'. The skew
    is allowed on the future side only: it never stretches the age (as ecard.check_freshness)."""
    t = terminal_challenge_time(ch8)
    if t > now_s + skew_s:
        return "future"
    if now_s - t > max_age_s:
        return "expired"
    return None


def internal_authenticate(card_key16: bytes, card_challenge8: bytes, terminal_challenge8: bytes) -> bytes:
    """Cryptogram = SM4-ECB(card_key, card_challenge || terminal_challenge)."""
    if len(card_challenge8) != CARD_CHALLENGE_LEN_BYTES or len(terminal_challenge8) != 8:
        raise CodecError("challenge_invalid", "challenges are 8 bytes each")
    return sm4_encrypt_block(_check_key(card_key16, "card key"), bytes(card_challenge8) + terminal_challenge8)


def verify_cryptogram(card_key16: bytes, card_ch: bytes, term_ch: bytes, cryptogram16: bytes) -> bool:
    """Constant-time check of a card's answer. False (never raises) on wrong lengths."""
    if (
        len(card_ch) != CARD_CHALLENGE_LEN_BYTES
        or len(term_ch) != TERMINAL_CHALLENGE_LEN_BYTES
        or len(cryptogram16) != CRYPTOGRAM_LEN_BYTES
    ):
        return False
    expected = internal_authenticate(card_key16, card_ch, term_ch)
    return hmac.compare_digest(expected, bytes(cryptogram16))


class CardSimulator:
    """The card side of card authentication (tests, demo, load tests)."""

    def __init__(
        self,
        card_sn: str,
        card_key: bytes | None = None,
        master_key: bytes | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.card_sn = validate_card_sn(card_sn)
        if (card_key is None) == (master_key is None):
            raise ValueError("give exactly one of card_key, master_key")
        self.card_key = (
            _check_key(card_key, "card key")
            if card_key is not None
            else derive_card_key(master_key or b"", self.card_sn)
        )
        self._rng = rng
        self._challenge: bytes | None = None

    def get_challenge(self) -> bytes:
        """GET CHALLENGE: 8 random bytes, remembered for the next INTERNAL AUTHENTICATE."""
        self._challenge = self._rng(CARD_CHALLENGE_LEN_BYTES)
        return self._challenge

    def internal_authenticate(self, data16: bytes) -> bytes:
        if len(data16) != 16:
            raise CodecError("challenge_invalid", "INTERNAL AUTHENTICATE takes 16 bytes")
        return sm4_encrypt_block(self.card_key, bytes(data16))


@dataclass(frozen=True, slots=True)
class CardAuthRequest:
    """What a terminal forwards for server-side card authentication."""

    card_sn: str
    card_challenge: bytes
    terminal_challenge: bytes
    cryptogram: bytes

    def to_dict(self) -> dict[str, str]:
        return {
            "card_sn": self.card_sn,
            "card_challenge": self.card_challenge.hex(),
            "terminal_challenge": self.terminal_challenge.hex(),
            "cryptogram": self.cryptogram.hex(),
        }


def build_card_auth_request(sim: CardSimulator, now_s: int, rand4: bytes) -> dict[str, str]:
    """Run the terminal/card exchange against ``sim`` and return the JSON the terminal sends."""
    card_ch = sim.get_challenge()
    term_ch = make_terminal_challenge(now_s, rand4)
    cryptogram = sim.internal_authenticate(card_ch + term_ch)
    return CardAuthRequest(sim.card_sn, card_ch, term_ch, cryptogram).to_dict()


def _hex_field(d: Mapping[str, object], name: str, n_bytes: int) -> bytes:
    v = d.get(name)
    if not isinstance(v, str) or len(v) != 2 * n_bytes or not _HEX_RE.fullmatch(v):
        raise CodecError("card_auth_malformed", f"{name} must be {2 * n_bytes} hex characters", field=name)
    return bytes.fromhex(v)


def parse_card_auth_request(d: Mapping[str, object]) -> CardAuthRequest:
    """Validate the terminal's JSON (CodecError ``card_auth_malformed`` / ``card_sn_invalid``)."""
    if not isinstance(d, Mapping):
        raise CodecError("card_auth_malformed", "object expected")
    sn = d.get("card_sn")
    if not isinstance(sn, str):
        raise CardFormatInvalid("card_sn_invalid", "card_sn missing", field="card_sn")
    return CardAuthRequest(
        card_sn=validate_card_sn(sn),
        card_challenge=_hex_field(d, "card_challenge", CARD_CHALLENGE_LEN_BYTES),
        terminal_challenge=_hex_field(d, "terminal_challenge", TERMINAL_CHALLENGE_LEN_BYTES),
        cryptogram=_hex_field(d, "cryptogram", CRYPTOGRAM_LEN_BYTES),
    )


# -------------------------------------------------------------------------------------- statuses


class CardStatus(IntEnum):
    """Stable smallint codes (DB and API)."""

    ISSUED = 1  # made, not activated
    ACTIVE = 2
    TEMP_LOST = 3
    LOST = 4  # formal loss report, irreversible
    REPLACED = 5
    CANCELLED = 6

    @property
    def api_name(self) -> str:
        return _CARD_STATUS_API[self]

    @classmethod
    def from_api_name(cls, name: str) -> CardStatus:
        for status, api in _CARD_STATUS_API.items():
            if api == name:
                return status
        raise CodecError("card_status_invalid", f"unknown card status {name!r}", field="status")


_CARD_STATUS_API: dict[CardStatus, str] = {
    CardStatus.ISSUED: "issued",
    CardStatus.ACTIVE: "active",
    CardStatus.TEMP_LOST: "temporary_loss",
    CardStatus.LOST: "formal_loss",
    CardStatus.REPLACED: "replaced",
    CardStatus.CANCELLED: "cancelled",
}


class HotlistAction(IntEnum):
    BLOCK = 1
    UNBLOCK = 2

    @property
    def api_name(self) -> str:
        return self.name.lower()


class HotlistReason(IntEnum):
    TEMP_LOSS = 1
    FORMAL_LOSS = 2
    REPLACED = 3
    CANCELLED = 4
    APP_LOCKED = 5
    LOSS_LIFTED = 6
    LOSS_EXPIRED = 7
    APP_UNLOCKED = 8

    @property
    def api_name(self) -> str:
        return self.name.lower()
