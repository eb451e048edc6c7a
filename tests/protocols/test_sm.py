from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import sm
from protocols.errors import CodecError


def test_sm3_standard_vector() -> None:
    assert sm.sm3(b"abc").hex() == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"


def test_sm4_standard_vector() -> None:
    k = bytes.fromhex("0123456789abcdeffedcba9876543210")
    assert sm.sm4_encrypt_block(k, k).hex() == "681edf34d206965e86b3e94f536e4246"
    assert sm.Sm4Ecb(k).encrypt_block(k).hex() == "681edf34d206965e86b3e94f536e4246"


def test_sm4_cache_is_bounded_and_correct() -> None:
    keys = [os.urandom(16) for _ in range(sm.SM4_ECB_CACHE_KEYS_MAX + 10)]
    first = [sm.sm4_encrypt_block(k, b"\x00" * 16) for k in keys]
    assert [sm.sm4_encrypt_block(k, b"\x00" * 16) for k in keys] == first
    assert len(sm._ecb_cache) <= sm.SM4_ECB_CACHE_KEYS_MAX


def test_sm4_bad_sizes() -> None:
    with pytest.raises(CodecError):
        sm.sm4_encrypt_block(b"short", b"\x00" * 16)
    with pytest.raises(CodecError):
        sm.sm4_encrypt_block(b"k" * 16, b"\x00" * 15)


@settings(max_examples=50)
@given(st.binary(max_size=200), st.binary(max_size=40))
def test_gcm_round_trip(plaintext: bytes, aad: bytes) -> None:
    key = b"K" * 16
    blob = sm.sm4_gcm_encrypt(key, plaintext, aad)
    assert len(blob) == len(plaintext) + 28
    assert sm.sm4_gcm_decrypt(key, blob, aad) == plaintext


def test_gcm_tamper_refused() -> None:
    key = b"K" * 16
    blob = sm.sm4_gcm_encrypt(key, b"110105194912310021", b"id_number")
    for i in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CodecError) as ei:
            sm.sm4_gcm_decrypt(key, bytes(bad), b"id_number")
        assert ei.value.code == "ciphertext_invalid"
    with pytest.raises(CodecError):
        sm.sm4_gcm_decrypt(key, blob, b"name")
    with pytest.raises(CodecError):
        sm.sm4_gcm_decrypt(b"L" * 16, blob, b"id_number")
    with pytest.raises(CodecError):
        sm.sm4_gcm_decrypt(key, blob[:27])


@settings(max_examples=30)
@given(st.binary(max_size=100))
def test_gcm_decrypt_garbage_only_codec_error(blob: bytes) -> None:
    with pytest.raises(CodecError):
        sm.sm4_gcm_decrypt(b"K" * 16, blob)


def test_sm2_sign_verify_and_keys() -> None:
    priv = sm.sm2_generate()
    scalar = sm.sm2_scalar_bytes(priv)
    again = sm.sm2_from_scalar(scalar)
    pub = sm.sm2_public_bytes(priv)
    assert len(pub) == 65 and pub[0] == 4
    assert sm.sm2_public_bytes(again) == pub
    sig = sm.sm2_sign_raw(priv, b"msg")
    assert len(sig) == 64
    loaded = sm.sm2_load_public(pub)
    assert sm.sm2_verify_raw(loaded, sig, b"msg")
    assert not sm.sm2_verify_raw(loaded, sig, b"msh")
    assert sm.verify(sm.ALG_SM2_SM3, pub, sig, b"msg")
    other = sm.sm2_public_bytes(sm.sm2_generate())
    assert not sm.verify(sm.ALG_SM2_SM3, other, sig, b"msg")


def test_sm2_raw_der_round_trip_and_ranges() -> None:
    priv = sm.sm2_from_scalar((7).to_bytes(32, "big"))
    sig = priv.sign_raw(b"x")
    assert sm.sm2_der_to_raw(sm.sm2_raw_to_der(sig)) == sig
    n = sm.SM2_CURVE_ORDER
    for r, s in [(0, 1), (1, 0), (n, 1), (1, n), (2**256 - 1, 1)]:
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        with pytest.raises(CodecError):
            sm.sm2_raw_to_der(raw)
        assert not sm.sm2_verify_raw(priv.public_key(), raw, b"x")
    assert not sm.sm2_verify_raw(priv.public_key(), sig[:63], b"x")
    assert not sm.sm2_verify_raw(priv.public_key(), sig + b"\x00", b"x")
    with pytest.raises(CodecError):
        sm.sm2_der_to_raw(b"\x30\x00garbage")


def test_sm2_non_canonical_s_refused() -> None:
    # r||(s+n) would not fit / is out of range; r||(n-s) is a different (invalid) signature for SM2
    priv = sm.sm2_from_scalar((11).to_bytes(32, "big"))
    sig = priv.sign_raw(b"x")
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    alt = r.to_bytes(32, "big") + (sm.SM2_CURVE_ORDER - s).to_bytes(32, "big")
    assert not sm.sm2_verify_raw(priv.public_key(), alt, b"x")


@pytest.mark.parametrize(
    "b",
    [b"", b"\x04" + b"\x00" * 64, b"\x04" + b"\x01" * 64, b"\x02" + b"\x01" * 64, b"\x04" * 64, b"\x04" * 66],
)
def test_sm2_bad_public_keys(b: bytes) -> None:
    with pytest.raises(CodecError) as ei:
        sm.sm2_load_public(b)
    assert ei.value.code == "public_key_invalid"


