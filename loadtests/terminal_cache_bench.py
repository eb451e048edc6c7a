"""What a worker's terminal cache costs to refresh, at the benchmark's and at a city's number of terminals.

    ./dev bench terminals                          # 5,500 and 100,000 terminals; writes docs/benchmarks.*
    ./dev bench terminals --terminals 20000 --docs-dir /tmp/docs

Every worker keeps all terminals and their keys in memory (cardsvc/security/terminals.py) and refreshes
it when a terminal changes anywhere and once a minute. The refresh runs on the worker's event loop, so
while it decrypts keys no request of that worker is answered. For each size, in a database of its own on
the embedded PostgreSQL in `--data-dir` (terminals and keys written by COPY): the first load (every
terminal: what each refresh cost before migration 0021), a refresh with nothing changed, and a refresh
after one key rotation, each timed `--repeat` times with time.perf_counter (median and maximum).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from loadtests.bench import start_report
from loadtests.transit_bench import merge_section

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN = "<!-- terminal-cache-bench:begin -->"
MARK_END = "<!-- terminal-cache-bench:end -->"
DB_NAME = "terminal_cache_bench"


def _ms(samples: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(samples) * 1000, 2), "max_ms": round(max(samples) * 1000, 2)}


async def _fill(conn: Any, kek: bytes, count: int) -> None:
    from cardsvc.security import terminals
    from protocols import sm

    ops = sorted(terminals.KINDS["transit_validator"])
    await conn.copy_records_to_table(
        "terminal",
        columns=["terminal_id", "kind", "org", "operations"],
        records=((f"gate-{i}", "transit_validator", "bench", ops) for i in range(count)),
    )
    await conn.copy_records_to_table(
        "terminal_key",
        columns=["terminal_id", "key_id", "secret_cipher"],
        records=(
            (f"gate-{i}", "k1", sm.sm4_gcm_encrypt(kek, i.to_bytes(32, "big"), terminals.secret_aad(f"gate-{i}", "k1")))
            for i in range(count)
        ),
    )
    # as autovacuum would have by the time of a refresh: the COPY left a dead head row per terminal and key
    await conn.execute("VACUUM ANALYZE terminal, terminal_key, terminal_head")


async def measure(admin_dsn: str, count: int, repeat: int) -> dict[str, Any]:
    import asyncpg

    from cardsvc.security import terminals
    from cardsvc.security.keys import KeyRing
    from cardsvc.store import migrate

    kek = KeyRing.generate().terminal_kek
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {DB_NAME}")
        conn = await asyncpg.connect(admin_dsn, database=DB_NAME)
        try:
            await migrate.apply(conn)
            await _fill(conn, kek, count)
            full, unchanged, rotated = [], [], []
            for i in range(repeat):
                cache = terminals.TerminalRegistry(kek, 60.0)
                t0 = time.perf_counter()
                read = await cache.load(conn)
                full.append(time.perf_counter() - t0)
                assert read == count, (read, count)
                # Steady state: the first refresh after a whole load (once per worker start) also pays for
                # the load's aftermath (its garbage, the head row's pages touched first); ~30 ms at 100,000.
                await cache.load(conn)
                gc.collect()
                t0 = time.perf_counter()
                assert await cache.load(conn) == 0
                unchanged.append(time.perf_counter() - t0)
                await terminals.rotate_key(conn, kek, f"gate-{i}", f"r{i}", 600)
                gc.collect()
                t0 = time.perf_counter()
                assert await cache.load(conn) == 1
                rotated.append(time.perf_counter() - t0)
        finally:
            await conn.close()
        await admin.execute(f"DROP DATABASE {DB_NAME} WITH (FORCE)")
    finally:
        await admin.close()
    return {"terminals": count, "full_load": _ms(full), "refresh_unchanged": _ms(unchanged),
            "refresh_one_rotation": _ms(rotated), "repeat": repeat}


def render(info: dict[str, Any], command: str, results: list[dict[str, Any]]) -> str:
    rows = "\n".join(
        f"| {r['terminals']:,} | {r['full_load']['median_ms']:,} ({r['full_load']['max_ms']:,}) "
        f"| {r['refresh_unchanged']['median_ms']:,} ({r['refresh_unchanged']['max_ms']:,}) "
        f"| {r['refresh_one_rotation']['median_ms']:,} ({r['refresh_one_rotation']['max_ms']:,}) |"
        for r in results
    )
    return f"""{MARK_BEGIN}
## Terminal cache: what a refresh costs a worker

Measured on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `{command}` (loadtests/terminal_cache_bench.py);
machine: {info['cpu_model']}, {info['cores']} cores, {info['postgresql']}, code at {info['code']}.
Milliseconds, median (maximum) of {results[0]['repeat']} tries each. A refresh runs on the worker's event
loop: for that long none of the worker's requests is answered. Every refresh read the whole registry
before migration 0021 (the first column); now a refresh reads what changed since the last one (timed after
one untimed refresh: the first after a whole load, once per worker start, also pays for the load's
garbage).

| terminals | whole registry (first load) | refresh, nothing changed | refresh after one key rotation |
| ---: | ---: | ---: | ---: |
{rows}
{MARK_END}
"""


def write_docs(docs_dir: Path, section: str, results: list[dict[str, Any]]) -> None:
    docs_dir.mkdir(parents=True, exist_ok=True)
    json_path = docs_dir / "benchmarks.json"
    data: dict[str, Any] = orjson.loads(json_path.read_bytes()) if json_path.exists() else {}
    data["terminal_cache"] = results
    json_path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    md_path = docs_dir / "benchmarks.md"
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    md_path.write_text(merge_section(text, section, MARK_BEGIN, MARK_END))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.terminal_cache_bench",
        description="Time the workers' terminal cache: a whole load and a refresh, at several sizes.",
    )
    p.add_argument("--terminals", type=int, nargs="+", default=[5_500, 100_000],
                   help="registry sizes to measure (default: the 40M benchmark's ~5,500, and a city's 100,000)")
    p.add_argument("--repeat", type=int, default=5, help="tries per measurement (default 5)")
    p.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "bench-terminals",
                   help="the embedded PostgreSQL's data dir (created if missing; default .data/bench-terminals)")
    p.add_argument("--admin-dsn", help="a server to use instead of the embedded one (its role needs CREATEDB)")
    p.add_argument("--docs-dir", type=Path, default=ROOT / "docs",
                   help="where benchmarks.md and benchmarks.json are updated (default docs/)")
    args = p.parse_args(argv)
    if args.repeat < 1 or any(n < args.repeat for n in args.terminals):
        p.error("--repeat is at least 1, and every size at least --repeat")
    info, cmds = start_report("loadtests.terminal_cache_bench", argv)
    server = None
    admin_dsn = args.admin_dsn
    if admin_dsn is None:
        from cardsvc.store.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(args.data_dir / "pg")
        server.start()
        admin_dsn = server.dsn("postgres")
    results = []
    try:
        for count in args.terminals:
            print(f"{count:,} terminals ...", flush=True)
            r = asyncio.run(measure(admin_dsn, count, args.repeat))
            print(f"  {orjson.dumps(r).decode()}", flush=True)
            results.append(r)
    finally:
        if server is not None:
            server.stop()
    write_docs(args.docs_dir, render(info, cmds.log[0], results), results)
    print(f"wrote {args.docs_dir / 'benchmarks.md'} and benchmarks.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
