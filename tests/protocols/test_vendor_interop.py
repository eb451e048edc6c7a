"""An independent implementation of the protocols, written from their specs alone (vendor.py), against
the vectors and the project's codecs, both directions: what a validator, gate or app vendor builds from
protocols/*.md must reproduce the vectors and be accepted by cardsvc, and cardsvc's output by it. A spec
sentence that drifts from the code fails here."""

from __future__ import annotations

import base64
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import card, clearing, ecard, ridecode, sm, terminal_auth, transit
from protocols.ridecode import GateOutcome

from . import vendor as V


def _gate(*a: Any, **kw: Any) -> str:
    return V.gate_verify(*a, **kw)

VEC = Path(transit.__file__).parent / "vectors"
TRANSIT = json.loads((VEC / "transit.json").read_text())
RIDE = json.loads((VEC / "ridecode.json").read_text())
ECARD = json.loads((VEC / "ecard.json").read_text())
AUTH = json.loads((VEC / "terminal_auth.json").read_text())
CARD = json.loads((VEC / "card.json").read_text())
ISSUER_D = V.seed_to_sm2_d(bytes.fromhex(RIDE["issuer_seed"]))
ISSUER_PUB = bytes.fromhex(RIDE["issuer_public_key"])
T0 = 1_767_225_600


# ------------------------------------------------------------------------------------------- card.md


def test_card_md_worked_example_key_hierarchy() -> None:
    key = V.card_key(bytes.fromhex("00112233445566778899AABBCCDDEEFF"), "411600D156000005C38275EEFC9B9648", 1)
    assert key.hex().upper() == "6217BB93B6F3A1F3B26D62783893ACFF"


# ---------------------------------------------------------------------------------------- TAC


def test_tac_vectors_from_spec() -> None:
    k = V.card_key(bytes.fromhex(TRANSIT["master_key"]), TRANSIT["card_sn"], 2)
    assert k.hex() == TRANSIT["tac_key"]
    for r in TRANSIT["records"]:
        assert V.tac_input(r["record"]).hex() == r["tac_input"]
        assert V.pad_m2(V.tac_input(r["record"])).hex() == r["padded"]
        assert V.cbc_mac(k, V.pad_m2(V.tac_input(r["record"]))).hex() == r["cbc_mac"]
        assert V.tac(k, r["record"]) == r["tac"] == r["record"]["tac"]
    w = TRANSIT["wrap"]
    assert V.card_key(bytes.fromhex(TRANSIT["master_key"]), w["card_sn"], 2).hex() == w["tac_key"]
    assert V.tac(bytes.fromhex(w["tac_key"]), w["record"]) == w["tac"]


_ids = st.from_regex(r"[A-Za-z0-9._-]{1,16}", fullmatch=True)
_u32 = st.integers(0, 2**32 - 1)


@settings(max_examples=150, deadline=None)
@given(
    tid=st.from_regex(r"[A-Za-z0-9._-]{1,32}", fullmatch=True), tseq=_u32, pseq=st.integers(0, 65535),
    amount=_u32, bal=_u32, t=_u32, single=st.booleans(), chip=st.binary(min_size=8, max_size=8),
    mk=st.binary(min_size=16, max_size=16), line=_ids,
)  # fmt: skip
def test_tac_both_directions(tid: str, tseq: int, pseq: int, amount: int, bal: int, t: int, single: bool,
                             chip: bytes, mk: bytes, line: str) -> None:  # fmt: skip
    sn = "500100D156000005" + chip.hex().upper()
    rec = {
        "terminal_id": tid, "terminal_seq": tseq, "card_sn": sn, "purse_seq": pseq,
        "amount_fen": amount if single else 0, "balance_before_fen": bal, "txn_time": t,
        "txn_type": 6 if single else 9, "line_id": line, "station_id": "", "direction": "single" if single else "in",
        "hotlist_version": 0,
    }  # fmt: skip
    key = V.card_key(mk, sn, 2)
    assert card.derive_card_key(mk, sn, card.KEY_PURPOSE_TAC) == key
    rec["tac"] = V.tac(key, rec)
    theirs = transit.record_from_dict(rec)  # our record -> their decoder + verifier
    assert transit.verify_tac(key, theirs)
    assert transit.record_to_dict(theirs) == rec
    pc = transit.PurseCard(sn, master_key=mk, balance_fen=bal, purse_seq=(pseq - 1) % 65536, overdraft_fen=2**32 - 1)
    made = pc.debit(rec["amount_fen"], tid, tseq, t, line_id=line, direction=rec["direction"])
    assert made.tac.hex() == V.tac(key, transit.record_to_dict(made))  # their card -> our verifier


