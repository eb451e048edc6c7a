"""The aiohttp application factory: one app, its resources in `cleanup_ctx`, typed app keys.

Start-up order: database pool (migrations must be current), terminal cache (+ LISTEN), nonce batcher,
signature thread pool, maintenance loop. Shutdown runs it backwards after aiohttp has stopped accepting
and drained in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
from aiohttp import web

from cardsvc import limits, localtime, metrics
from cardsvc.config import ConfigError, Settings
from cardsvc.flows import lifecycle
from cardsvc.http.keys import CLEARING_GAUGE_READ, SERVICES
from cardsvc.http.middlewares import authenticate, observe
from cardsvc.http.routes import setup_routes
from cardsvc.http.transit_routes import setup_transit_routes
from cardsvc.security.credentials import CardKeyDeriver
from cardsvc.security.keys import KeyRing
from cardsvc.security.pii import PiiVault
from cardsvc.security.terminals import TerminalRegistry
from cardsvc.services import Services
from cardsvc.store import migrate
from cardsvc.store.batcher import MicroBatcher
from cardsvc.store.pool import create_pool
from cardsvc.store.seed_state import interrupted_seed
from cardsvc.transit import fares, offline
from cardsvc.transit.context import TransitContext
from cardsvc.transit.flow import KIND_RIDE_CODE
from cardsvc.transit.sweep import sweep_timed_out_journeys
from cardsvc.transit.taps import UPLOADED_ANSWER, TapItem, TapOutcome, process_taps
from protocols.transit import RecordResult

__all__ = ["MigrationsPending", "RegistryIncomplete", "create_app"]

log = logging.getLogger("cardsvc.app")


class MigrationsPending(RuntimeError):
    pass


class RegistryIncomplete(RuntimeError):
    """A fresh seed is loading, or was interrupted, with the registry's indexes and constraints dropped (migration 0016)."""


def _nonce_flush(pool: asyncpg.Pool):  # type: ignore[no-untyped-def]
    async def flush(items: Sequence[tuple[str, str]]) -> list[bool]:
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                """INSERT INTO request_nonce (terminal_id, nonce)
                   SELECT * FROM unnest($1::text[], $2::text[])
                   ON CONFLICT DO NOTHING RETURNING terminal_id, nonce""",
                [t for t, _ in items],
                [n for _, n in items],
            )
        fresh = {(r["terminal_id"], r["nonce"]) for r in rows}
        out = []
        for item in items:  # a nonce twice in one batch: only the first is fresh
            out.append(item in fresh)
            fresh.discard(item)
        return out

    return flush


class MaintenanceFailed(RuntimeError):
    """Some maintenance steps failed (the others ran): their names, each logged with its error."""


_PARTITIONS_LOCK_KEY = 0x706172746974696F  # pg advisory lock: "partitio", one maker of journal partitions at a time


async def _partitions(pool: asyncpg.Pool, settings: Settings) -> None:
    # The months ahead, and back to the oldest ride an upload may still post (UPLOAD_AGE_S_MAX and the
    # clock skew): a database created early in a month has no partition yet for a month-old record.
    # Every worker does it as it starts: one at a time, or two would make the same month and one fail.
    # A worker that finds another at it leaves it the job (waiting could exceed lock_timeout and fail).
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PARTITIONS_LOCK_KEY):
            return
        await conn.execute(
            "SELECT cardsvc_ensure_partitions((now() - make_interval(secs => $1))::date, 5)",
            float(limits.UPLOAD_AGE_S_MAX + settings.clock_skew_s + 86400),
        )


