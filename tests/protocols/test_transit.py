"""Transit purse records: TAC (against vectors and an independent CBC computation), the card simulator,
strict JSON codecs, purse_seq arithmetic and the back office's verdicts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import card, transit
from protocols.card import HotlistAction, HotlistReason
from protocols.errors import CodecError
from protocols.hotlist import HotlistEntry
from protocols.transit import OfflineRecord, PurseCard, RecordResult, TxnType

VECTORS = json.loads((Path(transit.__file__).parent / "vectors" / "transit.json").read_text(encoding="utf-8"))
SN = "411600D156000005C38275EEFC9B9648"
SN2 = "500100D1560000050123456789ABCDEF"
MASTER = bytes.fromhex(VECTORS["master_key"])
KEY = card.derive_card_key(MASTER, SN, card.KEY_PURPOSE_TAC)
T0 = 1_767_225_600
TERM = "T-0001.bus_7"


def _cbc_last_block(key: bytes, data: bytes) -> bytes:
    """Independent CBC-MAC, as ISO/IEC 9797-1 MAC algorithm 1 writes it: h = E(h XOR block), block by
    block with single-block SM4-ECB, from h = 0 (the implementation uses the library's CBC mode)."""
    ecb = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    h = bytes(16)
    for i in range(0, len(data), 16):
        h = ecb.update(bytes(a ^ b for a, b in zip(h, data[i : i + 16], strict=True)))
    return h


@settings(max_examples=200)
@given(st.binary(min_size=16, max_size=16), st.binary(max_size=80))
def test_cbc_mac_equals_the_block_by_block_definition(key: bytes, data: bytes) -> None:
    padded = transit.iso9797_pad_method2(data)
    assert transit.sm4_cbc_mac(key, data) == _cbc_last_block(key, padded)


def _record(**kw: Any) -> OfflineRecord:
    base: dict[str, Any] = {
        "terminal_id": TERM,
        "terminal_seq": 9,
        "card_sn": SN,
        "purse_seq": 3,
        "amount_fen": 200,
        "balance_before_fen": 1000,
        "txn_time": T0,
        "txn_type": TxnType.PURSE_DEBIT,
        "line_id": "B401",
        "station_id": "",
        "direction": "single",
        "hotlist_version": 5,
        "tac": bytes(4),
    }
    base.update(kw)
    r = OfflineRecord(**base)
    return dataclasses.replace(r, tac=transit.compute_tac(KEY, r)) if "tac" not in kw else r


# ------------------------------------------------------------------------------------------ vectors


def test_vector_key_is_the_card_tac_key() -> None:
    assert VECTORS["tac_key"] == KEY.hex()
    assert KEY != card.derive_card_key(MASTER, SN, card.KEY_PURPOSE_AUTH)


@pytest.mark.parametrize(
    "v", [*VECTORS["records"], VECTORS["wrap"]], ids=lambda v: str(v["record"]["purse_seq"])
)
def test_tac_vectors(v: dict[str, Any]) -> None:
    r = transit.record_from_dict(v["record"])
    key = card.derive_card_key(MASTER, r.card_sn, card.KEY_PURPOSE_TAC)
    assert transit.terminal_tag(r.terminal_id).hex() == v["terminal_tag"]
    data = transit.tac_input(r)
    assert data.hex() == v["tac_input"] and len(data) == transit.TAC_INPUT_LEN_BYTES == 26
    padded = transit.iso9797_pad_method2(data)
    assert padded.hex() == v["padded"] and padded == data + b"\x80" + bytes(5)
    assert transit.sm4_cbc_mac(key, data).hex() == v["cbc_mac"] == _cbc_last_block(key, padded).hex()
    assert transit.compute_tac(key, r).hex() == v["tac"] == v["record"]["tac"]
    assert transit.verify_tac(key, r)
    assert transit.record_to_dict(r) == v["record"]


def test_record_vectors_chain_like_a_card() -> None:
    recs = [transit.record_from_dict(v["record"]) for v in VECTORS["records"]]
    balance = VECTORS["initial_balance_fen"]
    for i, r in enumerate(recs):
        assert r.purse_seq == i + 1
        assert r.balance_before_fen == balance
        balance -= r.amount_fen
    assert balance < 0  # the last one used the overdraft
    card_ = PurseCard(SN, master_key=MASTER, balance_fen=VECTORS["initial_balance_fen"], overdraft_fen=500)
    replay = [
        card_.debit(
            r.amount_fen,
            r.terminal_id,
            r.terminal_seq,
            r.txn_time,
            line_id=r.line_id,
            station_id=r.station_id,
            direction=r.direction,
            hotlist_version=r.hotlist_version,
        )
        for r in recs
    ]
    assert replay == recs  # deterministic


def test_wrap_vector() -> None:
    w = VECTORS["wrap"]
    assert w["purse_seq_before"] == 65535 and w["record"]["purse_seq"] == 0


def test_batch_vector_round_trip() -> None:
    b = transit.batch_from_dict(VECTORS["batch"])
    assert len(b.records) == len(VECTORS["records"]) and b.terminal_id == TERM
    assert transit.batch_to_dict(b) == VECTORS["batch"]


@pytest.mark.parametrize("m", VECTORS["malformed_records"], ids=lambda m: m["field"])
def test_malformed_record_vectors(m: dict[str, Any]) -> None:
    with pytest.raises(transit.TransitRecordInvalid) as ei:
        transit.record_from_dict(m["record"])
    assert ei.value.code == "transit_record_invalid" and ei.value.field == m["field"]


@pytest.mark.parametrize("v", VECTORS["purse_seq"], ids=lambda v: f"{v['last']}-{v['seq']}")
def test_purse_seq_vectors(v: dict[str, Any]) -> None:
    assert transit.purse_seq_delta(v["last"], v["seq"]) == v["delta"]
    assert transit.extend_purse_seq(v["last_ext"], v["seq"]) == v["extended"]
    assert v["extended"] % transit.PURSE_SEQ_MODULUS == v["seq"]


# ---------------------------------------------------------------------------------------------- TAC


def test_tac_refused_with_other_key_or_tac() -> None:
    r = _record()
    assert transit.verify_tac(KEY, r)
    other = card.derive_card_key(MASTER, SN2, card.KEY_PURPOSE_TAC)
    assert not transit.verify_tac(other, r)
    assert not transit.verify_tac(card.derive_card_key(MASTER, SN, card.KEY_PURPOSE_AUTH), r)
    assert not transit.verify_tac(KEY, dataclasses.replace(r, tac=bytes(4)))
    with pytest.raises(CodecError):
        transit.verify_tac(b"short", r)


_COVERED = {
    "amount_fen": 32,
    "balance_before_fen": 32,
    "purse_seq": 16,
    "terminal_seq": 32,
    "txn_time": 32,
}


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(_COVERED)), bit=st.integers(0, 31))
def test_any_flipped_bit_in_a_covered_field_breaks_the_tac(name: str, bit: int) -> None:
    r = _record()
    bit %= _COVERED[name]
    changed = dataclasses.replace(r, **{name: getattr(r, name) ^ (1 << bit)})
    assert not transit.verify_tac(KEY, changed)


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, transit.TAC_INPUT_LEN_BYTES - 1), bit=st.integers(0, 7))
def test_any_flipped_bit_in_the_tac_input_changes_the_tac(pos: int, bit: int) -> None:
    r = _record()
    data = bytearray(transit.tac_input(r))
    data[pos] ^= 1 << bit
    assert transit.sm4_cbc_mac(KEY, bytes(data))[:4] != r.tac


