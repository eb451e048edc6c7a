"""Regenerate protocols/vectors/*.json: ``python -m protocols.vectors.generate``.

Everything is deterministic except SM2 signatures (randomised by the algorithm): an SM2 signature already
stored in a file is kept if it still verifies, so regeneration is idempotent.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

from protocols import card, ecard, hotlist, idnumber, sm, terminal_auth
from protocols.errors import CodecError

__all__ = ["VECTOR_DIR", "build_all", "load_existing", "main", "render"]

VECTOR_DIR = Path(__file__).resolve().parent

Vectors = dict[str, Any]


def _keep_sm2_signature(
    existing: Vectors | None, path: list[str | int], pub: bytes, msg: bytes
) -> bytes | None:
    node: Any = existing
    for p in path:
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return None
    if not isinstance(node, str):
        return None
    try:
        sig = bytes.fromhex(node)
    except ValueError:
        return None
    return sig if sm.verify(sm.ALG_SM2_SM3, pub, sig, msg) else None


def _sm(existing: Vectors | None) -> Vectors:
    sm4_key = bytes.fromhex("0123456789abcdeffedcba9876543210")
    scalar = bytes.fromhex("3945208f7b2144b13f36e38ac6d39f95889393692860b51a42fb81ef4df7c5b8")
    priv = sm.sm2_from_scalar(scalar)
    pub = priv.public_key().public_bytes()
    msg = b"message digest"
    sig = _keep_sm2_signature(existing, ["sm2", "signature"], pub, msg) or priv.sign_raw(msg)
    ed_seed = bytes(range(32))
    ed = sm.ed25519_from_seed(ed_seed)
    return {
        "description": "SM3, HMAC-SM3, SM4-ECB, SM2 (raw r||s, SM3, ID 1234567812345678) and Ed25519 vectors",
        "sm3": [
            {"message_hex": b"abc".hex(), "digest": sm.sm3(b"abc").hex()},
            {"message_hex": (b"abcd" * 16).hex(), "digest": sm.sm3(b"abcd" * 16).hex()},
        ],
        "hmac_sm3": [
            {
                "key_hex": (b"\x0b" * 32).hex(),
                "message_hex": b"Hi There".hex(),
                "mac": sm.hmac_sm3(b"\x0b" * 32, b"Hi There").hex(),
            }
        ],
        "sm4_ecb": [
            {
                "key": sm4_key.hex(),
                "plaintext": sm4_key.hex(),
                "ciphertext": sm.sm4_encrypt_block(sm4_key, sm4_key).hex(),
            }
        ],
        "sm2": {
            "private_scalar": scalar.hex(),
            "public_key": pub.hex(),
            "message_hex": msg.hex(),
            "signature": sig.hex(),
        },
        "ed25519": {
            "seed": ed_seed.hex(),
            "public_key": sm.ed25519_public_bytes(ed).hex(),
            "message_hex": msg.hex(),
            "signature": sm.ed25519_sign(ed, msg).hex(),
        },
    }


CARD_MASTER_AUTH = bytes.fromhex("00112233445566778899aabbccddeeff")
CARD_MASTER_TAC = bytes.fromhex("ffeeddccbbaa99887766554433221100")
CARD_SNS = (
    "411600D156000005C38275EEFC9B9648",
    "500100D1560000050123456789ABCDEF",
    "510100D156000005FFFFFFFFFFFFFFFF",
)


def _card() -> Vectors:
    vectors = []
    for i, sn in enumerate(CARD_SNS):
        for purpose, master in (
            (card.KEY_PURPOSE_AUTH, CARD_MASTER_AUTH),
            (card.KEY_PURPOSE_TAC, CARD_MASTER_TAC),
        ):
            pdata = card.province_diversification_data(purpose, sn[:2])
            pkey = card.derive_province_key(master, sn[:2], purpose)
            cdata = card.city_diversification_data(sn[:6])
            ckey = card.derive_city_key(pkey, sn[:6])
            chip = card.card_sn_chip_id(sn)
            key = card.derive_card_key(master, sn, purpose)
            entry: dict[str, Any] = {
                "card_sn": sn,
                "purpose": purpose,
                "master_key": master.hex(),
                "province_data": pdata.hex(),
                "province_key": pkey.hex(),
                "city_data": cdata.hex(),
                "city_key": ckey.hex(),
                "chip_id": chip.hex(),
                "card_key": key.hex(),
            }
            if purpose == card.KEY_PURPOSE_AUTH:
                card_ch = bytes([0x10 + i] * 8)
                now_s = 1_767_225_600 + i
                term_ch = card.make_terminal_challenge(now_s, bytes([0xA0, 0xB1, 0xC2, i]))
                entry.update(
                    {
                        "card_challenge": card_ch.hex(),
                        "terminal_challenge": term_ch.hex(),
                        "terminal_challenge_time": now_s,
                        "cryptogram": card.internal_authenticate(key, card_ch, term_ch).hex(),
                    }
                )
            vectors.append(entry)
    return {
        "description": "Card key diversification (card.md) and INTERNAL AUTHENTICATE cryptograms",
        "vectors": vectors,
        "invalid_card_sn": [
            "411600D156000006C38275EEFC9B9648",
            "41160D156000005C38275EEFC9B96480",
            "411600D156000005C38275EEFC9B964G",
        ],
        "invalid_card_no": ["JA334687", "JA334687X1", "JA33468-X", "JA334687\u00dc"],
    }


def _ecard(existing: Vectors | None) -> Vectors:
    out: list[dict[str, Any]] = []
    for idx, (alg, seed, ecard_id, issued_at, counter) in enumerate(
        (
            (sm.ALG_SM2_SM3, bytes([1] * 32), 1, 1_767_225_600, 1),
            (sm.ALG_ED25519, bytes([2] * 32), 9_000_000_000_000_000_001, 1_767_225_660, 4_294_967_295),
        )
    ):
        if alg == sm.ALG_ED25519:
            ecard_id = ecard.ECARD_ID_MAX
        dev = ecard.EcardDevice.from_seed(seed, ecard_id, alg)
        unsigned = ecard.EcardCode(ecard.CODE_VERSION, alg, ecard_id, issued_at, counter, b"")
        msg = ecard.signed_bytes(unsigned)
        sig: bytes | None = None
        if alg == sm.ALG_SM2_SM3:
            sig = _keep_sm2_signature(existing, ["vectors", idx, "signature"], dev.public_key_bytes, msg)
        if sig is None:
            sig = sm.sign(dev.private_key, msg)
        code = ecard.EcardCode(ecard.CODE_VERSION, alg, ecard_id, issued_at, counter, sig)
        out.append(
            {
                "alg": alg,
                "seed": seed.hex(),
                "public_key": dev.public_key_bytes.hex(),
                "ecard_id": ecard_id,
                "issued_at": issued_at,
                "counter": counter,
                "signed_bytes": msg.hex(),
                "signature": sig.hex(),
                "code_bytes": ecard.code_to_bytes(code).hex(),
                "text": ecard.encode_code(code),
            }
        )
    good = out[0]["text"]
    malformed = [
        "",
        "EC1",
        good.lower(),
        good[:-1],
        good + "A",
        "EC2" + good[3:],
        good[:-1] + "B",  # non-canonical trailing bits
        good[:10] + "1" + good[11:],  # '1' is not in the base32 alphabet
    ]
    return {
        "description": "E-card QR codes (ecard.md). SM2 signatures are randomised: any valid one is fine",
        "vectors": out,
        "malformed": malformed,
    }


def _hotlist() -> Vectors:
    entries = (
        hotlist.HotlistEntry(
            101,
            "411600D156000005C38275EEFC9B9648",
            card.HotlistAction.BLOCK,
            card.HotlistReason.TEMP_LOSS,
            1_767_225_600,
        ),
        hotlist.HotlistEntry(
            105,
            "500100D1560000050123456789ABCDEF",
            card.HotlistAction.BLOCK,
            card.HotlistReason.FORMAL_LOSS,
            1_767_225_700,
        ),
        hotlist.HotlistEntry(
            107,
            "411600D156000005C38275EEFC9B9648",
            card.HotlistAction.UNBLOCK,
            card.HotlistReason.LOSS_LIFTED,
            1_767_226_000,
        ),
    )
    blocks = [
        hotlist.HotlistBlock(100, 105, 107, True, entries[:2]),
        hotlist.HotlistBlock(105, 107, 107, False, entries[2:]),
        hotlist.HotlistBlock(107, 107, 107, False, ()),
    ]
    return {
        "description": "Hotlist blocks (hotlist.md): JSON form, canonical text and SM3 digest",
        "blocks": [
            {"json": hotlist.encode_block(b), "canonical": "\n".join(hotlist.canonical_lines(b))}
            for b in blocks
        ],
        "replica_after": {"version": 107, "blocked": ["500100D1560000050123456789ABCDEF"]},
    }


def _terminal_auth() -> Vectors:
    secret = bytes(range(32))
    cases = [
        ("POST", "/v1/cards/auth", b'{"card_sn":"411600D156000005C38275EEFC9B9648"}'),
        ("get", "/v1/hotlist?since=100&limit=500&a=%20b&a=1", b""),
        ("PUT", "/v1/cards/JA334687X/status", '{"note":"挂失"}'.encode()),
    ]
    out = []
    for i, (method, target, body) in enumerate(cases):
        ts = 1_767_225_600 + i
        nonce = f"bm9uY2Utbm9uY2UtMDA{i}"
        headers = terminal_auth.sign_request("T-0001.bus_7", "k1", secret, method, target, body, ts, nonce)
        path, query = terminal_auth.split_path_and_query(target)
        canon = terminal_auth.canonical_request(
            method, path, query, "T-0001.bus_7", "k1", ts, nonce, terminal_auth.body_digest(body)
        )
        out.append(
            {
                "method": method,
                "path_and_query": target,
                "body_hex": body.hex(),
                "timestamp": ts,
                "nonce": nonce,
                "body_digest": terminal_auth.body_digest(body),
                "canonical_request": canon.decode("utf-8"),
                "headers": headers,
            }
        )
    return {
        "description": "CARDSVC-HMAC-SM3 request signatures (terminal_auth.md)",
        "terminal_id": "T-0001.bus_7",
        "key_id": "k1",
        "secret": terminal_auth.encode_secret(secret),
        "vectors": out,
    }


def _idnumber() -> Vectors:
    today = date(2026, 1, 1)
    valid = [
        idnumber.make_id_number("500101", date(1990, 3, 7), 123),
        idnumber.make_id_number("110105", date(1949, 10, 1), 2),
        idnumber.make_id_number("510107", date(2000, 2, 29), 37),
        "11010519491231002X",
    ]
    invalid: list[dict[str, str]] = []
    for s in [
        "5001011990030712",
        "50010119900307123A",
        "60010119900307123" + idnumber.check_character("60010119900307123"),
        "50010119900230123" + idnumber.check_character("50010119900230123"),
        "50010118991231123" + idnumber.check_character("50010118991231123"),
        "50010120260102123" + idnumber.check_character("50010120260102123"),
        valid[0][:17] + ("0" if valid[0][17] != "0" else "1"),
    ]:
        try:
            idnumber.validate_id_number(s, today)
        except CodecError as exc:
            invalid.append({"id_number": s, "code": exc.code})
        else:
            raise AssertionError(f"{s} unexpectedly valid")
    return {
        "description": "ID numbers (idnumber.md); validation date today=2026-01-01",
        "today": today.isoformat(),
        "valid": [
            {"id_number": v, "masked": idnumber.mask_id_number(v), "gender": idnumber.gender_of(v)}
            for v in valid
        ],
        "invalid": invalid,
        "names": [
            {"name": n, "masked": idnumber.mask_name(n)}
            for n in ["张", "张三", "欧阳娜娜", "阿依古丽·买买提"]
        ],
        "pans": [
            {"pan": p, "valid": idnumber.luhn_valid(p) and 16 <= len(p) <= 19, "masked": idnumber.mask_pan(p)}
            for p in ["6222021234567890128", "6222021234567890127", "4111111111111111", "621700123456789012"]
        ],
    }


def load_existing(directory: Path = VECTOR_DIR) -> dict[str, Vectors]:
    out: dict[str, Vectors] = {}
    for path in sorted(directory.glob("*.json")):
        out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return out


def build_all(existing: dict[str, Vectors] | None = None) -> dict[str, Vectors]:
    existing = existing or {}
    return {
        "sm": _sm(existing.get("sm")),
        "card": _card(),
        "ecard": _ecard(existing.get("ecard")),
        "hotlist": _hotlist(),
        "terminal_auth": _terminal_auth(),
        "idnumber": _idnumber(),
    }


def render(vectors: Vectors) -> str:
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    directory = Path(argv[0]) if argv else VECTOR_DIR
    for name, vectors in build_all(load_existing(directory)).items():
        (directory / f"{name}.json").write_text(render(vectors), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
