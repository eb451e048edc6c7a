"""The resources a running app holds, built once at start-up and shared by handlers (read-only)."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import asyncpg

from cardsvc.config import Settings
from cardsvc.security.credentials import CardKeyDeriver
from cardsvc.security.keys import KeyRing
from cardsvc.security.pii import PiiVault
from cardsvc.security.terminals import TerminalRegistry
from cardsvc.store.batcher import MicroBatcher
from cardsvc.transit.context import TransitContext
from cardsvc.transit.taps import TapItem, TapOutcome

__all__ = ["Services"]


@dataclasses.dataclass(slots=True)
class Services:
    settings: Settings
    pool: asyncpg.Pool
    keys: KeyRing
    vault: PiiVault
    terminals: TerminalRegistry
    card_keys: CardKeyDeriver
    nonces: MicroBatcher[tuple[str, str], bool]
    signature_pool: ThreadPoolExecutor
    transit: TransitContext
    taps: MicroBatcher[TapItem, TapOutcome]

    async def run_in_signature_pool(self, fn: object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.signature_pool, fn, *args)  # type: ignore[arg-type]
