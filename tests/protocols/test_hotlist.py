from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import hotlist
from protocols.card import HotlistAction, HotlistReason
from protocols.errors import CodecError

SN1 = "411600D156000005C38275EEFC9B9648"
SN2 = "500100D1560000050123456789ABCDEF"

E1 = hotlist.HotlistEntry(11, SN1, HotlistAction.BLOCK, HotlistReason.TEMP_LOSS, 1_767_225_600, 501)
E2 = hotlist.HotlistEntry(12, SN2, HotlistAction.BLOCK, HotlistReason.FORMAL_LOSS, 1_767_225_601, 502)
E3 = hotlist.HotlistEntry(15, SN1, HotlistAction.UNBLOCK, HotlistReason.LOSS_LIFTED, 1_767_225_602, 501)
BLOCK = hotlist.HotlistBlock(10, 12, 15, True, (E1, E2))
BLOCK2 = hotlist.HotlistBlock(12, 15, 15, False, (E3,))


def test_round_trip_through_json() -> None:
    for b in (BLOCK, BLOCK2, hotlist.HotlistBlock(0, 0, 0, False, ())):
        d = json.loads(json.dumps(hotlist.encode_block(b)))
        assert hotlist.decode_block(d) == b
        assert len(d["digest"]) == 64


def test_canonical_form() -> None:
    assert hotlist.canonical_lines(BLOCK) == [
        "CARDSVC-HOTLIST-V2",
        "10|12|15|1|2",
        f"11|{SN1}|501|1|1|1767225600",
        f"12|{SN2}|502|1|2|1767225601",
    ]


def _mutations(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key in ("since_version", "to_version", "latest_version"):
        m = copy.deepcopy(d)
        m[key] += 1
        out.append(m)
    m = copy.deepcopy(d)
    m["more"] = not m["more"]
    out.append(m)
    for i in range(len(d["entries"])):
        for key in ("version", "action", "reason", "at", "account_id"):
            m = copy.deepcopy(d)
            m["entries"][i][key] = m["entries"][i][key] + 1 if key != "action" else 3 - m["entries"][i][key]
            out.append(m)
        m = copy.deepcopy(d)
        m["entries"][i]["card_sn"] = m["entries"][i]["card_sn"][:-1] + "0"
        out.append(m)
        m = copy.deepcopy(d)
        del m["entries"][i]
        out.append(m)
    m = copy.deepcopy(d)
    m["entries"] = list(reversed(m["entries"]))
    out.append(m)
    return out


def test_any_change_refused() -> None:
    d = hotlist.encode_block(BLOCK)
    for m in _mutations(d):
        with pytest.raises(CodecError) as ei:
            hotlist.decode_block(m)
        assert ei.value.code == "hotlist_block_invalid"
    for i in range(64 * 4):
        m = copy.deepcopy(d)
        digest = bytearray(bytes.fromhex(m["digest"]))
        digest[i // 8 % 32] ^= 1 << (i % 8)
        m["digest"] = digest.hex()
        with pytest.raises(CodecError):
            hotlist.decode_block(m)


def test_structure_rules() -> None:
    good = hotlist.encode_block(BLOCK)
    bad_cases: list[dict[str, Any]] = []
    for key, value in [
        ("since_version", -1),
        ("since_version", True),
        ("more", 1),
        ("entries", {}),
        ("to_version", 9),
    ]:
        m = copy.deepcopy(good)
        m[key] = value
        bad_cases.append(m)
    m = copy.deepcopy(good)
    m["entries"][0]["version"] = 10  # not > since_version
    bad_cases.append(m)
    m = copy.deepcopy(good)
    m["entries"][1]["version"] = 11  # not strictly ascending
    bad_cases.append(m)
    m = copy.deepcopy(good)
    m["entries"][0]["card_sn"] = SN1.lower()
    bad_cases.append(m)
    m = copy.deepcopy(good)
    m["entries"][0]["reason"] = 9
    bad_cases.append(m)
    bad_cases.append({})
    for m in bad_cases:
        with pytest.raises(CodecError):
            hotlist.decode_block(m)
    with pytest.raises(CodecError):
        hotlist.encode_block(hotlist.HotlistBlock(10, 12, 15, False, (E1,)))  # more must be true
    with pytest.raises(CodecError):
        hotlist.encode_block(hotlist.HotlistBlock(10, 12, 15, True, (E2, E1)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40) | st.floats(allow_nan=True),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=15), children, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(json_values)
def test_decode_garbage_only_codec_error(v: Any) -> None:
    try:
        hotlist.decode_block(v)
    except CodecError:
        pass


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["version", "card_sn", "action", "reason", "at"]),
        st.one_of(st.integers(-3, 2**70), st.text(max_size=33), st.none(), st.booleans()),
    )
)
def test_decode_garbage_entries_only_codec_error(entry: dict[str, Any]) -> None:
    d = hotlist.encode_block(BLOCK)
    d["entries"][0] = entry
    with pytest.raises(CodecError):
        hotlist.decode_block(d)


def test_replica() -> None:
    r = hotlist.HotlistReplica(version=10)
    with pytest.raises(CodecError) as ei:
        r.apply(BLOCK2)
    assert ei.value.code == "hotlist_version_mismatch"
    assert r.apply(hotlist.decode_block(hotlist.encode_block(BLOCK))) is True
    assert r.version == 12
    assert r.is_blocked(SN1) and r.is_blocked(SN2.lower())
    assert r.blocked_accounts == {501, 502}  # a gate denies their ride codes (ridecode.md)
    assert r.apply(BLOCK2) is False
    assert r.version == 15
    assert not r.is_blocked(SN1) and r.is_blocked(SN2)
    assert r.blocked_accounts == {502}
    assert not r.is_blocked("garbage")
    with pytest.raises(CodecError):
        r.apply(BLOCK)


def test_entries_any_sequence_stored_as_tuple() -> None:
    b = hotlist.HotlistBlock(10, 12, 15, True, [E1, E2])
    assert b.entries == (E1, E2) and b == BLOCK
    assert hotlist.encode_block(b) == hotlist.encode_block(BLOCK)
