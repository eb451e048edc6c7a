"""Versioned deny-list (hotlist) deltas for terminals. See hotlist.md."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocols.card import HotlistAction, HotlistReason, validate_card_sn
from protocols.errors import CodecError, HotlistBlockInvalid
from protocols.sm import sm3

__all__ = [
    "ACCOUNT_ID_MAX",
    "DIGEST_DOMAIN",
    "HOTLIST_BLOCK_ENTRIES_MAX",
    "HOTLIST_VERSION_MAX",
    "HotlistBlock",
    "HotlistEntry",
    "HotlistReplica",
    "block_digest",
    "canonical_lines",
    "decode_block",
    "encode_block",
]

DIGEST_DOMAIN = "CARDSVC-HOTLIST-V2"
HOTLIST_BLOCK_ENTRIES_MAX = 10_000
HOTLIST_VERSION_MAX = 2**63 - 1
HOTLIST_AT_S_MAX = 2**63 - 1
ACCOUNT_ID_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class HotlistEntry:
    version: int
    card_sn: str
    action: HotlistAction
    reason: HotlistReason
    at: int  # unix seconds
    # The account the card's ride-code certificates name (ridecode.md `account_id`): a gate denies ride codes
    # by it as a validator denies the card by card_sn.
    account_id: int


@dataclass(frozen=True, slots=True)
class HotlistBlock:
    since_version: int
    to_version: int
    latest_version: int
    more: bool
    entries: Sequence[HotlistEntry] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Any sequence is accepted; stored as a tuple so the block is immutable.
        if not isinstance(self.entries, tuple):
            object.__setattr__(self, "entries", tuple(self.entries))


def canonical_lines(block: HotlistBlock) -> list[str]:
    """The lines the digest covers (see hotlist.md)."""
    lines = [
        DIGEST_DOMAIN,
        f"{block.since_version}|{block.to_version}|{block.latest_version}|{int(block.more)}|{len(block.entries)}",
    ]
    lines.extend(
        f"{e.version}|{e.card_sn}|{e.account_id}|{int(e.action)}|{int(e.reason)}|{e.at}" for e in block.entries
    )
    return lines


def block_digest(block: HotlistBlock) -> str:
    """Lowercase hex SM3 over the canonical lines joined with LF (no trailing LF), ASCII."""
    return sm3("\n".join(canonical_lines(block)).encode("ascii")).hex()


def encode_block(block: HotlistBlock) -> dict[str, Any]:
    """JSON-ready dict, with "digest". Validates the block first (programmer error -> CodecError)."""
    _validate(block)
    return {
        "since_version": block.since_version,
        "to_version": block.to_version,
        "latest_version": block.latest_version,
        "more": block.more,
        "entries": [
            {
                "version": e.version,
                "card_sn": e.card_sn,
                "account_id": e.account_id,
                "action": int(e.action),
                "reason": int(e.reason),
                "at": e.at,
            }
            for e in block.entries
        ],
        "digest": block_digest(block),
    }


def _bad(message: str, field_name: str | None = None) -> HotlistBlockInvalid:
    return HotlistBlockInvalid("hotlist_block_invalid", message, field=field_name)


def _int(v: object, name: str, lo: int = 0, hi: int = HOTLIST_VERSION_MAX) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"{name} must be an integer in [{lo}, {hi}]", name)
    return v


def _validate(block: HotlistBlock) -> None:
    _int(block.since_version, "since_version")
    _int(block.to_version, "to_version")
    _int(block.latest_version, "latest_version")
    if not block.since_version <= block.to_version <= block.latest_version:
        raise _bad("need since_version <= to_version <= latest_version", "to_version")
    if type(block.more) is not bool or block.more != (block.to_version < block.latest_version):
        raise _bad("more must be true exactly when to_version < latest_version", "more")
    if len(block.entries) > HOTLIST_BLOCK_ENTRIES_MAX:
        raise _bad("too many entries", "entries")
    prev = block.since_version
    for e in block.entries:
        if not isinstance(e, HotlistEntry):
            raise _bad("entry expected", "entries")
        v = _int(e.version, "version")
        if not prev < v <= block.to_version:
            raise _bad("entry versions must ascend strictly within (since_version, to_version]", "version")
        prev = v
        if not isinstance(e.card_sn, str) or validate_card_sn(e.card_sn) != e.card_sn:
            raise _bad("card_sn invalid or not normalised", "card_sn")
        if not isinstance(e.action, HotlistAction) or not isinstance(e.reason, HotlistReason):
            raise _bad("action/reason invalid", "action")
        _int(e.at, "at", 0, HOTLIST_AT_S_MAX)
        _int(e.account_id, "account_id", 1, ACCOUNT_ID_MAX)


def _entry(d: object) -> HotlistEntry:
    if not isinstance(d, Mapping):
        raise _bad("entry must be an object", "entries")
    card_sn = d.get("card_sn")
    if not isinstance(card_sn, str):
        raise _bad("card_sn missing", "card_sn")
    try:
        sn = validate_card_sn(card_sn)
    except CodecError as exc:
        raise _bad("card_sn invalid", "card_sn") from exc
    if sn != card_sn:
        raise _bad("card_sn must be uppercase", "card_sn")
    action = _int(d.get("action"), "action", 1, 2**31)
    reason = _int(d.get("reason"), "reason", 1, 2**31)
    try:
        act, rsn = HotlistAction(action), HotlistReason(reason)
    except ValueError as exc:
        raise _bad("unknown action or reason", "action") from exc
    return HotlistEntry(
        version=_int(d.get("version"), "version"),
        card_sn=sn,
        action=act,
        reason=rsn,
        at=_int(d.get("at"), "at", 0, HOTLIST_AT_S_MAX),
        account_id=_int(d.get("account_id"), "account_id", 1, ACCOUNT_ID_MAX),
    )


def decode_block(d: Mapping[str, object]) -> HotlistBlock:
    """Validate a JSON-decoded block and its digest; HotlistBlockInvalid ``hotlist_block_invalid``."""
    if not isinstance(d, Mapping):
        raise _bad("object expected")
    entries_raw = d.get("entries")
    if not isinstance(entries_raw, list):
        raise _bad("entries must be a list", "entries")
    if len(entries_raw) > HOTLIST_BLOCK_ENTRIES_MAX:
        raise _bad("too many entries", "entries")
    more = d.get("more")
    if type(more) is not bool:
        raise _bad("more must be a boolean", "more")
    block = HotlistBlock(
        since_version=_int(d.get("since_version"), "since_version"),
        to_version=_int(d.get("to_version"), "to_version"),
        latest_version=_int(d.get("latest_version"), "latest_version"),
        more=more,
        entries=tuple(_entry(e) for e in entries_raw),
    )
    _validate(block)
    digest = d.get("digest")
    if not isinstance(digest, str) or digest != block_digest(block):
        raise _bad("digest mismatch", "digest")
    return block


class HotlistReplica:
    """Terminal-side copy of the deny-list: apply blocks in order, ask whether a card is blocked (a
    validator, by card_sn) or a ride code's account is (a gate, by account_id: ridecode.md)."""

    def __init__(self, version: int = 0, blocked: Iterable[str] = (), blocked_accounts: Iterable[int] = ()) -> None:
        self.version = version
        self.blocked: set[str] = set(blocked)
        self.blocked_accounts: set[int] = set(blocked_accounts)

    def apply(self, block: HotlistBlock) -> bool:
        """Apply a decoded block; returns ``block.more``. Refuses a block not starting at our version."""
        if block.since_version != self.version:
            raise HotlistBlockInvalid(
                "hotlist_version_mismatch",
                f"block starts at {block.since_version}, replica is at {self.version}",
                field="since_version",
            )
        for e in block.entries:
            if e.action == HotlistAction.BLOCK:
                self.blocked.add(e.card_sn)
                self.blocked_accounts.add(e.account_id)
            else:
                self.blocked.discard(e.card_sn)
                self.blocked_accounts.discard(e.account_id)
        self.version = block.to_version
        return block.more

    def is_blocked(self, card_sn: str) -> bool:
        try:
            return validate_card_sn(card_sn) in self.blocked
        except CodecError:
            return False