async def _sweep(pool: asyncpg.Pool, settings: Settings, table: fares.FareTable) -> None:
    swept = await sweep_timed_out_journeys(pool, table, settings.purse_overdraft_fen)
    if swept.swept_to is not None:  # None: another worker's sweep was running
        metrics.JOURNEY_SWEEP_THROUGH.set(swept.swept_to.timestamp() + table.rules.journey_timeout_s)
    metrics.JOURNEYS_SWEPT.labels("closed").inc(swept.closed)
    metrics.JOURNEYS_SWEPT.labels("held_exit").inc(swept.held_exits)
    metrics.JOURNEYS_SWEPT.labels("unpaid").inc(swept.unpaid)
    metrics.JOURNEYS_SWEPT.labels("unpriced").inc(swept.unpriced)
    if swept.unpriced:
        log.warning(
            "timed-out metro journeys at stations the fare table does not have; list them under metro.retired",
            extra={"unpriced": swept.unpriced, "stations": ",".join(swept.unknown_stations)[:500]},
        )
    if swept.closed or swept.held_exits or swept.unpaid:
        log.info(
            "timed-out metro journeys charged",
            extra={
                "closed": swept.closed,
                "held_exits": swept.held_exits,
                "charged_fen": swept.charged_fen,
                "unpaid": swept.unpaid,
            },
        )


def ride_code_use_retention_s(settings: Settings) -> int:
    """How long a ride code's use is remembered: as long as a copy of the code can still be uploaded. A
    gate accepts the code up to its lifetime and the clock skew after the phone stamped it, the gate's
    record may be the skew ahead of the server and UPLOAD_AGE_S_MAX old at upload, and ride times are
    whole seconds."""
    return limits.UPLOAD_AGE_S_MAX + 3 * settings.clock_skew_s + settings.ecard_code_lifetime_s + 1


# How far before the previous pass's cut-off a pass of the terminal answers' prune reads again: more than any
# transaction lasts (an answer's `at` is its transaction's start).
ANSWERS_PRUNE_OVERLAP = dt.timedelta(minutes=10)


@dataclasses.dataclass(slots=True)
class PruneState:
    """What one maintenance loop remembers between passes: the cut-off up to which the terminal answers
    past `terminal_txn_retention_days` were pruned. The answers older than that are the uploaded rides'
    (taps.UPLOADED_ANSWER), kept for the whole upload window; reading them again every pass would cost a
    read of weeks of rides every `sweep_interval_s`. None: the first pass, which reads them all once."""

    answers_pruned_to: dt.datetime | None = None


