"""Read-only transit resources of a worker, built once at start-up."""

from __future__ import annotations

import dataclasses

from protocols import sm

from . import fares

__all__ = ["TransitContext"]


@dataclasses.dataclass(frozen=True, slots=True)
class TransitContext:
    """The fare table and the ride-code issuer key (SM2; its public half is what gates hold)."""

    table: fares.FareTable
    issuer_private: sm.Sm2PrivateKey
    issuer_public: bytes

    @classmethod
    def build(cls, table: fares.FareTable, issuer_scalar: bytes) -> TransitContext:
        private = sm.sm2_from_scalar(issuer_scalar)
        return cls(table, private, sm.sm2_public_bytes(private))
