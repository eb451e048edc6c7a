"""An independent implementation of the cardsvc wire protocols, written from the specs in protocols/*.md
only, as a terminal or app vendor would (tests/protocols/test_vendor_interop.py checks it against the vectors
and the project's codecs, both ways). Library use is limited to primitives: SM3 (hashlib/OpenSSL), SM4 block cipher
(cryptography), Ed25519 (cryptography). SM2 is implemented here in pure Python (GB/T 32918)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from datetime import date

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# ------------------------------------------------------------------------------------ primitives


def sm3(data: bytes) -> bytes:
    return hashlib.new("sm3", data).digest()


def hmac_sm3(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, "sm3").digest()


def sm4_block(key: bytes, block: bytes) -> bytes:
    assert len(key) == 16 and len(block) == 16
    enc = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()  # one block
    return enc.update(block) + enc.finalize()


# SM2 curve (GB/T 32918.5)
P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0
G = (GX, GY)
DEFAULT_ID = b"1234567812345678"

Point = tuple[int, int] | None


def _add(p1: Point, p2: Point) -> Point:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    x1, y1 = p1
    x2, y2 = p2
    if x1 == x2:
        if (y1 + y2) % P == 0:
            return None
        lam = (3 * x1 * x1 + A) * pow(2 * y1, -1, P) % P
    else:
        lam = (y2 - y1) * pow(x2 - x1, -1, P) % P
    x3 = (lam * lam - x1 - x2) % P
    return x3, (lam * (x1 - x3) - y1) % P


def _mul(k: int, pt: Point) -> Point:
    out: Point = None
    while k:
        if k & 1:
            out = _add(out, pt)
        pt = _add(pt, pt)
        k >>= 1
    return out


def sm2_on_curve(x: int, y: int) -> bool:
    return 0 <= x < P and 0 <= y < P and (y * y - (x * x * x + A * x + B)) % P == 0


def sm2_pub_from_d(d: int) -> bytes:
    pt = _mul(d, G)
    assert pt is not None
    return b"\x04" + pt[0].to_bytes(32, "big") + pt[1].to_bytes(32, "big")


def _za(pub65: bytes, uid: bytes = DEFAULT_ID) -> bytes:
    entl = (len(uid) * 8).to_bytes(2, "big")
    parts = [entl, uid] + [v.to_bytes(32, "big") for v in (A, B, GX, GY)] + [pub65[1:33], pub65[33:65]]
    return sm3(b"".join(parts))


def sm2_sign(d: int, msg: bytes) -> bytes:
    pub = sm2_pub_from_d(d)
    e = int.from_bytes(sm3(_za(pub) + msg), "big")
    while True:
        k = secrets.randbelow(N - 1) + 1
        pt = _mul(k, G)
        assert pt is not None
        r = (e + pt[0]) % N
        if r == 0 or r + k == N:
            continue
        s = pow(1 + d, -1, N) * (k - r * d) % N
        if s:
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sm2_verify(pub65: bytes, sig64: bytes, msg: bytes) -> bool:
    if len(pub65) != 65 or pub65[0] != 4 or len(sig64) != 64:
        return False
    x, y = int.from_bytes(pub65[1:33], "big"), int.from_bytes(pub65[33:], "big")
    if not sm2_on_curve(x, y):
        return False
    r, s = int.from_bytes(sig64[:32], "big"), int.from_bytes(sig64[32:], "big")
    if not (1 <= r < N and 1 <= s < N):
        return False
    e = int.from_bytes(sm3(_za(pub65) + msg), "big")
    t = (r + s) % N
    if t == 0:
        return False
    pt = _add(_mul(s, G), _mul(t, (x, y)))
    if pt is None:
        return False
    return (e + pt[0]) % N == r


def seed_to_sm2_d(seed32: bytes) -> int:
    """ecard.md: d = (SM3("CARDSVC-SM2-SEED-V1" || seed) mod (n - 2)) + 1."""
    return int.from_bytes(sm3(b"CARDSVC-SM2-SEED-V1" + seed32), "big") % (N - 2) + 1


def ed_pub(seed32: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed32).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw
    )


def ed_sign(seed32: bytes, msg: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed32).sign(msg)


def ed_verify(pub32: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(pub32).verify(sig, msg)
    except Exception:
        return False
    return True


_EDP = 2**255 - 19
ED_SMALL_ORDER_Y = {
    0, 1, _EDP - 1, _EDP, _EDP + 1,
    2707385501144840649318225287225658788936804267575313519463743609750303402022,
    55188659117513257062467267217118295137698188065244968500265048394206261417927,
}  # fmt: skip


def ed_small_order(pub32: bytes) -> bool:
    return int.from_bytes(pub32, "little") & ((1 << 255) - 1) in ED_SMALL_ORDER_Y


def b32_nopad(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


def b32_strict_decode(s: str) -> bytes | None:
    if any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" for c in s):
        return None
    try:
        raw = base64.b32decode(s + "=" * (-len(s) % 8))
    except Exception:
        return None
    return raw if b32_nopad(raw) == s else None


# ------------------------------------------------------------------------ card.md key hierarchy


def diversify(parent: bytes, d8: bytes) -> bytes:
    return sm4_block(parent, d8 + bytes(b ^ 0xFF for b in d8))


def card_key(master: bytes, card_sn: str, purpose: int) -> bytes:
    prov = diversify(master, bytes([purpose]) + card_sn[:2].encode() + b"\0" * 5)
    city = diversify(prov, bytes.fromhex(card_sn[:6]) + b"\xff" * 5)
    return diversify(city, bytes.fromhex(card_sn[16:32]))


# ----------------------------------------------------------------------------- transit.md TAC


def terminal_tag(terminal_id: str) -> bytes:
    return sm3(terminal_id.encode("ascii"))[:6]


def tac_input(rec: dict) -> bytes:
    return (
        b"\x01"
        + rec["amount_fen"].to_bytes(4, "big")
        + rec["balance_before_fen"].to_bytes(4, "big")
        + rec["purse_seq"].to_bytes(2, "big")
        + bytes([rec["txn_type"]])
        + terminal_tag(rec["terminal_id"])
        + rec["terminal_seq"].to_bytes(4, "big")
        + rec["txn_time"].to_bytes(4, "big")
    )


def pad_m2(data: bytes) -> bytes:
    data = data + b"\x80"
    return data + b"\0" * (-len(data) % 16)


def cbc_mac(key: bytes, data: bytes) -> bytes:
    h = bytes(16)
    for i in range(0, len(data), 16):
        h = sm4_block(key, bytes(a ^ b for a, b in zip(h, data[i : i + 16], strict=True)))
    return h


def tac(key: bytes, rec: dict) -> str:
    return cbc_mac(key, pad_m2(tac_input(rec)))[:4].hex()


# -------------------------------------------------------------------------------- ecard.md


def ecard_header(alg: int, ecard_id: int, issued_at: int, counter: int) -> bytes:
    return struct.pack(">BBQII", 1, alg, ecard_id, issued_at, counter)


def ecard_sign(alg: int, seed32: bytes, header18: bytes) -> bytes:
    msg = b"CARDSVC-ECARD-CODE-V1" + header18
    return sm2_sign(seed_to_sm2_d(seed32), msg) if alg == 1 else ed_sign(seed32, msg)


def ecard_encode(alg: int, seed32: bytes, ecard_id: int, issued_at: int, counter: int) -> str:
    h = ecard_header(alg, ecard_id, issued_at, counter)
    return "EC1" + b32_nopad(h + ecard_sign(alg, seed32, h))


def ecard_decode(text: str) -> dict | None:
    if len(text) != 135 or not text.startswith("EC1"):
        return None
    raw = b32_strict_decode(text[3:])
    if raw is None or len(raw) != 82:
        return None
    v, alg, eid, at, ctr = struct.unpack(">BBQII", raw[:18])
    if v != 1 or alg not in (1, 2) or not 1 <= eid <= 2**63 - 1:
        return None
    return {"alg": alg, "ecard_id": eid, "issued_at": at, "counter": ctr, "header": raw[:18], "sig": raw[18:]}


def ecard_verify(code: dict, pub: bytes) -> bool:
    msg = b"CARDSVC-ECARD-CODE-V1" + code["header"]
    if code["alg"] == 1:
        return sm2_verify(pub, code["sig"], msg)
    if len(pub) != 32 or ed_small_order(pub):
        return False
    return ed_verify(pub, code["sig"], msg)


# ------------------------------------------------------------------------------ ridecode.md


def cert_tbs(alg: int, key_id: int, serial: int, account: int, vf: int, vt: int, max_fare: int,
             limit: int, user_pub: bytes) -> bytes:  # fmt: skip
    return struct.pack(">BBBQQIIII", 1, alg, key_id, serial, account, vf, vt, max_fare, limit) + user_pub


def issue_cert(issuer_d: int, tbs: bytes) -> bytes:
    return tbs + sm2_sign(issuer_d, b"CARDSVC-RIDE-CERT-V1" + tbs)


def make_ride_code(cert: bytes, alg: int, user_seed: bytes, time_s: int, counter: int,
                   user_sign=None) -> str:  # fmt: skip
    body = cert + struct.pack(">II", time_s, counter)
    msg = b"CARDSVC-RIDE-CODE-V1" + body
    if user_sign is not None:
        sig = user_sign(msg)
    elif alg == 1:
        sig = sm2_sign(seed_to_sm2_d(user_seed), msg)
    else:
        sig = ed_sign(user_seed, msg)
    return "RC1" + b32_nopad(body + sig)


def gate_verify(text: str, issuer_pub: bytes, now: int, deny_serials=(), deny_accounts=(),
                lifetime: int = 60, skew: int = 30) -> str:  # fmt: skip
    """ridecode.md 'Gate verification', each check implemented as the table words it."""
    if len(text) not in (381, 328) or not text.startswith("RC1"):
        return "malformed"
    raw = b32_strict_decode(text[3:])
    if raw is None or len(raw) < 35:
        return "malformed"
    ver, alg, key_id, serial, account, vf, vt, _max_fare, _limit = struct.unpack(">BBBQQIIII", raw[:35])
    if ver != 1 or alg not in (1, 2):
        return "malformed"
    klen = 65 if alg == 1 else 32
    if len(raw) != 35 + klen + 64 + 8 + 64:
        return "malformed"
    if not (1 <= key_id <= 255 and 1 <= serial < 2**63 and 1 <= account < 2**63 and vt >= vf):
        return "malformed"
    upk = raw[35 : 35 + klen]
    if alg == 1 and upk[0] != 4:
        return "malformed"
    cert_len = 35 + klen + 64
    cert = raw[:cert_len]
    if not sm2_verify(issuer_pub, cert[-64:], b"CARDSVC-RIDE-CERT-V1" + cert[:-64]):
        return "bad_issuer_signature"
    t, _counter = struct.unpack(">II", raw[cert_len : cert_len + 8])
    msg = b"CARDSVC-RIDE-CODE-V1" + raw[: cert_len + 8]
    usig = raw[cert_len + 8 :]
    if not (sm2_verify(upk, usig, msg) if alg == 1 else ed_verify(upk, usig, msg)):
        return "bad_user_signature"
    if serial in deny_serials or account in deny_accounts:
        return "denied"
    if not (vf - skew <= now <= vt + skew):
        return "cert_expired"
    if not (t <= now + skew and now - t <= lifetime + skew):
        return "code_expired"
    return "ok"


# ------------------------------------------------------------------------- terminal_auth.md


def canonical_query(q: str) -> str:
    segs = [s for s in q.split("&") if s]
    segs.sort(key=lambda s: (s.split("=", 1)[0], s.split("=", 1)[1] if "=" in s else ""))
    return "&".join(segs)


def sign_request(secret: bytes, method: str, target: str, body: bytes, terminal: str, key_id: str,
                 ts: int, nonce: str) -> dict[str, str]:  # fmt: skip
    path, _, query = target.partition("?")
    lines = ["CARDSVC-HMAC-SM3", method.upper(), path, canonical_query(query), terminal, key_id, str(ts),
             nonce, sm3(body).hex()]  # fmt: skip
    sig = hmac_sm3(secret, "\n".join(lines).encode("utf-8")).hex()
    return {
        "X-Cardsvc-Terminal": terminal,
        "X-Cardsvc-Key-Id": key_id,
        "X-Cardsvc-Timestamp": str(ts),
        "X-Cardsvc-Nonce": nonce,
        "X-Cardsvc-Signature": sig,
    }


# ------------------------------------------------------------------------------- clearing.md


def clearing_write(operator: str, bdate: str, created_at: int, lines: list[dict]) -> bytes:
    total = sum(ln["amount_fen"] for ln in lines)
    out = [f"H|CARDSVC-CLEARING|1|{operator}|{bdate}|{len(lines)}|{total}|{created_at}\n"]
    for i, ln in enumerate(lines, 1):
        out.append(
            f"D|{i}|{ln['txn_id']}|{ln['card_id']}|{ln['source']}|{ln['amount_fen']}|{ln['txn_time']}|"
            f"{ln['line_id']}|{ln['station_id']}\n"
        )
    body = "".join(out).encode("ascii")
    return body + f"T|{len(lines)}|{sm3(body).hex()}\n".encode("ascii")


def yyyymmdd(d: date) -> str:
    return d.strftime("%Y%m%d")
