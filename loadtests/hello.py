"""The HTTP ceiling for the benchmark: a bare aiohttp app on uvloop answering one tiny JSON body.

No middlewares, no database, no signature: what aiohttp itself costs per request on this machine, with
the same process model as `cardsvc serve --workers N` (N processes sharing the port with SO_REUSEPORT).

    python -m loadtests.hello --port 8098 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

BODY = b'{"status":"ok"}'


async def hello(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", hello)
    return app


async def _serve(host: str, port: int, reuse_port: bool) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def run(host: str, port: int, reuse_port: bool) -> None:
    import uvloop

    uvloop.run(_serve(host, port, reuse_port))


def _worker(host: str, port: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run(host, port, True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.workers == 1:
        run(args.host, args.port, False)
        return 0
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(args.host, args.port)) for _ in range(args.workers)]
    for p in procs:
        p.start()
    while not stopping and all(p.is_alive() for p in procs):
        # A signal that arrives during the wait is consumed by it (the handler never runs): use the answer.
        if signal.sigtimedwait([signal.SIGTERM, signal.SIGINT], 0.5) is not None:
            stopping = True
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