# --------------------------------------------------------------------------------------- e-card


@pytest.mark.parametrize("v", ECARD["vectors"], ids=lambda v: f"alg{v['alg']}")
def test_ecard_vectors_vendor(v: dict[str, Any]) -> None:
    seed = bytes.fromhex(v["seed"])
    pub = V.sm2_pub_from_d(V.seed_to_sm2_d(seed)) if v["alg"] == 1 else V.ed_pub(seed)
    assert pub.hex() == v["public_key"]
    code = V.ecard_decode(v["text"])
    assert code is not None and V.ecard_verify(code, pub)
    assert (b"CARDSVC-ECARD-CODE-V1" + code["header"]).hex() == v["signed_bytes"]
    mine = V.ecard_encode(v["alg"], seed, v["ecard_id"], v["issued_at"], v["counter"])
    theirs = ecard.decode_code(mine)
    assert ecard.verify_code(theirs, pub)
    if v["alg"] == 2:
        assert mine == v["text"]
    for m in ECARD["malformed"]:
        assert V.ecard_decode(m) is None


@pytest.mark.parametrize("alg", [1, 2])
def test_ecard_their_device_to_vendor_verifier(alg: int) -> None:
    dev = ecard.EcardDevice.from_seed(bytes([7]) * 32, 99, alg)
    text = dev.next_code(T0)
    code = V.ecard_decode(text)
    assert code is not None and code["counter"] == 1 and V.ecard_verify(code, dev.public_key_bytes)


def test_ecard_small_order_keys_refused() -> None:
    ident_sig = (1).to_bytes(32, "little") + bytes(32)
    hdr = V.ecard_header(2, 5, T0, 1)
    code = ecard.decode_code("EC1" + V.b32_nopad(hdr + ident_sig))
    for y in V.ED_SMALL_ORDER_Y:
        for sign in (0, 1):
            assert not ecard.verify_code(code, (y | sign << 255).to_bytes(32, "little"))


# ------------------------------------------------------------------------------------- ride codes


def _cert(alg: int, seed: bytes, vf: int = T0 - 100, vt: int = T0 + 1000, serial: int = 5, acct: int = 6) -> bytes:
    upk = V.sm2_pub_from_d(V.seed_to_sm2_d(seed)) if alg == 1 else V.ed_pub(seed)
    return V.issue_cert(ISSUER_D, V.cert_tbs(alg, 1, serial, acct, vf, vt, 700, 5000, upk))


def test_ride_vectors_vendor() -> None:
    assert V.sm2_pub_from_d(ISSUER_D) == ISSUER_PUB
    for c in RIDE["codes"]:
        seed = bytes.fromhex(c["user_seed"])
        cv = c["cert"]
        upk = bytes.fromhex(c["user_public_key"])
        tbs = V.cert_tbs(c["alg"], cv["issuer_key_id"], cv["cert_serial"], cv["account_id"], cv["valid_from"],
                         cv["valid_to"], cv["max_fare_fen"], cv["credit_limit_fen"], upk)  # fmt: skip
        assert (b"CARDSVC-RIDE-CERT-V1" + tbs).hex() == c["cert_signed_bytes"]
        assert V.sm2_verify(ISSUER_PUB, bytes.fromhex(c["issuer_signature"]), bytes.fromhex(c["cert_signed_bytes"]))
        assert len(c["text"]) == (381 if c["alg"] == 1 else 328)
        assert _gate(c["text"], ISSUER_PUB, c["time"] + 5) == "ok"
        if c["alg"] == 2:
            cert = tbs + bytes.fromhex(c["issuer_signature"])
            assert V.make_ride_code(cert, 2, seed, c["time"], c["counter"]) == c["text"]


@pytest.mark.parametrize("alg", [1, 2])
def test_ride_vendor_phone_to_their_gate_and_back(alg: int) -> None:
    seed = bytes([0x40 + alg]) * 32
    text = V.make_ride_code(_cert(alg, seed), alg, seed, T0, 1)
    d = ridecode.verify_at_gate(text, ISSUER_PUB, T0 + 5, (), ())
    assert d.outcome == GateOutcome.OK and d.code is not None and d.code.counter == 1
    assert ridecode.encode_code(d.code) == text
    # their phone -> our gate
    user = sm.private_key_from_seed(alg, seed)
    cert = ridecode.decode_cert(_cert(alg, seed))
    their = ridecode.RidePhone(cert, user).next_code(T0)
    assert _gate(their, ISSUER_PUB, T0 + 5) == "ok"