def test_txn_type_and_terminal_are_covered_but_line_is_not() -> None:
    r = _record(txn_type=TxnType.COMPOSITE, direction="out")
    assert not transit.verify_tac(
        KEY, dataclasses.replace(r, txn_type=TxnType.PURSE_DEBIT, direction="single")
    )
    assert not transit.verify_tac(KEY, dataclasses.replace(r, terminal_id="T-0002.bus_7"))
    # line/station/direction-within-type/hotlist_version are the validator's word (see transit.md)
    assert transit.verify_tac(KEY, dataclasses.replace(r, line_id="M9", station_id="X", hotlist_version=1))
    assert transit.verify_tac(KEY, dataclasses.replace(r, direction="in", amount_fen=0)) is False


# -------------------------------------------------------------------------------------- simulator


@settings(max_examples=60, deadline=None)
@given(
    start_seq=st.integers(0, 65535),
    balance=st.integers(0, 5000),
    overdraft=st.integers(0, 500),
    amounts=st.lists(st.integers(0, 800), min_size=1, max_size=25),
)
def test_debits_chain(start_seq: int, balance: int, overdraft: int, amounts: list[int]) -> None:
    c = PurseCard(SN, tac_key=KEY, balance_fen=balance, purse_seq=start_seq, overdraft_fen=overdraft)
    records: list[OfflineRecord] = []
    for i, amount in enumerate(amounts):
        before = c.balance_fen
        allowed = before >= 0 and before - amount >= -overdraft
        try:
            r = c.debit(amount, TERM, i, T0 + i)
        except transit.PurseRefused as exc:
            assert not allowed and exc.code in ("purse_insufficient", "purse_overdrawn")
            assert c.balance_fen == before  # a refusal changes nothing
            continue
        assert allowed
        assert transit.verify_tac(KEY, r)
        assert r.balance_before_fen == before and c.balance_fen == before - amount
        records.append(r)
    seq = start_seq
    for n, r in enumerate(records):
        seq = transit.purse_seq_next(seq)
        assert r.purse_seq == seq
        assert transit.purse_seq_delta(records[n - 1].purse_seq if n else start_seq, r.purse_seq) == 1
        if n + 1 < len(records):
            assert records[n + 1].balance_before_fen == r.balance_before_fen - r.amount_fen
    assert c.balance_fen >= -overdraft


