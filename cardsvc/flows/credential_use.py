"""The kinds of single-use credential keys recorded in `credential_use` (card, kind, token): a leaf module,
so that the tap engine (cardsvc/transit/taps.py) and the credential checks share them without importing
each other."""

from __future__ import annotations

__all__ = ["KIND_CARD_CRYPTOGRAM", "KIND_ECARD_CODE", "KIND_RIDE_CODE"]

KIND_CARD_CRYPTOGRAM = 1  # token: the terminal challenge (8 bytes, as a signed bigint)
KIND_ECARD_CODE = 2  # token = ecard_id << 32 | counter
KIND_RIDE_CODE = 3  # token = cert_serial << 32 | counter (cardsvc/transit: ride codes)