async def _prune(pool: asyncpg.Pool, settings: Settings, state: PruneState | None = None) -> None:
    state = state or PruneState()
    async with pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM request_nonce WHERE seen_at < now() - make_interval(secs => $1)",
            float(2 * settings.clock_skew_s),
        )
        await conn.execute(
            "DELETE FROM credential_use WHERE used_at < now() - make_interval(secs => $1) AND kind <> $2",
            float(2 * settings.clock_skew_s + max(settings.ecard_code_lifetime_s, settings.card_challenge_age_s)),
            KIND_RIDE_CODE,
        )
        # Ride codes are charged when the gate uploads, up to UPLOAD_AGE_S_MAX after the ride.
        await conn.execute(
            "DELETE FROM credential_use WHERE kind = $2 AND used_at < now() - make_interval(secs => $1)",
            float(ride_code_use_retention_s(settings)),
            KIND_RIDE_CODE,
        )
        # The hotlist versions served to each terminal, an hour at a time: an offline record older than the
        # upload window is refused whatever its validator held. Each terminal's newest hour before the
        # window stays (what a record early in the window was made under), and its last serve.
        await conn.execute(
            """DELETE FROM terminal_hotlist_serve s
               WHERE s.hour < now() - make_interval(secs => $1)
                 AND EXISTS (SELECT 1 FROM terminal_hotlist_serve n
                             WHERE n.terminal_id = s.terminal_id AND n.hour > s.hour
                               AND n.hour < now() - make_interval(secs => $1))""",
            float(limits.UPLOAD_AGE_S_MAX + settings.clock_skew_s + 86400),
        )
        # Top-up answers are kept for good in topup_key (migration 0009). The service writes both; a top-up
        # a release before 0009 wrote while the migration ran has only its terminal_txn answer: keep it
        # before that goes (top-ups are the answers without a detail; taps and uploads always have one).
        cut: dt.datetime = await conn.fetchval(
            "SELECT now() - make_interval(days => $1)", settings.terminal_txn_retention_days
        )
        since = state.answers_pruned_to - ANSWERS_PRUNE_OVERLAP if state.answers_pruned_to else None
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO topup_key (terminal_id, terminal_seq, request_hash, card_id, amount_fen, balance_fen,
                                          txn_id, at)
                   SELECT terminal_id, terminal_seq, request_hash, card_id, amount_fen, balance_fen, txn_id, at
                   FROM terminal_txn
                   WHERE at < $1 AND at >= coalesce($2::timestamptz, '-infinity') AND detail IS NULL AND result = 'approved'
                     AND txn_id IS NOT NULL AND card_id IS NOT NULL AND balance_fen IS NOT NULL
                   ON CONFLICT DO NOTHING""",
                cut, since,
            )  # fmt: skip
            # An uploaded ride's answer stays as long as the ride can be uploaded again (taps.UPLOADED_ANSWER).
            await conn.execute(
                """DELETE FROM terminal_txn
                   WHERE at < $1 AND at >= coalesce($2::timestamptz, '-infinity') AND (detail IS NULL OR NOT detail ? $3)""",
                cut, since, UPLOADED_ANSWER,
            )  # fmt: skip
            await conn.execute(
                "DELETE FROM terminal_txn WHERE at < now() - make_interval(secs => $1)",
                float(ride_code_use_retention_s(settings)),
            )
        state.answers_pruned_to = cut


async def maintenance_once(
    pool: asyncpg.Pool, settings: Settings, table: fares.FareTable | None = None, prune: PruneState | None = None
) -> None:
    """Keep journal partitions ahead, expire temporary losses, (given the fare table) charge timed-out
    metro journeys, and forget old nonces, credential uses and terminal answers past their retention.

    Each step runs on its own: one that fails (logged, counted in cardsvc_maintenance_failures_total)
    does not keep the others from running; MaintenanceFailed names the failed ones at the end. Partitions
    come first: without next month's partition, every write to the journal fails."""
    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("partitions", lambda: _partitions(pool, settings)),
        ("temporary_losses", lambda: lifecycle.expire_temporary_losses(pool)),
    ]
    if table is not None:
        steps.append(("sweep", lambda: _sweep(pool, settings, table)))
    steps.append(("prune", lambda: _prune(pool, settings, prune)))
    failed = []
    for name, step in steps:
        failures = metrics.MAINTENANCE_FAILURES.labels(name)  # at 0 from the first round: the alert's increase()
        try:  # counts the first failure too
            await step()
        except Exception:
            log.warning("maintenance step failed; retrying next interval", extra={"step": name}, exc_info=True)
            failures.inc()
            failed.append(name)
    if failed:
        raise MaintenanceFailed(", ".join(failed))


async def _maintenance_loop(pool: asyncpg.Pool, settings: Settings, table: fares.FareTable) -> None:
    prune = PruneState()
    while True:
        try:
            await maintenance_once(pool, settings, table, prune)
        except asyncio.CancelledError:
            raise
        except MaintenanceFailed:
            pass  # each failed step was logged with its error
        except Exception:
            log.warning("maintenance pass failed; retrying next interval", exc_info=True)
        await asyncio.sleep(settings.sweep_interval_s)


async def _pool_gauges(pool: asyncpg.Pool) -> None:
    """This worker's pool in the livesum gauges, every second: /metrics is answered by one worker and adds
    up what every worker last wrote (a gauge set only at a scrape would count the scraped worker alone)."""
    while True:
        size = pool.get_size()
        metrics.DB_POOL_CONNECTIONS.set(size)
        metrics.DB_POOL_IN_USE.set(size - pool.get_idle_size())
        await asyncio.sleep(1.0)