@pytest.mark.parametrize("alg", [1, 2])
def test_ride_gate_refusals_agree(alg: int) -> None:
    seed = bytes([0x50 + alg]) * 32
    text = V.make_ride_code(_cert(alg, seed, vt=T0 + 50), alg, seed, T0, 7)
    g = lambda now, **kw: (  # noqa: E731
        ridecode.verify_at_gate(text, ISSUER_PUB, now, kw.get("s", ()), kw.get("a", ())).outcome.value,
        _gate(text, ISSUER_PUB, now, kw.get("s", ()), kw.get("a", ())),
    )
    for now, kw, want in [(T0 + 5, {"s": {5}}, "denied"), (T0 + 5, {"a": {6}}, "denied"),
                          (T0 + 81, {}, "cert_expired"), (T0 + 80, {}, "ok")]:  # fmt: skip
        assert g(now, **kw) == (want, want)
    raw = bytearray(base64.b32decode(text[3:] + "=" * (-len(text[3:]) % 8)))
    for i in (10, len(raw) - 70, len(raw) - 1):  # serial / counter / user signature byte flipped
        bad = bytearray(raw)
        bad[i] ^= 1
        t2 = "RC1" + V.b32_nopad(bytes(bad))
        assert ridecode.verify_at_gate(t2, ISSUER_PUB, T0 + 5, (), ()).outcome.value == _gate(
            t2, ISSUER_PUB, T0 + 5
        )


# ------------------------------------------------------------------------------ terminal_auth.md


def test_terminal_auth_vectors_vendor() -> None:
    secret = base64.urlsafe_b64decode(AUTH["secret"] + "=")
    for v in AUTH["vectors"]:
        h = V.sign_request(secret, v["method"], v["path_and_query"], bytes.fromhex(v["body_hex"]),
                           AUTH["terminal_id"], AUTH["key_id"], v["timestamp"], v["nonce"])  # fmt: skip
        assert h == v["headers"]


_qseg = st.from_regex(r"[A-Za-z0-9%._~=+-]{0,8}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(
    path=st.from_regex(r"/v1/[A-Za-z0-9%._~-]{0,20}", fullmatch=True),
    segs=st.lists(_qseg, max_size=6),
    body=st.binary(max_size=64),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
)
def test_terminal_auth_both_directions(path: str, segs: list[str], body: bytes, method: str) -> None:
    secret = bytes(range(32))
    target = path + ("?" + "&".join(segs) if segs else "")
    mine = V.sign_request(secret, method, target, body, "T-1", "k1", T0, "n" * 16)
    theirs = terminal_auth.sign_request("T-1", "k1", secret, method, target, body, T0, "n" * 16)
    assert mine == theirs
    auth = terminal_auth.parse_auth_headers(mine)
    assert terminal_auth.verify_request(secret, method, target, body, auth)


# ----------------------------------------------------------------------------------- clearing.md


def test_clearing_vector_vendor() -> None:
    cf = TRANSIT["clearing_file"]
    h = cf["header"]
    assert V.clearing_write(h["operator_id"], h["business_date"], h["created_at"], cf["lines"]).decode() == cf["text"]


_line = st.fixed_dictionaries({
    "card_id": st.integers(1, 2**63 - 1), "source": st.sampled_from(["purse", "ridecode"]),
    "amount_fen": _u32, "txn_time": _u32, "line_id": _ids,
    "station_id": st.from_regex(r"[A-Za-z0-9._-]{0,16}", fullmatch=True),
})  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(_line, max_size=8), gaps=st.lists(st.integers(1, 2**40), min_size=8, max_size=8),
       op=st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True), day=st.dates(date(2000, 1, 1), date(2100, 1, 1)),
       created=_u32)  # fmt: skip
def test_clearing_both_directions(lines: list[dict], gaps: list[int], op: str, day: date, created: int) -> None:
    txn = 0
    for ln, g in zip(lines, gaps, strict=False):
        txn += g
        ln["txn_id"] = txn
    mine = V.clearing_write(op, V.yyyymmdd(day), created, lines)
    header, parsed = clearing.read_clearing_file(mine)
    assert header.business_date == day and header.record_count == len(lines)
    cl = [clearing.ClearingLine(ln["txn_id"], ln["card_id"], clearing.ClearingSource(ln["source"]), ln["amount_fen"],
                                ln["txn_time"], ln["line_id"], ln["station_id"]) for ln in lines]  # fmt: skip
    assert parsed == cl
    assert clearing.write_clearing_file(clearing.make_header(op, day, created, cl), cl) == mine
