"""Replay every vector file, and check the committed files are what generate.py produces."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from protocols import card, ecard, hotlist, idnumber, sm, terminal_auth
from protocols.errors import CodecError
from protocols.vectors import generate

VECTOR_DIR = Path(generate.__file__).parent


def _load(name: str) -> Any:
    return json.loads((VECTOR_DIR / f"{name}.json").read_text(encoding="utf-8"))


def test_files_are_up_to_date() -> None:
    existing = generate.load_existing()
    assert set(existing) == {
        "sm",
        "card",
        "ecard",
        "hotlist",
        "terminal_auth",
        "idnumber",
        "transit",
        "ridecode",
    }
    assert generate.build_all(existing) == existing
    for name, v in existing.items():
        assert (VECTOR_DIR / f"{name}.json").read_text(encoding="utf-8") == generate.render(v)


def test_sm_vectors() -> None:
    v = _load("sm")
    for x in v["sm3"]:
        assert sm.sm3(bytes.fromhex(x["message_hex"])).hex() == x["digest"]
    for x in v["hmac_sm3"]:
        assert sm.hmac_sm3(bytes.fromhex(x["key_hex"]), bytes.fromhex(x["message_hex"])).hex() == x["mac"]
    for x in v["sm4_ecb"]:
        assert (
            sm.sm4_encrypt_block(bytes.fromhex(x["key"]), bytes.fromhex(x["plaintext"])).hex()
            == x["ciphertext"]
        )
    s2 = v["sm2"]
    priv = sm.sm2_from_scalar(bytes.fromhex(s2["private_scalar"]))
    assert priv.public_key().public_bytes().hex() == s2["public_key"]
    assert sm.verify(
        sm.ALG_SM2_SM3,
        bytes.fromhex(s2["public_key"]),
        bytes.fromhex(s2["signature"]),
        bytes.fromhex(s2["message_hex"]),
    )
    ed = v["ed25519"]
    key = sm.ed25519_from_seed(bytes.fromhex(ed["seed"]))
    assert sm.ed25519_public_bytes(key).hex() == ed["public_key"]
    assert sm.ed25519_sign(key, bytes.fromhex(ed["message_hex"])).hex() == ed["signature"]


def test_card_vectors() -> None:
    v = _load("card")
    for x in v["vectors"]:
        master = bytes.fromhex(x["master_key"])
        sn = x["card_sn"]
        assert card.province_diversification_data(x["purpose"], sn[:2]).hex() == x["province_data"]
        assert card.derive_province_key(master, sn[:2], x["purpose"]).hex() == x["province_key"]
        assert card.city_diversification_data(sn[:6]).hex() == x["city_data"]
        assert card.derive_city_key(bytes.fromhex(x["province_key"]), sn[:6]).hex() == x["city_key"]
        assert card.card_sn_chip_id(sn).hex() == x["chip_id"]
        key = card.derive_card_key(master, sn, x["purpose"])
        assert key.hex() == x["card_key"]
        assert card.CardKeyDeriver(master, x["purpose"]).card_key(sn) == key
        if "cryptogram" in x:
            cc, tc, cg = (bytes.fromhex(x[k]) for k in ("card_challenge", "terminal_challenge", "cryptogram"))
            assert card.terminal_challenge_time(tc) == x["terminal_challenge_time"]
            assert card.internal_authenticate(key, cc, tc) == cg
            assert card.verify_cryptogram(key, cc, tc, cg)
            assert card.CardSimulator(sn, master_key=master).internal_authenticate(cc + tc) == cg
    for s in v["invalid_card_sn"]:
        with pytest.raises(CodecError):
            card.validate_card_sn(s)
    for s in v["invalid_card_no"]:
        with pytest.raises(CodecError):
            card.validate_card_no(s)


def test_ecard_vectors() -> None:
    v = _load("ecard")
    for x in v["vectors"]:
        dev = ecard.EcardDevice.from_seed(bytes.fromhex(x["seed"]), x["ecard_id"], x["alg"])
        assert dev.public_key_bytes.hex() == x["public_key"]
        code = ecard.decode_code(x["text"])
        assert (code.alg, code.ecard_id, code.issued_at, code.counter) == (
            x["alg"],
            x["ecard_id"],
            x["issued_at"],
            x["counter"],
        )
        assert code.signature.hex() == x["signature"]
        assert ecard.signed_bytes(code).hex() == x["signed_bytes"]
        assert ecard.code_to_bytes(code).hex() == x["code_bytes"]
        assert ecard.verify_code(code, bytes.fromhex(x["public_key"]))
        if x["alg"] == sm.ALG_ED25519:
            assert dev.make_code(x["issued_at"], x["counter"]) == code
    for text in v["malformed"]:
        with pytest.raises(CodecError):
            ecard.decode_code(text)


def test_hotlist_vectors() -> None:
    v = _load("hotlist")
    replica = hotlist.HotlistReplica(version=v["blocks"][0]["json"]["since_version"])
    for x in v["blocks"]:
        block = hotlist.decode_block(x["json"])
        assert "\n".join(hotlist.canonical_lines(block)) == x["canonical"]
        assert sm.sm3(x["canonical"].encode()).hex() == x["json"]["digest"]
        replica.apply(block)
    assert replica.version == v["replica_after"]["version"]
    assert sorted(replica.blocked) == v["replica_after"]["blocked"]
    assert sorted(replica.blocked_accounts) == v["replica_after"]["blocked_accounts"]


def test_terminal_auth_vectors() -> None:
    v = _load("terminal_auth")
    secret = terminal_auth.decode_secret(v["secret"])
    for x in v["vectors"]:
        body = bytes.fromhex(x["body_hex"])
        assert terminal_auth.body_digest(body) == x["body_digest"]
        path, query = terminal_auth.split_path_and_query(x["path_and_query"])
        canon = terminal_auth.canonical_request(
            x["method"],
            path,
            query,
            v["terminal_id"],
            v["key_id"],
            x["timestamp"],
            x["nonce"],
            x["body_digest"],
        )
        assert canon.decode() == x["canonical_request"]
        assert terminal_auth.expected_signature(secret, canon) == x["headers"][terminal_auth.HEADER_SIGNATURE]
        auth = terminal_auth.parse_auth_headers(x["headers"])
        assert terminal_auth.verify_request(secret, x["method"], x["path_and_query"], body, auth)


def test_idnumber_vectors() -> None:
    v = _load("idnumber")
    today = date.fromisoformat(v["today"])
    for x in v["valid"]:
        assert idnumber.validate_id_number(x["id_number"], today) == x["id_number"]
        assert idnumber.mask_id_number(x["id_number"]) == x["masked"]
        assert idnumber.gender_of(x["id_number"]) == x["gender"]
    for x in v["invalid"]:
        with pytest.raises(CodecError) as ei:
            idnumber.validate_id_number(x["id_number"], today)
        assert ei.value.code == x["code"]
    for x in v["names"]:
        assert idnumber.mask_name(x["name"]) == x["masked"]
    for x in v["pans"]:
        assert idnumber.mask_pan(x["pan"]) == x["masked"]
        try:
            idnumber.validate_pan(x["pan"])
            ok = True
        except CodecError:
            ok = False
        assert ok == x["valid"]
