"""MicroBatcher and cancelled callers (cardsvc/store/batcher.py): a queued item whose caller is cancelled
is never flushed; an item in a flush is answered with the flush's result when `finish_in_flight`."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence

import pytest

from cardsvc.store.batcher import MicroBatcher


class Writes:
    """A flush that records what it was given and waits for the test's go-ahead."""

    def __init__(self) -> None:
        self.flushed: list[list[str]] = []
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    async def __call__(self, items: Sequence[str]) -> list[str]:
        self.flushed.append(list(items))
        self.started.set()
        await self.go.wait()
        return [f"wrote {i}" for i in items]


def _batcher(writes: Writes, finish_in_flight: bool) -> MicroBatcher[str, str]:
    return MicroBatcher(
        writes, items_max=10, wait_ms_max=0, queue_items_max=100, flushes_max=1, finish_in_flight=finish_in_flight
    )


@pytest.mark.parametrize("finish_in_flight", [True, False])
async def test_a_cancelled_caller_whose_item_is_queued_takes_it_out(finish_in_flight: bool) -> None:
    writes = Writes()
    async with _batcher(writes, finish_in_flight) as batcher:
        first = asyncio.ensure_future(batcher.submit("a"))
        await writes.started.wait()  # "a" holds the only flush
        # Two equal items queued: cancelling one takes out that one, not its twin.
        twin, gone = asyncio.ensure_future(batcher.submit("b")), asyncio.ensure_future(batcher.submit("b"))
        late = asyncio.ensure_future(batcher.submit("c"))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        writes.go.set()
        assert await asyncio.gather(first, twin, late) == ["wrote a", "wrote b", "wrote c"]
    assert writes.flushed == [["a"], ["b", "c"]]


async def test_a_cancelled_caller_whose_item_is_in_a_flush_gets_its_result() -> None:
    writes = Writes()
    async with _batcher(writes, finish_in_flight=True) as batcher:
        caller = asyncio.ensure_future(batcher.submit("a"))
        await writes.started.wait()
        caller.cancel()  # e.g. the request's deadline; twice, as a shutdown may
        await asyncio.sleep(0)
        caller.cancel()
        await asyncio.sleep(0)
        assert not caller.done()  # still waiting for the write it started
        writes.go.set()
        assert await caller == "wrote a"


class FailingWrites(Writes):
    async def __call__(self, items: Sequence[str]) -> list[str]:
        await super().__call__(items)
        raise TimeoutError("the database stopped answering")


@pytest.mark.parametrize("writes", [Writes(), FailingWrites()], ids=["flush_succeeds", "flush_fails"])
async def test_without_finish_in_flight_the_cancellation_goes_through(writes: Writes) -> None:
    """The caller leaves at once. When the flush then fails (a statement timeout), nobody waits for that
    outcome: it must not reach the event loop's handler as "Future exception was never retrieved" (an
    error line in the log for every request that left at its deadline while the database stalled)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        async with _batcher(writes, finish_in_flight=False) as batcher:
            caller = asyncio.ensure_future(batcher.submit("a"))
            await writes.started.wait()
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            writes.go.set()
        del caller
        gc.collect()  # an unretrieved exception is reported when its future is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert writes.flushed == [["a"]]  # the flush itself ran to its end
    assert not reported, reported


async def _closes(batcher: MicroBatcher[str, str]) -> bool:
    """close() returns (within a generous bound: a hang is the failure, not slowness)."""
    closing = asyncio.ensure_future(batcher.close())
    done, _ = await asyncio.wait({closing}, timeout=5)
    if not done:
        batcher._wakeup.set()  # let the stuck runner see `closed`, so that the test ends
        await closing
    return bool(done)


async def _b_queued_behind_a() -> tuple[Writes, MicroBatcher[str, str], asyncio.Future[str], asyncio.Future[str]]:
    """A started batcher whose only flush writes "a" (until `go`), with "b" queued behind it."""
    writes = Writes()
    batcher = _batcher(writes, finish_in_flight=True)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit("a"))
    await writes.started.wait()
    queued = asyncio.ensure_future(batcher.submit("b"))
    await asyncio.sleep(0)
    return writes, batcher, first, queued


async def test_close_returns_when_an_item_was_queued_behind_a_busy_flush() -> None:
    """Shutdown while an item waits for the only flush slot: it is flushed and answered, and close()
    returns (the runner used to clear its wake-up after taking that last batch and wait forever)."""
    writes, batcher, first, queued = await _b_queued_behind_a()
    closing = asyncio.ensure_future(_closes(batcher))
    await asyncio.sleep(0)
    writes.go.set()
    assert await asyncio.gather(first, queued) == ["wrote a", "wrote b"]
    assert await closing
    assert writes.flushed == [["a"], ["b"]]


async def test_a_cancelled_queued_caller_leaves_no_empty_flush() -> None:
    """The shutdown path: the flush slot busy, a queued caller cancelled (its handler cancelled after the
    grace). The runner, waiting for the slot, must not flush an empty batch (a pool connection and a
    transaction for taps), and close() returns."""
    writes, batcher, first, queued = await _b_queued_behind_a()
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    closing = asyncio.ensure_future(_closes(batcher))
    await asyncio.sleep(0)
    writes.go.set()
    assert await first == "wrote a"
    assert await closing
    assert writes.flushed == [["a"]]