def test_overdraft_once_then_top_up() -> None:
    c = PurseCard(SN, master_key=MASTER, balance_fen=100, overdraft_fen=300)
    c.debit(350, TERM, 1, T0)
    assert c.balance_fen == -250
    with pytest.raises(transit.PurseRefused) as ei:
        c.debit(1, TERM, 2, T0)
    assert ei.value.code == "purse_overdrawn"
    load = c.credit(1000)
    assert (load.purse_seq, load.balance_before_fen, load.balance_after_fen) == (1, -250, 750)
    r = c.debit(200, TERM, 3, T0 + 5)
    assert (r.purse_seq, r.balance_before_fen) == (2, 750)


def test_credit_cap_and_bad_amounts() -> None:
    c = PurseCard(SN, tac_key=KEY, balance_fen=19_000, balance_cap_fen=20_000)
    with pytest.raises(transit.PurseRefused) as ei:
        c.credit(1001)
    assert ei.value.code == "purse_balance_cap" and c.balance_fen == 19_000
    with pytest.raises(CodecError):
        c.credit(0)
    with pytest.raises(CodecError):
        c.debit(-1, TERM, 1, T0)
    with pytest.raises(ValueError):
        PurseCard(SN)
    with pytest.raises(ValueError):
        PurseCard(SN, tac_key=KEY, master_key=MASTER)


def test_metro_tap_in_and_out() -> None:
    c = PurseCard(SN, tac_key=KEY, balance_fen=1000)
    tin = c.debit(0, "G-7", 1, T0, line_id="M3", station_id="S1", direction="in")
    tout = c.debit(400, "G-9", 1, T0 + 900, line_id="M3", station_id="S9", direction="out")
    assert tin.txn_type == tout.txn_type == TxnType.COMPOSITE
    with pytest.raises(transit.TransitRecordInvalid):
        c.debit(100, "G-7", 2, T0, line_id="M3", direction="in")
    assert c.purse_seq == 2  # the refused tap-in did not consume a sequence number


# ------------------------------------------------------------------------------------------- JSON


def test_record_json_round_trip_and_case() -> None:
    r = _record()
    d = transit.record_to_dict(r)
    assert list(d) == list(transit.RECORD_KEYS)
    assert transit.record_from_dict(json.loads(json.dumps(d))) == r
    assert transit.record_from_dict({**d, "tac": d["tac"].upper()}) == r


def test_record_missing_key() -> None:
    d = transit.record_to_dict(_record())
    del d["hotlist_version"]
    with pytest.raises(transit.TransitRecordInvalid) as ei:
        transit.record_from_dict(d)
    assert ei.value.field == "hotlist_version"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(transit.RECORD_KEYS), value=_JSON)
def test_record_decoder_raises_only_codec_error(key: str, value: object) -> None:
    d = transit.record_to_dict(_record())
    d[key] = value
    try:
        r = transit.record_from_dict(d)
    except CodecError as exc:
        assert exc.field == key or exc.field in transit.RECORD_KEYS
    else:
        assert transit.record_to_dict(r)[key] == value or key == "tac"


@settings(max_examples=200, deadline=None)
@given(value=_JSON)
def test_batch_decoder_raises_only_codec_error(value: object) -> None:
    for d in (value, {"terminal_id": TERM, "batch_id": 1, "records": value}):
        try:
            transit.batch_from_dict(d)
        except CodecError:
            pass


def test_batch_rules() -> None:
    recs = [_record(terminal_seq=i, purse_seq=i) for i in range(1, 4)]
    ok = transit.batch_to_dict(transit.OfflineBatch(TERM, 7, recs))
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({**ok, "records": []}, "records"),
        ({**ok, "records": ok["records"] * 200}, "records"),  # 600 > 500
        ({**ok, "batch_id": 0}, "batch_id"),
        ({**ok, "batch_id": True}, "batch_id"),
        ({**ok, "terminal_id": "T-0009"}, "records[0].terminal_id"),
        ({**ok, "records": [ok["records"][1], ok["records"][0]]}, "records[1].terminal_seq"),
        ({**ok, "records": [ok["records"][0], ok["records"][0]]}, "records[1].terminal_seq"),
        ({**ok, "records": [ok["records"][0], {**ok["records"][1], "tac": "zz"}]}, "records[1].tac"),
        ({**ok, "more": 1}, "more"),
    ]
    for d, field in cases:
        with pytest.raises(CodecError) as ei:
            transit.batch_from_dict(d)
        assert ei.value.field == field, (d, ei.value)
    full = transit.OfflineBatch(
        TERM, 1, [_record(terminal_seq=i) for i in range(transit.OFFLINE_BATCH_RECORDS_MAX)]
    )
    assert len(transit.batch_from_dict(transit.batch_to_dict(full)).records) == 500


