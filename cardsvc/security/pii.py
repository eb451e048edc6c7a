"""The personal-data vault: ID numbers and names are stored as a keyed hash (look-up) plus SM4-GCM
ciphertext, and shown masked. Plain values exist only in the request that carries them."""

from __future__ import annotations

import dataclasses

from protocols import idnumber, sm

from .keys import KeyRing

__all__ = ["PiiVault", "SealedHolder"]


@dataclasses.dataclass(frozen=True, slots=True)
class SealedHolder:
    id_hash: bytes
    id_cipher: bytes
    name_cipher: bytes
    id_masked: str
    name_masked: str


class PiiVault:
    def __init__(self, keys: KeyRing) -> None:
        self._hash_key = keys.pii_hash_key
        self._enc_key = keys.pii_enc_key

    def lookup_hash(self, id_number: str) -> bytes:
        return sm.hmac_sm3(self._hash_key, id_number.encode())

    def seal(self, id_number: str, name: str) -> SealedHolder:
        return SealedHolder(
            id_hash=self.lookup_hash(id_number),
            id_cipher=sm.sm4_gcm_encrypt(self._enc_key, id_number.encode(), b"id_number"),
            name_cipher=sm.sm4_gcm_encrypt(self._enc_key, name.encode(), b"name"),
            id_masked=idnumber.mask_id_number(id_number),
            name_masked=idnumber.mask_name(name),
        )

    def open_id_number(self, cipher: bytes) -> str:
        return sm.sm4_gcm_decrypt(self._enc_key, cipher, b"id_number").decode()

    def open_name(self, cipher: bytes) -> str:
        return sm.sm4_gcm_decrypt(self._enc_key, cipher, b"name").decode()
