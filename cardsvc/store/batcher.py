"""A bounded micro-batcher: concurrent submissions of one kind of write are coalesced into one
set-based statement (flush at `items_max` or after `wait_ms_max`), each caller getting its own result.

Bounded everywhere: the queue refuses work past `queue_items_max` (the caller answers 503), at most
`flushes_max` flushes run at once (each holds one pool connection), and `close()` drains what was
accepted before it returns. No fire-and-forget: every task it starts is awaited on close.

A caller cancelled (its request's deadline, a shutdown) while its item still waits in the queue takes
the item out: nothing of it is written, so an answer that says so is true. Once the item is in a flush,
the write may commit whatever the caller does. With `finish_in_flight` the caller then waits for the
flush and returns its result, so that it never answers "nothing happened" for a write that committed
(taps: a validator that gives up after a 503 must not have charged the rider it turned away); the wait is
bounded by the flush's own timeouts. Without it, the cancellation goes through (nonces: a nonce recorded
for a request that was refused only makes its resend `auth_replayed`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["BatcherClosed", "BatcherOverloaded", "MicroBatcher", "columns"]

T = TypeVar("T")
R = TypeVar("R")


class BatcherOverloaded(RuntimeError):
    pass


class BatcherClosed(RuntimeError):
    pass


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        items_max: int,
        wait_ms_max: float,
        queue_items_max: int,
        flushes_max: int = 4,
        finish_in_flight: bool = False,
    ) -> None:
        assert items_max > 0 and queue_items_max >= items_max and flushes_max > 0
        self._flush = flush
        self._items_max = items_max
        self._wait_s = wait_ms_max / 1000.0
        self._queue_items_max = queue_items_max
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(flushes_max)
        self._flushes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._runner: asyncio.Task[None] | None = None
        self._finish_in_flight = finish_in_flight

    def start(self) -> None:
        assert self._runner is None
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, item: T) -> R:
        if self._closed:
            raise BatcherClosed("batcher is closed")
        if len(self._pending) >= self._queue_items_max:
            raise BatcherOverloaded("batch queue is full")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        entry = (item, fut)
        self._pending.append(entry)
        self._wakeup.set()
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            queued = next((i for i, e in enumerate(self._pending) if e is entry), None)
            if queued is not None:  # not taken into a flush yet: nothing written
                del self._pending[queued]
                fut.cancel()
                raise
            if not self._finish_in_flight:
                fut.add_done_callback(_retrieve)  # nobody waits for it now: a failure is not "never retrieved"
                raise
        # In a flush: its outcome is the answer, even past the caller's deadline.
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fut)
        return fut.result()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._pending:
                self._wakeup.clear()
                if self._closed:
                    return
                continue
            if len(self._pending) < self._items_max and self._wait_s > 0 and not self._closed:
                # Give concurrent requests a moment to join this batch.
                await asyncio.sleep(self._wait_s)
            await self._slots.acquire()
            if not self._pending:  # its callers were cancelled while it waited: nothing to write
                self._slots.release()
                continue
            batch, self._pending = self._pending[: self._items_max], self._pending[self._items_max :]
            if not self._pending:
                self._wakeup.clear()
            task = asyncio.get_running_loop().create_task(self._flush_one(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
            if self._closed and not self._pending:  # close() set the event once, before this batch
                return

    async def _flush_one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
            assert len(results) == len(batch), "flush must return one result per item"
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Stop accepting, flush everything accepted, wait for in-flight flushes."""
        self._closed = True
        self._wakeup.set()
        if self._runner is not None:
            await self._runner
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(BatcherClosed("batcher closed"))
        self._pending.clear()

    async def __aenter__(self) -> MicroBatcher[T, R]:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.close()


def columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """The rows of a set-based write as one list per column (the arrays a `unnest(...)` statement takes)."""
    cols = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]
    assert len(cols) == width, (len(cols), width)
    return cols