# ---------------------------------------------------------------------------------- back office


def test_purse_seq_helpers() -> None:
    assert transit.purse_seq_next(65535) == 0
    assert transit.purse_seq_delta(65535, 0) == 1
    assert transit.purse_seq_delta(0, 65535) == -1
    assert transit.purse_seq_delta(10, 10 + 32767) == 32767
    assert transit.purse_seq_delta(10, 10 + 32768) == -32768
    ext = 0
    for i in range(1, 70_000, 997):  # walk forward across two wraps
        ext = transit.extend_purse_seq(ext, i % 65536)
        assert ext == i


def _judge(r: OfflineRecord, **kw: Any) -> RecordResult:
    facts: dict[str, Any] = {
        "card_known": True,
        "tac_ok": True,
        "posted": None,
        "blocked_at_validator_version": False,
        "last_purse_seq": r.purse_seq - 1,
        "shadow_balance_fen": r.balance_before_fen,
    }
    facts.update(kw)
    return transit.judge_record(r, **facts)


def test_judge_precedence() -> None:
    r = _record()
    other = dataclasses.replace(r, line_id="M1")
    assert _judge(r) == RecordResult.ACCEPTED
    assert _judge(r, card_known=False, tac_ok=False) == RecordResult.CARD_UNKNOWN
    assert _judge(r, tac_ok=False, posted=r) == RecordResult.BAD_TAC
    assert _judge(r, posted=r, blocked_at_validator_version=True) == RecordResult.DUPLICATE
    assert _judge(r, posted=other, blocked_at_validator_version=True) == RecordResult.CONFLICT
    assert _judge(r, blocked_at_validator_version=True, last_purse_seq=0) == RecordResult.HOTLISTED
    assert _judge(r, last_purse_seq=0, shadow_balance_fen=1) == RecordResult.SEQUENCE_GAP
    assert _judge(r, shadow_balance_fen=1) == RecordResult.BALANCE_MISMATCH
    assert _judge(r, last_purse_seq=9, shadow_balance_fen=1) == RecordResult.ACCEPTED  # late, fills a gap
    assert _judge(r, last_purse_seq=None, shadow_balance_fen=None) == RecordResult.ACCEPTED
    assert transit.RESULT_PRECEDENCE[0] == RecordResult.MALFORMED
    assert set(transit.RESULT_PRECEDENCE) == set(RecordResult)
    assert [x for x in RecordResult if x.cleared] == [
        RecordResult.ACCEPTED,
        RecordResult.SEQUENCE_GAP,
        RecordResult.BALANCE_MISMATCH,
    ]
    assert RecordResult.HOTLISTED.posted and not RecordResult.HOTLISTED.cleared
    assert not RecordResult.BAD_TAC.posted and not RecordResult.DUPLICATE.posted


def test_blocked_at_version() -> None:
    entries = [
        HotlistEntry(100, SN, HotlistAction.BLOCK, HotlistReason.TEMP_LOSS, T0, 7),
        HotlistEntry(105, SN, HotlistAction.UNBLOCK, HotlistReason.LOSS_LIFTED, T0 + 10, 7),
        HotlistEntry(103, SN2, HotlistAction.BLOCK, HotlistReason.FORMAL_LOSS, T0 + 5, 8),
    ]
    assert not transit.blocked_at_version(entries, SN, 99)
    assert transit.blocked_at_version(entries, SN, 100)
    assert transit.blocked_at_version(entries, SN, 104)
    assert not transit.blocked_at_version(entries, SN, 105)
    assert transit.blocked_at_version(entries, SN2, 200)


def test_spec_worked_example_matches_the_vector() -> None:
    spec = (Path(transit.__file__).parent / "transit.md").read_text(encoding="utf-8")
    v = VECTORS["records"][0]
    assert f"TAC = {v['tac'].upper()}" in spec
    assert f"K_TAC = {VECTORS['tac_key'].upper()}" in spec
    assert v["cbc_mac"].upper() in spec
    assert "".join(spec.split("    I   = ")[1].split("\n")[0].split()) == v["tac_input"].upper()
