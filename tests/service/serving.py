"""`cardsvc serve` in a subprocess, for the tests that need the real command: several workers on one
port, signals, the database or the service going away. Waiting is always a bounded poll for a condition
(readiness, a refused connection), never a timed assertion."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from cardsvc import demo
from cardsvc.security import terminals
from cardsvc.security.keys import KeyRing
from protocols import terminal_auth
from tests.helpers import Terminal

POLL_ATTEMPTS = 300  # x POLL_INTERVAL_S: how long we are willing to wait for a condition
POLL_INTERVAL_S = 0.1
PROBLEM_JSON = "application/problem+json"


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("cardsvc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cardsvc"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


async def poll(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(POLL_ATTEMPTS):
        if await check():
            return
        await asyncio.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"gave up waiting for {what}")


def service_env(tmp: Path, dsn: str, key_file: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDSVC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        CARDSVC_DATABASE_URL=dsn,
        CARDSVC_KEY_FILE=str(key_file),
        CARDSVC_DATA_DIR=str(tmp / "data"),
        CARDSVC_PORT=str(port),
        CARDSVC_LOG_FORMAT="json",
        CARDSVC_DB_POOL_MIN="1",
        CARDSVC_DB_POOL_MAX="12",
        TMPDIR=str(tmp),  # the per-worker metrics directory lands here, where a test can look
    )
    env.update(extra)
    return env


def _alive(pid: int) -> bool:
    """Running, not a zombie: the killed workers of a killed supervisor stay zombies where nothing reaps
    orphans (a container whose first process does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Service:
    """`cardsvc serve` in a subprocess, with a signed HTTP client for it."""

    def __init__(
        self, tmp: Path, dsn: str, keys: KeyRing, *, workers: int = 1, client_timeout_s: float = 30.0
    ) -> None:
        self.tmp = tmp
        self.dsn = dsn
        self.keys = keys
        self.workers = workers
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.key_file = tmp / "keys.json"
        if not self.key_file.exists():
            keys.write(self.key_file)
        self.log_path = tmp / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.terminals: dict[str, Terminal] = {}
        # One connection per request: with several workers, the kernel spreads them over the workers.
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(total=client_timeout_s),
        )
        self.responses = 0  # answers received from the service (any status)

    async def add_terminal(self, kind: str) -> Terminal:
        conn = await asyncpg.connect(self.dsn)
        try:
            tid = f"t-{kind.replace('_', '-')}"
            secret = await terminals.add_terminal(conn, self.keys.terminal_kek, tid, kind, "test-org")
        finally:
            await conn.close()
        self.terminals[kind] = Terminal(tid, "k1", secret)
        return self.terminals[kind]

    def start(self, *args: str, **env: str) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*cli_command(), "serve", "--workers", str(self.workers), *args],
                env=service_env(self.tmp, self.dsn, self.key_file, self.port, **env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for kill_all()
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"cardsvc exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                return (await self.get("/readyz", sign=False))[0] == 200
            except aiohttp.ClientConnectionError:
                return False

        await poll("the service to be ready", ready)
        await poll(f"{self.workers} worker(s) to listen", self._all_listening)

    async def _all_listening(self) -> bool:
        return len(self.live_worker_pids()) == self.workers

    def listening_pids(self) -> set[int]:
        pids = set()
        for line in self.log().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if isinstance(entry, dict) and entry.get("msg") == "listening":
                    pids.add(int(entry["pid"]))
        return pids

    def signed_headers(
        self, method: str, path: str, body: bytes, as_: str, nonce: str | None = None
    ) -> dict[str, str]:
        t = self.terminals[as_]
        headers = terminal_auth.sign_request(
            t.terminal_id, t.key_id, t.secret, method, path, body, nonce=nonce
        )
        if body:
            headers["Content-Type"] = "application/json"
        return headers

    async def send(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        async with self.http.request(method, self.base + path, data=body, headers=headers or {}) as resp:
            raw = await resp.read()
            self.responses += 1
            ctype = resp.headers.get("Content-Type", "")
            parsed = orjson.loads(raw) if raw and "json" in ctype else raw.decode(errors="replace")
            return resp.status, resp.headers, parsed

    async def get(self, path: str, *, as_: str = "card_office", sign: bool = True) -> tuple[int, Any, Any]:
        return await self.send("GET", path, b"", self.signed_headers("GET", path, b"", as_) if sign else None)

    async def post(self, path: str, body: Any, *, as_: str) -> tuple[int, Any, Any]:
        data = orjson.dumps(body)
        return await self.send("POST", path, data, self.signed_headers("POST", path, data, as_))

    async def post_raw(self, path: str, body: bytes, *, as_: str) -> tuple[int, Any, Any]:
        """POST these exact body bytes, signed afresh (a retry is a new signed request)."""
        return await self.send("POST", path, body, self.signed_headers("POST", path, body, as_))

    def kill_all(self) -> None:
        """SIGKILL to the supervisor and every worker at once (the host's power going)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def live_worker_pids(self) -> set[int]:
        return {p for p in self.listening_pids() if _alive(p)}

    def replaced(self, pid: int) -> Callable[[], Awaitable[bool]]:
        """A poll condition: worker `pid` is gone and as many workers as configured listen again."""

        async def check() -> bool:
            return not _alive(pid) and len(self.live_worker_pids()) == self.workers

        return check

    async def terminate(self) -> int:
        """SIGTERM, then the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 60)

    async def close(self) -> None:
        await self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:  # in a thread: the test's event loop may serve the service meanwhile (a proxy)
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)



async def load_people(dsn: str, keys: KeyRing, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await demo.load_population(conn, keys, count)
    finally:
        await conn.close()


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), sample.value))
    return out