def create_app(settings: Settings, dsn: str, keys: KeyRing, *, maintenance: bool = True) -> web.Application:
    localtime.configure(settings.utc_offset_minutes)
    # A series an alert reads with increase() exists at 0 from the start: born at its first event, already
    # at 1, that event would not count (CardsvcOfflineBadTac: the first record with a bad TAC, often the only one).
    metrics.UPLOADED_RECORDS.labels("purse", RecordResult.BAD_TAC.value, offline.REASONS[RecordResult.BAD_TAC])
    app = web.Application(
        middlewares=[observe, authenticate],
        client_max_size=max(settings.body_bytes_max, limits.UPLOAD_BODY_BYTES_MAX),
        handler_args={"max_field_size": 8190, "max_line_size": 8190},
    )
    app[CLEARING_GAUGE_READ] = [-math.inf]

    async def resources(app: web.Application) -> AsyncIterator[None]:
        table = fares.load_table(settings.fare_table) if settings.fare_table else fares.load_demo_table()
        if table.rules.utc_offset_s != settings.utc_offset_minutes * 60:
            raise ConfigError(
                f"the fare table {table.version} counts days at UTC{table.rules.utc_offset_s // 60:+d} minutes, "
                f"the service at UTC{settings.utc_offset_minutes:+d} (CARDSVC_UTC_OFFSET_MINUTES): they must agree"
            )
        pool = await create_pool(dsn, settings)
        try:
            async with pool.acquire() as conn:
                todo = await migrate.pending(conn)
                if todo:
                    raise MigrationsPending(
                        f"database schema is behind: {len(todo)} migration(s) pending; run `cardsvc migrate`"
                    )
                if (left := await interrupted_seed(conn)) is not None:
                    raise RegistryIncomplete(left)
            terminals = TerminalRegistry(keys.terminal_kek, settings.key_cache_refresh_s)
            await terminals.start(pool)
            nonces: MicroBatcher[tuple[str, str], bool] = MicroBatcher(
                _nonce_flush(pool),
                items_max=settings.batch_items_max,
                wait_ms_max=settings.batch_wait_ms_max,
                queue_items_max=settings.batch_items_max * 32,
                flushes_max=max(1, settings.db_pool_max // 4),
            )
            nonces.start()
            signature_pool = ThreadPoolExecutor(settings.signature_threads_max, thread_name_prefix="sig")
            transit = TransitContext.build(table, keys.ride_issuer_key)

            async def flush_taps(items: Sequence[TapItem]) -> list[TapOutcome]:
                return await process_taps(pool, table, items, isolate_held=True)

            taps: MicroBatcher[TapItem, TapOutcome] = MicroBatcher(
                flush_taps,
                items_max=settings.batch_items_max,
                wait_ms_max=settings.batch_wait_ms_max,
                queue_items_max=settings.batch_items_max * 32,
                flushes_max=max(1, settings.db_pool_max // 2),
                finish_in_flight=True,  # a tap in a flush is answered with its outcome, never a 503
            )
            taps.start()
            app[SERVICES] = Services(
                settings=settings,
                pool=pool,
                keys=keys,
                vault=PiiVault(keys),
                terminals=terminals,
                card_keys=CardKeyDeriver(keys.card_auth_master),
                nonces=nonces,
                signature_pool=signature_pool,
                transit=transit,
                taps=taps,
            )
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(_pool_gauges(pool))]
            if maintenance:
                tasks.append(loop.create_task(_maintenance_loop(pool, settings, table)))
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await taps.close()
                await nonces.close()
                await terminals.stop(pool)
                signature_pool.shutdown(wait=True)
        finally:
            await pool.close()

    app.cleanup_ctx.append(resources)
    setup_routes(app)
    setup_transit_routes(app)
    return app
