"""Regenerate protocols/vectors/*.json: ``python -m protocols.vectors.generate``.

Everything is deterministic except SM2 signatures (randomised by the algorithm): an SM2 signature already
stored in a file is kept if it still verifies, so regeneration is idempotent.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

from protocols import card, clearing, ecard, hotlist, idnumber, ridecode, sm, terminal_auth, transit
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
            1_000_001,
        ),
        hotlist.HotlistEntry(
            105,
            "500100D1560000050123456789ABCDEF",
            card.HotlistAction.BLOCK,
            card.HotlistReason.FORMAL_LOSS,
            1_767_225_700,
            1_000_002,
        ),
        hotlist.HotlistEntry(
            107,
            "411600D156000005C38275EEFC9B9648",
            card.HotlistAction.UNBLOCK,
            card.HotlistReason.LOSS_LIFTED,
            1_767_226_000,
            1_000_001,
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
        "replica_after": {
            "version": 107,
            "blocked": ["500100D1560000050123456789ABCDEF"],
            "blocked_accounts": [1_000_002],
        },
    }


def _terminal_auth() -> Vectors:
    secret = bytes(range(32))
    cases = [
        ("POST", "/v1/cards/auth", b'{"card_sn":"411600D156000005C38275EEFC9B9648"}'),
        ("get", "/v1/hotlist?since=100&limit=500&b=%20b&a=1", b""),
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


TRANSIT_TERMINAL = "T-0001.bus_7"
TRANSIT_GATE = "G-0042.metro_3"
TRANSIT_T0 = 1_767_225_600


def _tac_vector(key: bytes, r: transit.OfflineRecord) -> dict[str, Any]:
    data = transit.tac_input(r)
    return {
        "record": transit.record_to_dict(r),
        "terminal_tag": transit.terminal_tag(r.terminal_id).hex(),
        "tac_input": data.hex(),
        "padded": transit.iso9797_pad_method2(data).hex(),
        "cbc_mac": transit.sm4_cbc_mac(key, data).hex(),
        "tac": transit.compute_tac(key, r).hex(),
    }


def _transit() -> Vectors:
    sn = CARD_SNS[0]
    key = card.derive_card_key(CARD_MASTER_TAC, sn, card.KEY_PURPOSE_TAC)
    purse = transit.PurseCard(sn, master_key=CARD_MASTER_TAC, balance_fen=1000, overdraft_fen=500)
    t = TRANSIT_T0
    records = [
        purse.debit(180, TRANSIT_TERMINAL, 1, t, line_id="B401", station_id="", hotlist_version=107),
        purse.debit(
            0,
            TRANSIT_TERMINAL,
            2,
            t + 600,
            line_id="M3",
            station_id="S12",
            direction="in",
            hotlist_version=107,
        ),
        purse.debit(
            500,
            TRANSIT_TERMINAL,
            3,
            t + 1800,
            line_id="M3",
            station_id="S20",
            direction="out",
            hotlist_version=107,
        ),
        purse.debit(700, TRANSIT_TERMINAL, 4, t + 3600, line_id="B401", hotlist_version=108),  # overdraft
    ]
    wrap = transit.PurseCard(CARD_SNS[1], master_key=CARD_MASTER_TAC, balance_fen=300, purse_seq=65535)
    wrapped = wrap.debit(200, TRANSIT_TERMINAL, 5, t + 7200, line_id="B401")
    good = transit.record_to_dict(records[0])
    malformed: list[dict[str, Any]] = [
        {"change": {"purse_seq": 65536}, "field": "purse_seq"},
        {"change": {"amount_fen": -1}, "field": "amount_fen"},
        {"change": {"amount_fen": True}, "field": "amount_fen"},
        {"change": {"tac": "1234567"}, "field": "tac"},
        {"change": {"tac": "1234567g"}, "field": "tac"},
        {"change": {"card_sn": sn.lower()}, "field": "card_sn"},
        {"change": {"txn_type": 7}, "field": "txn_type"},
        {"change": {"direction": "in"}, "field": "txn_type"},
        {"change": {"terminal_id": "T 1"}, "field": "terminal_id"},
        {"change": {"line_id": ""}, "field": "line_id"},
        {"change": {"extra": 1}, "field": "extra"},
    ]
    lines = [
        clearing.ClearingLine(1001, 5, clearing.ClearingSource.PURSE, 180, t, "B401", ""),
        clearing.ClearingLine(1002, 5, clearing.ClearingSource.PURSE, 500, t + 1800, "M3", "S20"),
        clearing.ClearingLine(1005, 77, clearing.ClearingSource.RIDE_CODE, 200, t + 1900, "M3", "S20"),
    ]
    header = clearing.make_header("CQMETRO", date(2026, 1, 1), t + 86_400 + 3600, lines)
    # Version 2: the next day's file, with a fare and two corrections (one of a fare of the day before).
    t2 = t + 86_400
    lines2: list[clearing.DetailLine] = [
        clearing.ClearingLine(1010, 5, clearing.ClearingSource.PURSE, 300, t2 + 600, "M3", "S21"),
        clearing.ClearingCorrection(
            1011, 5, clearing.ClearingSource.PURSE, 320, t2 + 700, "M3", "S20", 1002,
            clearing.CorrectionReason.LATE_ENTRY,
        ),
        clearing.ClearingCorrection(
            1012, 77, clearing.ClearingSource.RIDE_CODE, 200, t2 + 800, "M3", "S20", 1005,
            clearing.CorrectionReason.TERMINAL_FAULT,
        ),
    ]  # fmt: skip
    header2 = clearing.make_header("CQMETRO", date(2026, 1, 2), t2 + 86_400 + 3600, lines2)
    return {
        "description": "Transit purse TAC (transit.md), upload batch, purse_seq arithmetic, clearing file (clearing.md)",
        "master_key": CARD_MASTER_TAC.hex(),
        "card_sn": sn,
        "tac_key": key.hex(),
        "initial_balance_fen": 1000,
        "overdraft_fen": 500,
        "records": [_tac_vector(key, r) for r in records],
        "wrap": {
            "card_sn": CARD_SNS[1],
            "tac_key": wrap.tac_key.hex(),
            "purse_seq_before": 65535,
            **_tac_vector(wrap.tac_key, wrapped),
        },
        "batch": transit.batch_to_dict(transit.OfflineBatch(TRANSIT_TERMINAL, 1, records)),
        "malformed_records": [{"record": {**good, **m["change"]}, "field": m["field"]} for m in malformed],
        "purse_seq": [
            {
                "last": last,
                "seq": seq,
                "delta": transit.purse_seq_delta(last, seq),
                "last_ext": ext,
                "extended": transit.extend_purse_seq(ext, seq),
            }
            for last, seq, ext in (
                (5, 6, 5),
                (5, 9, 5),
                (5, 5, 5),
                (5, 3, 5),
                (65535, 0, 65535),
                (65534, 2, 131070),
                (1, 65535, 65537),
            )
        ],
        "clearing_file": {
            "text": clearing.write_clearing_file(header, lines).decode("ascii"),
            "header": {
                "operator_id": header.operator_id,
                "business_date": "20260101",
                "record_count": header.record_count,
                "total_fen": header.total_fen,
                "created_at": header.created_at,
            },
            "lines": [_clearing_line(ln) for ln in lines],
        },
        "clearing_file_v2": {
            "text": clearing.write_clearing_file(header2, lines2).decode("ascii"),
            "header": {
                "operator_id": header2.operator_id,
                "business_date": "20260102",
                "record_count": header2.record_count,
                "total_fen": header2.total_fen,
                "created_at": header2.created_at,
                "correction_count": header2.correction_count,
                "correction_fen": header2.correction_fen,
                "net_fen": header2.net_fen,
            },
            "lines": [
                {"type": "C" if isinstance(ln, clearing.ClearingCorrection) else "D", **_clearing_line(ln)}
                for ln in lines2
            ],
        },
    }


def _clearing_line(ln: clearing.DetailLine) -> dict[str, Any]:
    out: dict[str, Any] = {
        "txn_id": ln.txn_id,
        "card_id": ln.card_id,
        "source": ln.source.value,
        "amount_fen": ln.amount_fen,
        "txn_time": ln.txn_time,
        "line_id": ln.line_id,
        "station_id": ln.station_id,
    }
    if isinstance(ln, clearing.ClearingCorrection):
        out |= {"corrects_txn_id": ln.corrects_txn_id, "reason": ln.reason.value}
    return out


RIDE_ISSUER_SEED = bytes([0x11] * 32)
RIDE_USER_SEEDS = {sm.ALG_SM2_SM3: bytes([0x22] * 32), sm.ALG_ED25519: bytes([0x33] * 32)}


def _ridecode(existing: Vectors | None) -> Vectors:
    issuer = sm.private_key_from_seed(sm.ALG_SM2_SM3, RIDE_ISSUER_SEED)
    assert isinstance(issuer, sm.Sm2PrivateKey)
    issuer_pub = sm.public_key_bytes(issuer)
    t = TRANSIT_T0
    out: list[dict[str, Any]] = []
    for idx, alg in enumerate(sorted(RIDE_USER_SEEDS)):
        user = sm.private_key_from_seed(alg, RIDE_USER_SEEDS[alg])
        unsigned = ridecode.RideCert(
            ridecode.CERT_VERSION,
            alg,
            1,
            9_000_001 + idx,
            5 + idx,
            t - 86_400,
            t + 30 * 86_400,
            700,
            5000,
            sm.public_key_bytes(user),
            b"",
        )
        cert_msg = ridecode.cert_signed_bytes(unsigned)
        isig = _keep_sm2_signature(existing, ["codes", idx, "issuer_signature"], issuer_pub, cert_msg)
        cert = dataclasses.replace(unsigned, issuer_signature=isig or issuer.sign_raw(cert_msg))
        phone = ridecode.RidePhone(cert, user, counter=41)
        code = phone.make_code(t, 42)
        code_msg = ridecode.code_signed_bytes(code)
        if alg == sm.ALG_SM2_SM3:
            usig = _keep_sm2_signature(
                existing, ["codes", idx, "user_signature"], cert.user_public_key, code_msg
            )
            if usig is not None:
                code = dataclasses.replace(code, signature=usig)
        out.append(
            {
                "alg": alg,
                "user_seed": RIDE_USER_SEEDS[alg].hex(),
                "user_public_key": cert.user_public_key.hex(),
                "cert": {
                    "issuer_key_id": cert.issuer_key_id,
                    "cert_serial": cert.cert_serial,
                    "account_id": cert.account_id,
                    "valid_from": cert.valid_from,
                    "valid_to": cert.valid_to,
                    "max_fare_fen": cert.max_fare_fen,
                    "credit_limit_fen": cert.credit_limit_fen,
                },
                "cert_signed_bytes": cert_msg.hex(),
                "issuer_signature": cert.issuer_signature.hex(),
                "cert_bytes": ridecode.encode_cert(cert).hex(),
                "time": code.time,
                "counter": code.counter,
                "code_signed_bytes": code_msg.hex(),
                "user_signature": code.signature.hex(),
                "code_bytes": ridecode.code_to_bytes(code).hex(),
                "text": ridecode.encode_code(code),
            }
        )
    text = out[0]["text"]
    raw = bytes.fromhex(out[0]["code_bytes"])

    def _flip(pos: int) -> str:
        b = bytearray(raw)
        b[pos] ^= 0x01
        return ridecode.CODE_TEXT_PREFIX + base64.b32encode(bytes(b)).decode("ascii").rstrip("=")

    c0 = out[0]["cert"]
    gate = [
        {"text": text, "now": t + 10, "outcome": "ok"},
        {"text": out[1]["text"], "now": t - 30, "outcome": "ok"},
        {"text": text, "now": t + 91, "outcome": "code_expired"},
        {"text": text, "now": t - 31, "outcome": "code_expired"},
        {"text": text, "now": c0["valid_to"] + 31, "outcome": "cert_expired"},
        {"text": text, "now": t + 10, "deny_serials": [c0["cert_serial"]], "outcome": "denied"},
        {"text": text, "now": t + 10, "deny_accounts": [c0["account_id"]], "outcome": "denied"},
        {
            "text": text,
            "now": t + 10,
            "issuer_public_key": out[0]["user_public_key"],
            "outcome": "bad_issuer_signature",
        },
        {"text": _flip(27), "now": t + 10, "outcome": "bad_issuer_signature"},  # max_fare_fen changed
        {"text": _flip(len(raw) - 1), "now": t + 10, "outcome": "bad_user_signature"},
        {"text": _flip(len(raw) - 70), "now": t + 10, "outcome": "bad_user_signature"},  # counter changed
        {"text": text[:-1], "now": t + 10, "outcome": "malformed"},
        {"text": text.lower(), "now": t + 10, "outcome": "malformed"},
        {"text": "RC2" + text[3:], "now": t + 10, "outcome": "malformed"},
        {"text": _flip(1), "now": t + 10, "outcome": "malformed"},  # alg 1 -> 0
    ]
    record = ridecode.RideRecord(text, TRANSIT_GATE, 17, "M3", "S12", "in", t + 12, 108)
    return {
        "description": "Ride codes (ridecode.md). SM2 signatures are randomised: any valid one is fine",
        "issuer_seed": RIDE_ISSUER_SEED.hex(),
        "issuer_public_key": issuer_pub.hex(),
        "lifetime_s": ridecode.CODE_LIFETIME_S_DEFAULT,
        "skew_s": ridecode.CODE_SKEW_S_DEFAULT,
        "codes": out,
        "gate": gate,
        "ride_batch": ridecode.ride_batch_to_dict(ridecode.RideBatch(TRANSIT_GATE, 3, [record])),
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
        "transit": _transit(),
        "ridecode": _ridecode(existing.get("ridecode")),
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
