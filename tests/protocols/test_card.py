from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import card
from protocols.errors import CodecError
from protocols.sm import sm4_encrypt_block

MASTER = bytes.fromhex("00112233445566778899aabbccddeeff")
SN = "411600D156000005C38275EEFC9B9648"
sns = st.builds(
    lambda a, h: f"{a}D156000005{h}",
    st.from_regex(r"[0-9]{6}", fullmatch=True),
    st.from_regex(r"[0-9A-F]{16}", fullmatch=True),
)


def test_card_no() -> None:
    assert card.validate_card_no("JA334687X") == "JA334687X"
    assert card.validate_card_no("ja334687x") == "JA334687X"
    for bad in ["JA334687", "JA334687XX", "JA33468 X", "JA33468-X", "ＪA334687X", "ß" * 9]:
        with pytest.raises(CodecError) as ei:
            card.validate_card_no(bad)
        assert ei.value.code == "card_no_invalid"


def test_card_sn() -> None:
    assert card.validate_card_sn(SN.lower()) == SN
    assert card.card_sn_area(SN) == "411600"
    assert card.card_sn_province(SN) == "41"
    assert card.card_sn_chip_id(SN) == bytes.fromhex("C38275EEFC9B9648")
    for bad in [
        SN[:-1],
        SN + "0",
        "4116000156000005C38275EEFC9B9648",
        "41160AD156000005C38275EEFC9B9648",
        SN[:-1] + "G",
    ]:
        with pytest.raises(CodecError) as ei:
            card.validate_card_sn(bad)
        assert ei.value.code == "card_sn_invalid"


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_validators_only_codec_error(s: str) -> None:
    for fn in (card.validate_card_no, card.validate_card_sn):
        try:
            fn(s)
        except CodecError:
            pass


def test_diversify_definition() -> None:
    data = bytes.fromhex("0134310000000000")
    expected = sm4_encrypt_block(MASTER, data + bytes(b ^ 0xFF for b in data))
    assert card.diversify(MASTER, data) == expected
    with pytest.raises(CodecError):
        card.diversify(MASTER, b"\x00" * 7)
    with pytest.raises(CodecError):
        card.diversify(MASTER[:15], data)


def test_hierarchy_inputs() -> None:
    assert card.province_diversification_data(card.KEY_PURPOSE_AUTH, "41") == bytes.fromhex(
        "0134310000000000"
    )
    assert card.province_diversification_data(card.KEY_PURPOSE_TAC, "50") == bytes.fromhex("0235300000000000")
    assert card.city_diversification_data("500100") == bytes.fromhex("500100ffffffffff")
    p = card.derive_province_key(MASTER, "41")
    c = card.derive_city_key(p, "411600")
    assert card.derive_card_key(MASTER, SN) == card.diversify(c, card.card_sn_chip_id(SN))
    assert card.derive_card_key(MASTER, SN) != card.derive_card_key(MASTER, SN, card.KEY_PURPOSE_TAC)
    with pytest.raises(CodecError):
        card.province_diversification_data(3, "41")


@settings(max_examples=100)
@given(sns)
def test_deriver_matches_function(sn: str) -> None:
    deriver = card.CardKeyDeriver(MASTER)
    assert deriver.card_key(sn) == card.derive_card_key(MASTER, sn)
    assert deriver.card_key(sn.lower()) == card.derive_card_key(MASTER, sn)


def test_keys_distinct_across_cards() -> None:
    keys = {card.derive_card_key(MASTER, f"500100D156000005{i:016X}") for i in range(200)}
    assert len(keys) == 200