@pytest.mark.parametrize("scalar", [0, sm.SM2_CURVE_ORDER - 1, sm.SM2_CURVE_ORDER, 2**256 - 1])
def test_sm2_bad_scalars(scalar: int) -> None:
    with pytest.raises(CodecError):
        sm.sm2_from_scalar(scalar.to_bytes(32, "big"))


def test_ed25519() -> None:
    priv = sm.ed25519_from_seed(b"\x01" * 32)
    pub = sm.ed25519_public_bytes(priv)
    sig = sm.ed25519_sign(priv, b"m")
    assert len(pub) == 32 and len(sig) == 64
    assert sm.ed25519_verify(pub, sig, b"m")
    assert not sm.ed25519_verify(pub, sig, b"n")
    assert not sm.ed25519_verify(pub, sig[:-1], b"m")
    assert sm.verify(sm.ALG_ED25519, pub, sig, b"m")
    assert sm.ed25519_sign(priv, b"m") == sig  # deterministic
    with pytest.raises(CodecError):
        sm.ed25519_verify(pub[:31], sig, b"m")
    assert sm.ed25519_verify(sm.ed25519_public_bytes(sm.ed25519_generate()), sig, b"m") is False


# edwards25519 in affine coordinates, just enough to find its points of small order independently of the
# list in protocols/sm.py: -x^2 + y^2 = 1 + d x^2 y^2 over GF(p).
_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_I = pow(2, (_P - 1) // 4, _P)  # a square root of -1


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, _P) % _P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P)


def _x_of(y: int) -> int | None:
    """An x with (x, y) on the curve, or None."""
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, _P - 2, _P) % _P
    r = pow(x, (_P + 3) // 8, _P)
    if r * r % _P != x:
        r = r * _I % _P
    return r if r * r % _P == x else None


def _encode(pt: tuple[int, int]) -> bytes:
    x, y = pt
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _mul(n: int, pt: tuple[int, int]) -> tuple[int, int]:
    acc = (0, 1)
    while n:
        if n & 1:
            acc = _add(acc, pt)
        pt, n = _add(pt, pt), n >> 1
    return acc


def _small_order_points() -> set[tuple[int, int]]:
    """The points of small order, found as [L]R for points R of the curve (L the prime order of the base
    point's group: [L]R is R's component in the 8-torsion, and L is odd, so every torsion point shows up)."""
    order_l = 2**252 + 27742317777372353535851937790883648493
    found: set[tuple[int, int]] = set()
    for y in range(2, 400):
        x = _x_of(y)
        if x is not None:
            found.add(_mul(order_l, (x, y)))
            if len(found) == 8:
                break
    assert all(_mul(8, pt) == (0, 1) for pt in found)
    return found


def test_ed25519_keys_of_small_order_are_refused() -> None:
    """A public key of small order lets anyone forge: R = identity, S = 0 verifies for every message under
    the identity key. Every encoding of the 8 small-order points is refused, and only those."""
    points = _small_order_points()
    assert len(points) == 8
    encodings = {_encode(pt) for pt in points}
    # Non-canonical encodings: y + p where that still fits in 255 bits, with either sign bit.
    for _x, y in points:
        if y + _P < 2**255:
            encodings.add((y + _P).to_bytes(32, "little"))
            encodings.add((y + _P | 1 << 255).to_bytes(32, "little"))
    identity = (1).to_bytes(32, "little")
    assert identity in encodings and len(encodings) >= 10
    for enc in encodings:
        assert sm.ed25519_small_order(enc), enc.hex()
        with pytest.raises(CodecError):
            sm.validate_public_key(sm.ALG_ED25519, enc)
        with pytest.raises(CodecError):  # as for any bad key: the credential is refused, not an error
            sm.verify(sm.ALG_ED25519, enc, identity + bytes(32), b"any message")
    # The forgery these keys allow, had they been accepted (cryptography's own check, not ours):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(identity).verify(identity + bytes(32), b"any message")  # no exception
    # Real keys pass.
    for seed in range(50):
        pub = sm.ed25519_public_bytes(sm.ed25519_from_seed(seed.to_bytes(32, "big")))
        assert not sm.ed25519_small_order(pub)
        assert sm.validate_public_key(sm.ALG_ED25519, pub) == pub


def test_registry() -> None:
    assert sm.public_key_length(sm.ALG_SM2_SM3) == 65
    assert sm.public_key_length(sm.ALG_ED25519) == 32
    assert sm.signature_length(sm.ALG_SM2_SM3) == sm.signature_length(sm.ALG_ED25519) == 64
    for bad in (0, 3, 255, -1, True):
        with pytest.raises(CodecError) as ei:
            sm.public_key_length(bad)
        assert ei.value.code == "algorithm_unknown"
        with pytest.raises(CodecError):
            sm.verify(bad, b"", b"", b"")
        with pytest.raises(CodecError):
            sm.signature_length(bad)


def test_seeded_keys_are_deterministic() -> None:
    for alg in sorted(sm.ALGORITHMS):
        a = sm.private_key_from_seed(alg, b"\x05" * 32)
        b = sm.private_key_from_seed(alg, b"\x05" * 32)
        c = sm.private_key_from_seed(alg, b"\x06" * 32)
        assert sm.public_key_bytes(a) == sm.public_key_bytes(b) != sm.public_key_bytes(c)
        assert sm.validate_public_key(alg, sm.public_key_bytes(a)) == sm.public_key_bytes(a)
        assert sm.verify(alg, sm.public_key_bytes(a), sm.sign(b, b"z"), b"z")


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80), st.sampled_from(sorted(sm.ALGORITHMS)))
def test_verify_garbage_never_raises_non_codec(pub: bytes, sig: bytes, alg: int) -> None:
    try:
        assert sm.verify(alg, pub, sig, b"m") is False
    except CodecError:
        pass
