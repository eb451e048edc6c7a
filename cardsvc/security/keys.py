"""The service's secret keys, loaded from a key file outside the database.

The key file is JSON with hex values (see docs/security.md). In production it is provisioned from the
bureau's key management (or replaced by an HSM adapter); for the embedded default, `cardsvc keys`
(or the first `cardsvc demo`) writes a fresh one with mode 0600. Per-card keys are never stored: they
are derived from `card_auth_master` on demand (protocols/card.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from pathlib import Path

import orjson

from protocols import sm

log = logging.getLogger(__name__)

__all__ = ["KeyFileError", "KeyRing"]

_LENGTHS = {
    "card_auth_master": 16,  # SM4 master key for card authentication (INTERNAL AUTHENTICATE)
    "card_tac_master": 16,  # SM4 master key for transit purse TACs
    "pii_hash_key": 32,  # HMAC-SM3 key for ID-number look-up hashes
    "pii_enc_key": 16,  # SM4-GCM key for ID numbers and names
    "terminal_kek": 16,  # SM4-GCM key-encryption key for terminal secrets at rest
    "ride_issuer_key": 32,  # SM2 private scalar that signs ride-code user certificates
}


class KeyFileError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class KeyRing:
    card_auth_master: bytes
    card_tac_master: bytes
    pii_hash_key: bytes
    pii_enc_key: bytes
    terminal_kek: bytes
    ride_issuer_key: bytes

    def __repr__(self) -> str:  # never print key material
        return "KeyRing(<redacted>)"

    @classmethod
    def generate(cls) -> KeyRing:
        values = {name: secrets.token_bytes(n) for name, n in _LENGTHS.items()}
        values["ride_issuer_key"] = sm.sm2_generate().scalar_bytes()  # a valid SM2 scalar
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} not found (create one with `cardsvc keys`)") from None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise KeyFileError(f"key file {path} unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise KeyFileError(f"key file {path}: expected a JSON object")
        mode = path.stat().st_mode
        if mode & 0o077:
            log.warning(
                "the key file can be read by other users: chmod 600 it",
                extra={"key_file": str(path), "mode": oct(mode & 0o777)},
            )
        values: dict[str, bytes] = {}
        for name, length in _LENGTHS.items():
            raw = data.get(name)
            try:
                value = bytes.fromhex(raw) if isinstance(raw, str) else b""
            except ValueError:
                value = b""
            if len(value) != length:
                raise KeyFileError(f"key file {path}: {name} must be {length} bytes of hex")
            values[name] = value
        return cls(**values)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = orjson.dumps({n: getattr(self, n).hex() for n in _LENGTHS}, option=orjson.OPT_INDENT_2)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[KeyRing, bool]:
        """For the embedded default only: create the key file on first start."""
        if path.exists():
            return cls.load(path), False
        ring = cls.generate()
        ring.write(path)
        return ring, True