def test_terminal_challenge() -> None:
    ch = card.make_terminal_challenge(1_767_225_600, b"\x01\x02\x03\x04")
    assert ch.hex() == "6955b90001020304"
    assert card.terminal_challenge_time(ch) == 1_767_225_600
    assert card.check_terminal_challenge(ch, 1_767_225_600) is None
    assert card.check_terminal_challenge(ch, 1_767_225_600 + 60) is None
    assert card.check_terminal_challenge(ch, 1_767_225_600 + 61) == "expired"  # the skew never stretches it
    assert card.check_terminal_challenge(ch, 1_767_225_600 - 5) is None
    assert card.check_terminal_challenge(ch, 1_767_225_600 - 6) == "future"
    with pytest.raises(CodecError):
        card.make_terminal_challenge(2**32, b"\x00" * 4)
    with pytest.raises(CodecError):
        card.terminal_challenge_time(b"\x00" * 7)


def test_simulator_and_verification() -> None:
    sim = card.CardSimulator(SN, master_key=MASTER)
    key = card.derive_card_key(MASTER, SN)
    assert card.CardSimulator(SN, card_key=key).card_key == sim.card_key == key
    req = card.build_card_auth_request(sim, 1_767_225_600, b"\xaa\xbb\xcc\xdd")
    parsed = card.parse_card_auth_request(req)
    assert parsed.to_dict() == req
    assert card.verify_cryptogram(key, parsed.card_challenge, parsed.terminal_challenge, parsed.cryptogram)
    wrong = card.derive_card_key(MASTER, SN[:-1] + "7")
    assert not card.verify_cryptogram(
        wrong, parsed.card_challenge, parsed.terminal_challenge, parsed.cryptogram
    )
    assert not card.verify_cryptogram(
        key, parsed.card_challenge, parsed.terminal_challenge, parsed.cryptogram[:15]
    )
    with pytest.raises(ValueError):
        card.CardSimulator(SN)


def test_injected_rng() -> None:
    sim = card.CardSimulator(SN, master_key=MASTER, rng=lambda n: b"\x42" * n)
    assert sim.get_challenge() == b"\x42" * 8


def test_any_bit_flip_refused() -> None:
    key = card.derive_card_key(MASTER, SN)
    card_ch, term_ch = os.urandom(8), card.make_terminal_challenge(1_767_225_600, os.urandom(4))
    crypt = card.internal_authenticate(key, card_ch, term_ch)
    blob = card_ch + term_ch + crypt
    for i in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[i // 8] ^= 1 << (i % 8)
        assert not card.verify_cryptogram(key, bytes(bad[:8]), bytes(bad[8:16]), bytes(bad[16:]))


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["card_sn", "card_challenge", "terminal_challenge", "cryptogram", "x"]),
        st.one_of(st.text(max_size=40), st.integers(), st.none(), st.binary(max_size=8)),
    )
)
def test_parse_request_only_codec_error(d: dict[str, object]) -> None:
    try:
        card.parse_card_auth_request(d)
    except CodecError:
        pass


def test_parse_request_errors() -> None:
    sim = card.CardSimulator(SN, master_key=MASTER)
    req = card.build_card_auth_request(sim, 1_767_225_600, b"\x00" * 4)
    for field in ("card_challenge", "terminal_challenge", "cryptogram"):
        bad = dict(req)
        bad[field] = bad[field][:-1]
        with pytest.raises(CodecError) as ei:
            card.parse_card_auth_request(bad)
        assert ei.value.field == field and ei.value.code == "card_auth_malformed"
    with pytest.raises(CodecError):
        card.parse_card_auth_request([])  # type: ignore[arg-type]


def test_statuses() -> None:
    assert [s.api_name for s in card.CardStatus] == [
        "issued",
        "active",
        "temporary_loss",
        "formal_loss",
        "replaced",
        "cancelled",
    ]
    assert [int(s) for s in card.CardStatus] == [1, 2, 3, 4, 5, 6]
    for s in card.CardStatus:
        assert card.CardStatus.from_api_name(s.api_name) is s
    with pytest.raises(CodecError):
        card.CardStatus.from_api_name("lost")
    assert int(card.HotlistAction.BLOCK) == 1 and int(card.HotlistAction.UNBLOCK) == 2
    assert [int(r) for r in card.HotlistReason] == list(range(1, 9))
    assert card.HotlistReason.LOSS_EXPIRED.api_name == "loss_expired"
