"""Running the service: one process, or N worker processes on one port (SO_REUSEPORT).

Graceful shutdown on SIGTERM/SIGINT: stop accepting, let in-flight requests finish (up to
`shutdown_grace_s`), then close the batchers and the pool. With --workers N the parent supervises:
it forwards the signal to every worker, waits for them, and restarts a worker that dies unexpectedly.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from prometheus_client import multiprocess

from cardsvc.config import Settings

__all__ = ["run_worker", "serve"]

log = logging.getLogger("cardsvc.server")

WORKER_RESTART_DELAY_S = 1.0
WORKER_RESTART_DELAY_MAX_S = 15.0
# A worker that dies this soon after it started failed at start-up (database unreachable, bad settings):
# after this many such deaths in a row, with no other worker alive, the supervisor gives up instead of
# restarting them forever (bad settings kill every worker). While another worker runs, the settings are
# good and the database is away for a while: the dead one is restarted, each time a little later (up to
# WORKER_RESTART_DELAY_MAX_S), until it comes up.
WORKER_EARLY_DEATH_S = 10.0
WORKER_EARLY_DEATHS_MAX = 3


# The cyclic garbage collector's thresholds (Python's defaults: 700, 10, 10). The first counts container
# objects allocated minus those freed since the last young collection: under load, the many requests in
# flight keep it high, and collecting every 700 scanned the same live objects over and over (~6 % of a
# worker's CPU in the realistic mix, perf), for garbage that is almost never cyclic. The last makes full
# collections ten times rarer. These are Python 3.11-3.13 semantics (3.14's incremental collector reads
# them differently). See docs/operations.md "Worker memory and the garbage collector".
GC_THRESHOLDS = (50_000, 20, 100)


def _tune_gc() -> None:
    """Freeze what start-up built (modules, fare table, pools: long-lived, so not worth scanning again;
    reference counting still frees them when replaced) and collect less often. Cycles are still
    collected: RSS stays flat."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


SUPERVISOR_CHECK_S = 1.0  # how often a worker looks whether its supervisor is still there


async def _watch_supervisor(supervisor: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) would serve on unsupervised, and hold the port
    against the service's next start: it drains and stops instead, as on SIGTERM."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 - no event tells a process its parent died
        await asyncio.sleep(SUPERVISOR_CHECK_S)
    log.error("supervisor gone; shutting down", extra={"pid": os.getpid(), "supervisor": supervisor})
    stop.set()


async def _serve_async(
    settings: Settings, dsn: str, key_path: Path, reuse_port: bool, supervisor: int | None = None
) -> None:
    from aiohttp import web

    from cardsvc.app import create_app
    from cardsvc.security.keys import KeyRing

    app = create_app(settings, dsn, KeyRing.load(key_path))
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_grace_s, access_log=None)
    await runner.setup()
    _tune_gc()  # before taking connections: its full collection then delays no request
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port, backlog=1024)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()  # the pools and background tasks go too, or closing the loop waits for them
        raise
    log.info("listening", extra={"host": settings.host, "port": settings.port, "pid": os.getpid()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = loop.create_task(_watch_supervisor(supervisor, stop)) if supervisor is not None else None
    await stop.wait()
    if watch is not None:
        watch.cancel()
    log.info("shutting down: draining in-flight requests", extra={"pid": os.getpid()})
    await runner.cleanup()
    log.info("stopped", extra={"pid": os.getpid()})


def run_worker(
    settings: Settings, dsn: str, key_path: Path, reuse_port: bool = False, supervisor: int | None = None
) -> None:
    import uvloop

    from cardsvc.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    uvloop.run(_serve_async(settings, dsn, key_path, reuse_port, supervisor))


def _worker_entry(settings: Settings, dsn: str, key_path: Path, supervisor: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; workers stop on SIGTERM
    run_worker(settings, dsn, key_path, reuse_port=True, supervisor=supervisor)


def _port_is_free(host: str, port: int) -> None:
    """Workers share the port with SO_REUSEPORT, which would as well let them join another service already
    listening there with it (another `cardsvc serve --workers N`), splitting its traffic. A bind without
    it fails on any listener: OSError (address in use) before a worker (or the one worker) starts. (SO_REUSEADDR, as the
    workers have: the connections of a service just restarted, in TIME_WAIT, do not count.)"""
    # As asyncio's create_server binds: an empty host is every interface, an IPv6 socket is IPv6 only.
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(addr)


METRICS_DIR_PREFIX = "cardsvc-metrics-"


def _remove_stale_metrics_dirs(tmp: Path) -> None:
    """Remove the metrics directories that supervisors killed outright (SIGKILL, the OOM killer) left in
    `tmp`: ours (same owner), named by a pid that no longer runs. A live pid's directory is kept, whoever
    runs under that pid now. (A few MB each; without this, every such kill left one for good.)"""
    for path in tmp.glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.lstat().st_uid != os.getuid() or not path.is_dir():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed the metrics directory of a supervisor that is gone", extra={"pid": int(pid)})
        except OSError:  # alive under another user (EPERM), or the entry vanished meanwhile
            continue


def serve(settings: Settings, dsn: str, key_path: Path) -> int:
    """Run the service in the foreground until SIGTERM/SIGINT; returns the exit status."""
    _port_is_free(settings.host, settings.port)  # before anything starts
    if settings.workers == 1:
        run_worker(settings, dsn, key_path)
        return 0
    # Metrics from every worker land in one directory and /metrics aggregates them. Named by the
    # supervisor's pid, so that the directory of a supervisor that was killed can be told and removed.
    _remove_stale_metrics_dirs(Path(tempfile.gettempdir()))
    metrics_dir = Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    ctx = mp.get_context("spawn")
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def spawn() -> mp.process.BaseProcess:
        p = ctx.Process(target=_worker_entry, args=(settings, dsn, key_path, os.getpid()), daemon=False)
        p.start()
        return p

    workers = [spawn() for _ in range(settings.workers)]
    started = [time.monotonic()] * len(workers)
    restart_at: list[float | None] = [None] * len(workers)  # a dead worker's restart, when scheduled
    early_deaths = 0
    status = 0
    log.info("started workers", extra={"workers": settings.workers, "pids": [p.pid for p in workers]})
    try:
        while not stopping:
            time.sleep(0.2)
            for i, p in enumerate(workers):
                if stopping:
                    break
                due = restart_at[i]
                if due is not None:
                    if time.monotonic() >= due:
                        workers[i], started[i], restart_at[i] = spawn(), time.monotonic(), None
                    continue
                if p.is_alive():
                    continue
                early = time.monotonic() - started[i] < WORKER_EARLY_DEATH_S
                early_deaths = early_deaths + 1 if early else 0
                others_alive = any(q.is_alive() for j, q in enumerate(workers) if j != i)
                if early_deaths >= WORKER_EARLY_DEATHS_MAX and not others_alive:
                    log.error("workers keep failing at start-up; stopping", extra={"exitcode": p.exitcode})
                    stopping, status = True, 1
                    break
                log.error("worker died; restarting", extra={"pid": p.pid, "exitcode": p.exitcode})
                # Its live gauges (requests in flight, pool connections) would be summed in for ever.
                multiprocess.mark_process_dead(p.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                delay = WORKER_RESTART_DELAY_S * 2 ** max(0, early_deaths - 1)
                restart_at[i] = time.monotonic() + min(delay, WORKER_RESTART_DELAY_MAX_S)
    finally:
        for p in workers:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_s + 5
        for p in workers:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
