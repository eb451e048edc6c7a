"""Server-side HSM mode for card authentication: per-card SM4 keys derived on demand from the master
key (protocols/card.md), never stored; only the few hundred city-level keys are cached in memory.
This class is the seam where a hardware HSM adapter would go."""

from __future__ import annotations

from protocols import card

__all__ = ["CardKeyDeriver"]


class CardKeyDeriver:
    def __init__(self, master_key: bytes) -> None:
        self._deriver = card.CardKeyDeriver(master_key, card.KEY_PURPOSE_AUTH)

    def verify(
        self, card_sn: str, card_challenge: bytes, terminal_challenge: bytes, cryptogram: bytes
    ) -> bool:
        key = self._deriver.card_key(card_sn)
        return card.verify_cryptogram(key, card_challenge, terminal_challenge, cryptogram)
