"""Thin, typed wrappers over the national commercial algorithms (SM2, SM3, SM4) and Ed25519.

Pure functions, no I/O. SM2 signatures follow GB/T 32918.2 with SM3 and the default user ID
``1234567812345678`` (what Tongsuo computes; checked against an independent implementation). Our wire
form of an SM2 signature is RAW ``r || s`` (2 x 32 bytes big-endian), not DER.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections import OrderedDict
from typing import Any

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tongsuopy.crypto import hashes as _ts_hashes
from tongsuopy.crypto import serialization as _ts_serialization
from tongsuopy.crypto.asymciphers import ec as _ts_ec
from tongsuopy.crypto.exceptions import InvalidSignature as _TsInvalidSignature

from protocols.errors import AlgorithmUnknown, CiphertextInvalid, CodecError, KeyInvalid

__all__ = [
    "ALGORITHMS",
    "ALG_ED25519",
    "ALG_SM2_SM3",
    "ED25519_PUBLIC_KEY_LEN_BYTES",
    "ED25519_SEED_LEN_BYTES",
    "ED25519_SIGNATURE_LEN_BYTES",
    "SM2_CURVE_ORDER",
    "SM2_DEFAULT_USER_ID",
    "SM2_PRIVATE_KEY_LEN_BYTES",
    "SM2_PUBLIC_KEY_LEN_BYTES",
    "SM2_SIGNATURE_LEN_BYTES",
    "SM3_DIGEST_LEN_BYTES",
    "SM4_BLOCK_LEN_BYTES",
    "SM4_GCM_NONCE_LEN_BYTES",
    "SM4_GCM_TAG_LEN_BYTES",
    "SM4_KEY_LEN_BYTES",
    "Ed25519PrivateKey",
    "Sm2PrivateKey",
    "Sm2PublicKey",
    "Sm4Ecb",
    "ed25519_from_seed",
    "ed25519_generate",
    "ed25519_public_bytes",
    "ed25519_sign",
    "ed25519_small_order",
    "ed25519_verify",
    "hmac_sm3",
    "private_key_from_seed",
    "public_key_bytes",
    "public_key_length",
    "sign",
    "signature_length",
    "sm2_der_to_raw",
    "sm2_from_scalar",
    "sm2_generate",
    "sm2_load_public",
    "sm2_public_bytes",
    "sm2_raw_to_der",
    "sm2_scalar_bytes",
    "sm2_sign_raw",
    "sm2_verify_raw",
    "sm3",
    "sm4_cbc_last_block",
    "sm4_encrypt_block",
    "sm4_gcm_decrypt",
    "sm4_gcm_encrypt",
    "validate_public_key",
    "verify",
]

SM3_DIGEST_LEN_BYTES = 32
SM4_KEY_LEN_BYTES = 16
SM4_BLOCK_LEN_BYTES = 16
SM4_GCM_NONCE_LEN_BYTES = 12
SM4_GCM_TAG_LEN_BYTES = 16
SM2_PRIVATE_KEY_LEN_BYTES = 32
SM2_PUBLIC_KEY_LEN_BYTES = 65
SM2_SIGNATURE_LEN_BYTES = 64
ED25519_SEED_LEN_BYTES = 32
ED25519_PUBLIC_KEY_LEN_BYTES = 32
ED25519_SIGNATURE_LEN_BYTES = 64
SM2_DEFAULT_USER_ID = b"1234567812345678"
SM2_CURVE_ORDER = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
SM4_ECB_CACHE_KEYS_MAX = 64

ALG_SM2_SM3 = 1
ALG_ED25519 = 2
ALGORITHMS: frozenset[int] = frozenset({ALG_SM2_SM3, ALG_ED25519})

Ed25519PrivateKey = ed25519.Ed25519PrivateKey


# ---------------------------------------------------------------------------------------------- SM3


def sm3(data: bytes) -> bytes:
    """SM3 digest (32 bytes)."""
    return hashlib.new("sm3", data).digest()


def hmac_sm3(key: bytes, data: bytes) -> bytes:
    """HMAC-SM3 (32 bytes)."""
    return hmac.new(key, data, "sm3").digest()


# ---------------------------------------------------------------------------------------------- SM4


def _check_key16(key16: bytes) -> None:
    if not isinstance(key16, bytes | bytearray) or len(key16) != SM4_KEY_LEN_BYTES:
        raise KeyInvalid("key_invalid", "an SM4 key is 16 bytes")


class Sm4Ecb:
    """SM4-ECB encryption of single 16-byte blocks with a reused context (~0.4 us per block).

    Not thread-safe: use one instance per thread (the module-level function is locked)."""

    __slots__ = ("_ctx",)

    def __init__(self, key16: bytes) -> None:
        _check_key16(key16)
        self._ctx = Cipher(algorithms.SM4(bytes(key16)), modes.ECB()).encryptor()  # noqa: S305 - one block

    def encrypt_block(self, block16: bytes) -> bytes:
        if len(block16) != SM4_BLOCK_LEN_BYTES:
            raise CodecError("block_invalid", "an SM4 block is 16 bytes")
        return self._ctx.update(bytes(block16))


_ecb_cache: OrderedDict[bytes, Sm4Ecb] = OrderedDict()
_ecb_lock = threading.Lock()


def sm4_cbc_last_block(key16: bytes, data: bytes) -> bytes:
    """The last block of SM4-CBC encryption with a zero IV of `data` (a whole number of blocks): the
    CBC-MAC of already padded data, in one call into OpenSSL (no Python loop over blocks)."""
    _check_key16(key16)
    if not data or len(data) % SM4_BLOCK_LEN_BYTES:
        raise CodecError("block_invalid", "CBC-MAC input is a non-empty whole number of 16-byte blocks")
    enc = Cipher(algorithms.SM4(bytes(key16)), modes.CBC(bytes(SM4_BLOCK_LEN_BYTES))).encryptor()
    return enc.update(bytes(data))[-SM4_BLOCK_LEN_BYTES:]


def sm4_encrypt_block(key16: bytes, block16: bytes) -> bytes:
    """SM4-ECB encryption of one 16-byte block. Contexts for the last few keys are cached (thread-safe)."""
    key = bytes(key16)
    with _ecb_lock:
        ecb = _ecb_cache.get(key)
        if ecb is None:
            ecb = Sm4Ecb(key)
            _ecb_cache[key] = ecb
            if len(_ecb_cache) > SM4_ECB_CACHE_KEYS_MAX:
                _ecb_cache.popitem(last=False)
        else:
            _ecb_cache.move_to_end(key)
        return ecb.encrypt_block(block16)


def sm4_gcm_encrypt(key16: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """SM4-GCM: returns nonce (12 random bytes) || ciphertext || tag (16 bytes)."""
    _check_key16(key16)
    nonce = os.urandom(SM4_GCM_NONCE_LEN_BYTES)
    enc = Cipher(algorithms.SM4(bytes(key16)), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(aad)
    ct = enc.update(plaintext) + enc.finalize()
    return nonce + ct + enc.tag


def sm4_gcm_decrypt(key16: bytes, blob: bytes, aad: bytes = b"") -> bytes:
    """Inverse of :func:`sm4_gcm_encrypt`; CodecError ``ciphertext_invalid`` on any failure."""
    _check_key16(key16)
    if not isinstance(blob, bytes | bytearray) or len(blob) < SM4_GCM_NONCE_LEN_BYTES + SM4_GCM_TAG_LEN_BYTES:
        raise CiphertextInvalid("ciphertext_invalid", "ciphertext too short")
    blob = bytes(blob)
    nonce = blob[:SM4_GCM_NONCE_LEN_BYTES]
    tag = blob[-SM4_GCM_TAG_LEN_BYTES:]
    ct = blob[SM4_GCM_NONCE_LEN_BYTES:-SM4_GCM_TAG_LEN_BYTES]
    try:
        dec = Cipher(algorithms.SM4(bytes(key16)), modes.GCM(nonce, tag)).decryptor()
        dec.authenticate_additional_data(aad)
        return dec.update(ct) + dec.finalize()
    except (InvalidTag, ValueError) as exc:
        raise CiphertextInvalid("ciphertext_invalid", "ciphertext failed authentication") from exc


# ---------------------------------------------------------------------------------------------- SM2


def sm2_der_to_raw(der: bytes) -> bytes:
    """DER ECDSA-Sig-Value -> raw r||s (64 bytes). Rejects out-of-range values."""
    try:
        r, s = decode_dss_signature(der)
    except ValueError as exc:
        raise CodecError("signature_invalid", "bad DER signature") from exc
    if not (1 <= r < SM2_CURVE_ORDER and 1 <= s < SM2_CURVE_ORDER):
        raise CodecError("signature_invalid", "signature value out of range")
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sm2_raw_to_der(raw64: bytes) -> bytes:
    """Raw r||s (64 bytes) -> DER. Rejects wrong length and r or s outside [1, n-1]."""
    if not isinstance(raw64, bytes | bytearray) or len(raw64) != SM2_SIGNATURE_LEN_BYTES:
        raise CodecError("signature_invalid", "an SM2 signature is 64 bytes")
    r = int.from_bytes(raw64[:32], "big")
    s = int.from_bytes(raw64[32:], "big")
    if not (1 <= r < SM2_CURVE_ORDER and 1 <= s < SM2_CURVE_ORDER):
        raise CodecError("signature_invalid", "signature value out of range")
    return encode_dss_signature(r, s)


class Sm2PublicKey:
    """An SM2 public key (wraps the Tongsuo object)."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: Any, raw65: bytes) -> None:
        self._key = key
        self._raw = raw65

    def public_bytes(self) -> bytes:
        """Uncompressed point 0x04 || X || Y (65 bytes)."""
        return self._raw

    def verify_raw(self, sig64: bytes, msg: bytes) -> bool:
        try:
            der = sm2_raw_to_der(sig64)
        except CodecError:
            return False
        try:
            self._key.verify(der, bytes(msg), _ts_ec.ECDSA(_ts_hashes.SM3()))
        except _TsInvalidSignature:
            return False
        return True


class Sm2PrivateKey:
    """An SM2 private key (wraps the Tongsuo object)."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: Any) -> None:
        self._key = key
        pub = key.public_key()
        raw = bytes(
            pub.public_bytes(
                _ts_serialization.Encoding.X962, _ts_serialization.PublicFormat.UncompressedPoint
            )
        )
        self._public = Sm2PublicKey(pub, raw)

    def public_key(self) -> Sm2PublicKey:
        return self._public

    def scalar_bytes(self) -> bytes:
        value: int = self._key.private_numbers().private_value
        return value.to_bytes(SM2_PRIVATE_KEY_LEN_BYTES, "big")

    def sign_raw(self, msg: bytes) -> bytes:
        der = bytes(self._key.sign(bytes(msg), _ts_ec.ECDSA(_ts_hashes.SM3())))
        return sm2_der_to_raw(der)


def sm2_generate() -> Sm2PrivateKey:
    return Sm2PrivateKey(_ts_ec.generate_private_key(_ts_ec.SM2()))


def sm2_from_scalar(scalar32: bytes) -> Sm2PrivateKey:
    """Private key from a 32-byte big-endian scalar d, 1 <= d <= n-2 (KeyInvalid ``private_key_invalid``)."""
    if not isinstance(scalar32, bytes | bytearray) or len(scalar32) != SM2_PRIVATE_KEY_LEN_BYTES:
        raise KeyInvalid("private_key_invalid", "an SM2 private key is 32 bytes")
    d = int.from_bytes(scalar32, "big")
    if not 1 <= d <= SM2_CURVE_ORDER - 2:
        raise KeyInvalid("private_key_invalid", "SM2 private key out of range")
    return Sm2PrivateKey(_ts_ec.derive_private_key(d, _ts_ec.SM2()))


def sm2_scalar_bytes(priv: Sm2PrivateKey) -> bytes:
    return priv.scalar_bytes()


def sm2_public_bytes(priv: Sm2PrivateKey) -> bytes:
    return priv.public_key().public_bytes()


def sm2_sign_raw(priv: Sm2PrivateKey, msg: bytes) -> bytes:
    return priv.sign_raw(msg)


def sm2_load_public(b65: bytes) -> Sm2PublicKey:
    """Load an uncompressed SM2 point; KeyInvalid ``public_key_invalid`` if it is not on the curve."""
    if not isinstance(b65, bytes | bytearray) or len(b65) != SM2_PUBLIC_KEY_LEN_BYTES or b65[0] != 0x04:
        raise KeyInvalid("public_key_invalid", "an SM2 public key is 65 bytes 0x04||X||Y")
    try:
        key = _ts_ec.EllipticCurvePublicKey.from_encoded_point(_ts_ec.SM2(), bytes(b65))
    except Exception as exc:  # Tongsuo raises ValueError or its own errors for bad points
        raise KeyInvalid("public_key_invalid", "not a point on SM2") from exc
    return Sm2PublicKey(key, bytes(b65))


def sm2_verify_raw(pub: Sm2PublicKey, sig64: bytes, msg: bytes) -> bool:
    """True iff ``sig64`` is a valid raw SM2 signature of ``msg``; never raises on a bad signature."""
    return pub.verify_raw(sig64, msg)


# ------------------------------------------------------------------------------------------ Ed25519


def ed25519_generate() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def ed25519_from_seed(seed32: bytes) -> ed25519.Ed25519PrivateKey:
    if not isinstance(seed32, bytes | bytearray) or len(seed32) != ED25519_SEED_LEN_BYTES:
        raise KeyInvalid("private_key_invalid", "an Ed25519 seed is 32 bytes")
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(seed32))


def ed25519_public_bytes(priv: ed25519.Ed25519PrivateKey) -> bytes:
    return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_sign(priv: ed25519.Ed25519PrivateKey, msg: bytes) -> bytes:
    return priv.sign(bytes(msg))


_ED25519_P = 2**255 - 19
# The y coordinates (as encoded: 255 bits, little-endian, the sign bit of x aside) of the 8 points of small
# order on edwards25519, canonical and not: 1 (the identity) and p + 1, p - 1 (order 2), 0 and p (order 4),
# and the two of order 8. A public key among them makes signatures forgeable without any private key:
# with R the identity and S = 0 a signature verifies for every message (OpenSSL's verification, like RFC
# 8032's cofactorless one, does not refuse such keys). The same list as libsodium's.
_ED25519_SMALL_ORDER_Y = frozenset(
    {
        0,
        1,
        _ED25519_P - 1,
        _ED25519_P,
        _ED25519_P + 1,
        2707385501144840649318225287225658788936804267575313519463743609750303402022,
        55188659117513257062467267217118295137698188065244968500265048394206261417927,
    }
)


def ed25519_small_order(pub32: bytes) -> bool:
    """True if the 32-byte encoding is one of a point of small order (whatever its sign bit)."""
    return int.from_bytes(pub32, "little") & ((1 << 255) - 1) in _ED25519_SMALL_ORDER_Y


def _ed25519_load(pub32: bytes) -> ed25519.Ed25519PublicKey:
    if not isinstance(pub32, bytes | bytearray) or len(pub32) != ED25519_PUBLIC_KEY_LEN_BYTES:
        raise KeyInvalid("public_key_invalid", "an Ed25519 public key is 32 bytes")
    if ed25519_small_order(pub32):
        raise KeyInvalid("public_key_invalid", "an Ed25519 public key of small order")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes(pub32))
    except ValueError as exc:
        raise KeyInvalid("public_key_invalid", "bad Ed25519 public key") from exc


def ed25519_verify(pub32: bytes, sig64: bytes, msg: bytes) -> bool:
    """True iff valid. Raises KeyInvalid only for a malformed public key; never on a bad signature."""
    key = _ed25519_load(pub32)
    if not isinstance(sig64, bytes | bytearray) or len(sig64) != ED25519_SIGNATURE_LEN_BYTES:
        return False
    try:
        key.verify(bytes(sig64), bytes(msg))
    except _CryptoInvalidSignature:
        return False
    return True


# ---------------------------------------------------------------------------------------- registry

_PUBLIC_KEY_LEN = {ALG_SM2_SM3: SM2_PUBLIC_KEY_LEN_BYTES, ALG_ED25519: ED25519_PUBLIC_KEY_LEN_BYTES}
_SIGNATURE_LEN = {ALG_SM2_SM3: SM2_SIGNATURE_LEN_BYTES, ALG_ED25519: ED25519_SIGNATURE_LEN_BYTES}
_SEED_DOMAIN_SM2 = b"CARDSVC-SM2-SEED-V1"


def _check_alg(alg: int) -> int:
    if type(alg) is not int or alg not in ALGORITHMS:
        raise AlgorithmUnknown("algorithm_unknown", f"unknown signature algorithm {alg!r}")
    return alg


def public_key_length(alg: int) -> int:
    return _PUBLIC_KEY_LEN[_check_alg(alg)]


def signature_length(alg: int) -> int:
    return _SIGNATURE_LEN[_check_alg(alg)]


def validate_public_key(alg: int, public_key_bytes: bytes) -> bytes:
    """Checks a public key for ``alg`` (length and point); KeyInvalid ``public_key_invalid``."""
    if _check_alg(alg) == ALG_SM2_SM3:
        sm2_load_public(public_key_bytes)
    else:
        _ed25519_load(public_key_bytes)
    return bytes(public_key_bytes)


def verify(alg: int, public_key_bytes: bytes, sig: bytes, msg: bytes) -> bool:
    """Verify ``sig`` over ``msg``. False for a bad signature; CodecError for an unknown alg or bad key."""
    if _check_alg(alg) == ALG_SM2_SM3:
        return sm2_load_public(public_key_bytes).verify_raw(sig, msg)
    return ed25519_verify(public_key_bytes, sig, msg)


def private_key_from_seed(alg: int, seed32: bytes) -> Sm2PrivateKey | ed25519.Ed25519PrivateKey:
    """Deterministic private key from a 32-byte seed (test vectors, load tests, demo data).

    Ed25519: the seed is the RFC 8032 private key. SM2: d = (SM3("CARDSVC-SM2-SEED-V1" || seed) mod
    (n - 2)) + 1, so 1 <= d <= n - 2.
    """
    if not isinstance(seed32, bytes | bytearray) or len(seed32) != 32:
        raise KeyInvalid("private_key_invalid", "a seed is 32 bytes")
    if _check_alg(alg) == ALG_ED25519:
        return ed25519_from_seed(seed32)
    d = int.from_bytes(sm3(_SEED_DOMAIN_SM2 + bytes(seed32)), "big") % (SM2_CURVE_ORDER - 2) + 1
    return sm2_from_scalar(d.to_bytes(32, "big"))


def public_key_bytes(priv: Sm2PrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    if isinstance(priv, Sm2PrivateKey):
        return priv.public_key().public_bytes()
    return ed25519_public_bytes(priv)


def sign(priv: Sm2PrivateKey | ed25519.Ed25519PrivateKey, msg: bytes) -> bytes:
    """Raw 64-byte signature with whichever algorithm the key belongs to."""
    if isinstance(priv, Sm2PrivateKey):
        return priv.sign_raw(msg)
    return ed25519_sign(priv, msg)
