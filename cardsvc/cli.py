"""The `cardsvc` command: run the service and administer it. `cardsvc <command> --help` explains each."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from cardsvc import limits, localtime
from cardsvc.config import ConfigError, Settings, load_settings
from protocols import population

__all__ = ["main"]

T = TypeVar("T")

EPILOG = """Configuration: CARDSVC_* environment variables or a TOML file (--config / CARDSVC_CONFIG);
see docs/configuration.md. Without CARDSVC_DATABASE_URL every command uses the embedded PostgreSQL in
<data_dir>/pg (default .data/pg), starting it when needed."""


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _run(coro: Awaitable[T]) -> T:
    import uvloop

    return uvloop.run(coro)  # type: ignore[arg-type]


async def _connect(settings: Settings) -> Any:
    import asyncpg

    from cardsvc.store.pool import init_connection, resolve_dsn

    conn = await asyncpg.connect(resolve_dsn(settings), timeout=settings.db_connect_timeout_s)
    await init_connection(conn)
    return conn


def _keys(settings: Settings, create: bool = False) -> Any:
    from cardsvc.security.keys import KeyRing

    if create:
        ring, created = KeyRing.load_or_create(settings.key_path)
        if created:
            print(f"created a new key file {settings.key_path} (mode 0600); keep it safe", file=sys.stderr)
        return ring
    return KeyRing.load(settings.key_path)


# ------------------------------------------------------------------ serve, migrate, demo


async def _migrate(settings: Settings, check_only: bool = False) -> int:
    from cardsvc.store import migrate

    conn = await _connect(settings)
    try:
        if check_only:
            todo = await migrate.pending(conn)
            for m in todo:
                print(f"pending: {m.version:04d}_{m.name}")
            print("schema is current" if not todo else f"{len(todo)} migration(s) pending")
            return 1 if todo else 0
        for m in await migrate.apply(conn):
            print(f"applied {m.version:04d}_{m.name}")
        print("schema is current")
        return 0
    finally:
        await conn.close()


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc.logs import setup_logging
    from cardsvc.server import serve
    from cardsvc.store.pool import resolve_dsn

    setup_logging(settings.log_level, settings.log_format)
    keys = _keys(settings, create=settings.embedded)
    dsn = resolve_dsn(settings)
    if settings.embedded:  # the zero-setup default keeps its own schema current
        _run(_migrate(settings))
    else:  # refuse here, once: workers that fail at start-up would be restarted forever
        todo = _run(_pending_migrations(settings))
        if todo:
            print(
                f"error: database schema is behind: {len(todo)} migration(s) pending "
                f"({', '.join(todo)}); run `cardsvc migrate`",
                file=sys.stderr,
            )
            return 1
    incomplete = _run(_start_refusal(settings, keys.terminal_kek))
    if incomplete:
        print(f"error: {incomplete}", file=sys.stderr)
        return 1
    return serve(settings, dsn, settings.key_path)


async def _start_refusal(settings: Settings, kek: bytes) -> str | None:
    """Why the service must not start on this database, checked once before the workers: a key file that
    is not the database's (every worker would fail on it), or a seed that did not finish."""
    from cardsvc.security import terminals
    from cardsvc.store.seed_state import interrupted_seed

    conn = await _connect(settings)
    try:
        try:
            await terminals.check_key_file(conn, kek)
        except terminals.KeyFileMismatch as exc:
            return f"{exc}: {settings.key_path}"
        return await interrupted_seed(conn)
    finally:
        await conn.close()


async def _interrupted_seed(settings: Settings) -> str | None:
    from cardsvc.store.seed_state import interrupted_seed

    conn = await _connect(settings)
    try:
        return await interrupted_seed(conn)
    finally:
        await conn.close()


async def _pending_migrations(settings: Settings) -> list[str]:
    from cardsvc.store import migrate

    conn = await _connect(settings)
    try:
        return [f"{m.version:04d}_{m.name}" for m in await migrate.pending(conn)]
    finally:
        await conn.close()


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    return _run(_migrate(settings, check_only=args.check))


async def _demo_data(settings: Settings, count: int) -> dict[str, Any]:
    from cardsvc import demo
    from cardsvc.store.seed_state import SEED_LOCK_KEY, interrupted_seed

    rules = _fare_table(settings).rules
    keys = _keys(settings, create=True)
    await _migrate(settings)
    conn = await _connect(settings)
    try:  # a loader too: never beside a seed (the seed's lock, held until this connection closes)
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SEED_LOCK_KEY):
            raise SystemExit("error: a seed is loading this database; wait for it to finish")
        if (incomplete := await interrupted_seed(conn)) is not None:
            raise SystemExit(f"error: {incomplete}")
        rule = demo.ConcessionRule(
            localtime.today(), rules.elderly_min_age, rules.elderly_annual_quota
        )
        with _bar(count, "card", "demo data") as bar:
            try:
                added = await demo.load_population(conn, keys, count, bar.update, rule)
            except demo.DemoDataConflict as exc:
                raise SystemExit(f"error: {exc}") from None
        creds = await demo.ensure_demo_terminals(conn, keys, settings.data_dir / "demo-terminals.json")
        kinds = await conn.fetch(
            """SELECT kind, count(*) AS n, min(holder_id) - 1 AS first FROM concession
               WHERE holder_id <= $1 AND ended_at IS NULL GROUP BY kind ORDER BY kind""",
            count,
        )
    finally:
        await conn.close()
    print(
        f"demo data: {count} cards ({added} added); terminals in {settings.data_dir / 'demo-terminals.json'}",
        file=sys.stderr,
    )
    if kinds:
        print(
            "concessions: "
            + ", ".join(f"{r['kind']} {r['n']} (e.g. --index {r['first']})" for r in kinds),
            file=sys.stderr,
        )
    return creds


def cmd_demo_data(settings: Settings, args: argparse.Namespace) -> int:
    _run(_demo_data(settings, args.cards))
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    _run(_demo_data(settings, args.cards))
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"""
cardsvc demo on {base} (Ctrl-C stops it). In another shell, try:
  .venv/bin/cardsvc call GET /v1/cards/A00000001 --as card_office
  .venv/bin/cardsvc demo-credential ecard-code --index 1 | .venv/bin/cardsvc call POST /v1/ecard-codes/verify --as merchant_pos --data @-
  .venv/bin/cardsvc demo-credential card-auth --index 2 | .venv/bin/cardsvc call POST /v1/card-auth --as transit_validator --data @-
  .venv/bin/cardsvc demo-credential tap --index 9 | .venv/bin/cardsvc call POST /v1/transit/taps --as transit_validator --data @-
  curl -s {base}/metrics | grep cardsvc_credential
""",
        file=sys.stderr,
    )
    return cmd_serve(settings, args)


def cmd_seed(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc import demo, seed
    from cardsvc.store.pool import resolve_dsn

    rules = _fare_table(settings).rules
    opts = seed.SeedOptions(
        count=args.count,
        seed=args.seed.encode(),
        jobs=args.jobs,
        key_pool=args.ecard_key_pool,
        append=args.append,
        elderly_min_age=rules.elderly_min_age,
        elderly_quota=rules.elderly_annual_quota,
    )

    async def go() -> seed.SeedReport:
        keys = _keys(settings, create=True)
        await _migrate(settings)
        with _bar(args.count, "card", "seed") as bar:
            log = (lambda msg: bar.write(msg, file=sys.stderr)) if args.verbose else None
            report = await seed.seed(resolve_dsn(settings), keys, opts, bar.update, log)
        conn = await _connect(settings)
        try:
            await demo.ensure_demo_terminals(conn, keys, settings.data_dir / "demo-terminals.json")
        finally:
            await conn.close()
        return report

    try:
        report = _run(go())
    except seed.SeedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the event loop cancels the seed, then raises this
        try:
            incomplete = _run(_interrupted_seed(settings))
        except Exception:  # e.g. interrupted before the schema was migrated
            incomplete = None
        print(f"interrupted{': ' + incomplete if incomplete else ''}", file=sys.stderr)
        return 130
    print(seed.format_report(report))
    print(
        f"load generators: population.person(i, {args.seed!r}) and "
        f"population.ecard_device_seed(i, {args.seed!r}, {args.ecard_key_pool}) for i in "
        f"{report.first_index}..{report.first_index + report.count - 1}; terminals in "
        f"{settings.data_dir / 'demo-terminals.json'}"
    )
    return 0


# ------------------------------------------------------------------ embedded database


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc.store.embedded import EmbeddedPostgres

    if not settings.embedded:
        print("CARDSVC_DATABASE_URL is set: the embedded database is not in use", file=sys.stderr)
        return 2
    server = EmbeddedPostgres(settings.pg_data_dir)
    if args.action == "start":
        print(server.start())
    elif args.action == "stop":
        server.stop()
        print("stopped")
    elif args.action == "status":
        running = server.running()
        print(f"{'running' if running else 'stopped'}: {server.data_dir}")
        return 0 if running else 3
    elif args.action == "url":  # a URL that connects: the server is started if it is not running
        print(server.start())
    elif args.action == "psql":
        server.start()
        psql = str(server.tool("psql"))
        os.execv(psql, [psql, "-h", str(server.socket_dir), "-U", "postgres", "cardsvc"])  # noqa: S606
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc.security.keys import KeyRing

    if settings.key_path.exists():
        print(
            f"{settings.key_path} exists; refusing to overwrite keys (data sealed with them would be lost)",
            file=sys.stderr,
        )
        return 1
    KeyRing.generate().write(settings.key_path)
    print(f"wrote {settings.key_path} (mode 0600)")
    return 0


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    _print_json(settings.public_dict())
    return 0


# ------------------------------------------------------------------ terminals


def _open_output(output: str | None) -> int | None:
    """The credentials file, created (mode 0600, never over an existing file) before the database is
    changed: a secret that cannot be written is never issued."""
    if not output:
        return None
    try:
        return os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SystemExit(f"error: cannot create {output}: {exc.strerror}") from None


def _write_credentials(data: dict[str, Any], fd: int | None, output: str | None) -> None:
    body = orjson.dumps(data, option=orjson.OPT_INDENT_2)
    if fd is not None:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        print(f"credentials written to {output} (mode 0600); they are not shown again", file=sys.stderr)
    else:
        print(body.decode())
        print("the secret above is shown once; store it in the terminal now", file=sys.stderr)


def cmd_terminal(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc.security import terminals
    from protocols import terminal_auth

    if args.action in ("add", "rotate-key", "disable", "enable") and not args.terminal_id:
        raise SystemExit(f"error: `cardsvc terminal {args.action}` needs a terminal ID")
    if args.action == "add" and not (args.kind and args.org):
        raise SystemExit("error: `cardsvc terminal add ID` needs --kind and --org")
    overlap_s = args.overlap_s if args.overlap_s is not None else settings.key_rotation_overlap_s

    async def go() -> int:
        keys = _keys(settings)
        fd = _open_output(args.output) if args.action in ("add", "rotate-key") else None
        written = False
        try:
            conn = await _connect(settings)
        except BaseException:
            if fd is not None:
                os.close(fd)
                os.unlink(args.output)
            raise
        try:
            if args.action in ("add", "rotate-key"):
                # The key and the file together: if the file cannot be written, the key is rolled back.
                async with conn.transaction():
                    if args.action == "add":
                        ops = args.operations.split(",") if args.operations else None
                        secret = await terminals.add_terminal(
                            conn, keys.terminal_kek, args.terminal_id, args.kind, args.org, ops,
                            args.description or "",
                        )  # fmt: skip
                        key_id = "k1"
                    else:
                        secret = await terminals.rotate_key(
                            conn, keys.terminal_kek, args.terminal_id, args.key_id, overlap_s
                        )
                        key_id = args.key_id
                    data = {
                        "terminal_id": args.terminal_id,
                        "key_id": key_id,
                        "secret": terminal_auth.encode_secret(secret),
                    }
                    if fd is not None:
                        owned, fd = fd, None  # its descriptor is closed by the writing, whatever happens
                        _write_credentials(data, owned, args.output)
                written = True  # committed with its file
                if not args.output:  # shown only once the key is committed
                    _write_credentials(data, None, None)
            elif args.action == "list":
                rows = await conn.fetch(
                    """SELECT t.terminal_id, t.kind, t.org, t.operations, t.disabled,
                              array_agg(k.key_id ORDER BY k.created_at) FILTER (WHERE k.key_id IS NOT NULL
                                  AND (k.not_after IS NULL OR k.not_after > now())) AS keys
                       FROM terminal t LEFT JOIN terminal_key k USING (terminal_id)
                       GROUP BY t.terminal_id ORDER BY t.terminal_id"""
                )
                _print_json([dict(r) for r in rows])
            elif args.action in ("disable", "enable"):
                done = await conn.execute(
                    "UPDATE terminal SET disabled = $2 WHERE terminal_id = $1",
                    args.terminal_id,
                    args.action == "disable",
                )
                if done.endswith(" 0"):
                    print(f"no terminal {args.terminal_id}", file=sys.stderr)
                    return 1
                print(f"{args.terminal_id} {args.action}d")
            elif args.action == "kinds":
                _print_json({k: sorted(v) for k, v in terminals.KINDS.items()})
            return 0
        except terminals.TerminalAdminError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if args.output and args.action in ("add", "rotate-key") and not written:  # nothing issued: no file
                if fd is not None:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(args.output)
            await conn.close()

    return _run(go())


# ------------------------------------------------------------------ cards (card office, from a shell)


def cmd_card(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc.errors import ApiError
    from cardsvc.flows import lifecycle, registry
    from cardsvc.flows.actor import Actor
    from protocols import api

    async def go() -> int:
        conn = await _connect(settings)
        now = dt.datetime.now(dt.UTC)
        actor = Actor("cli", args.operator or getpass.getuser())
        try:
            if args.action == "show":
                _print_json(await registry.get_card(conn, args.card_no, now))
            elif args.action == "events":
                _print_json(await registry.list_events(conn, args.card_no, args.limit))
            else:
                body = {"operator": actor.operator}
                if args.action == "replace":
                    body |= {
                        "new_card_no": args.new_card_no,
                        "new_card_sn": args.new_card_sn,
                        "expires_on": args.expires_on,
                    }
                parsed = api.CARD_OPERATIONS[args.action].parse(body)
                _print_json(
                    await lifecycle.apply(
                        conn, args.card_no, args.action, parsed, actor, now, settings.temp_loss_days
                    )
                )
            return 0
        except ApiError as exc:
            print(f"error: {exc.code}: {exc.detail or exc.title}", file=sys.stderr)
            return 1
        except api.ApiInputError as exc:
            print(f"error: {exc.code}: {exc.detail}", file=sys.stderr)
            return 1
        finally:
            await conn.close()

    return _run(go())


# ------------------------------------------------------------------ signing client


_CREDENTIAL_KEYS = ("terminal_id", "key_id", "secret")


def _credentials(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    if args.credentials:
        try:
            data = orjson.loads(Path(args.credentials).read_bytes())
        except orjson.JSONDecodeError:
            raise SystemExit(f"error: {args.credentials} is not JSON (a terminal's credentials file)") from None
        if not (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in _CREDENTIAL_KEYS)):
            raise SystemExit(
                f"error: {args.credentials} is not a terminal's credentials file (the JSON that `cardsvc terminal "
                f"add` writes: {', '.join(_CREDENTIAL_KEYS)}); the key file is not one"
            )
        return data
    demo_file = settings.data_dir / "demo-terminals.json"
    if not demo_file.exists():
        raise SystemExit(f"no --credentials given and no {demo_file}; run `cardsvc demo-data` first")
    creds: dict[str, Any] = orjson.loads(demo_file.read_bytes())
    if args.as_ not in creds:
        raise SystemExit(f"--as must be one of {', '.join(creds)}")
    result: dict[str, Any] = creds[args.as_]
    return result


def cmd_call(settings: Settings, args: argparse.Namespace) -> int:
    from protocols import terminal_auth

    creds = _credentials(settings, args)
    body = b""
    if args.data is not None:
        body = (
            sys.stdin.buffer.read()
            if args.data == "@-"
            else (Path(args.data[1:]).read_bytes() if args.data.startswith("@") else args.data.encode())
        )
    method = args.method.upper()
    headers = terminal_auth.sign_request(
        creds["terminal_id"],
        creds["key_id"],
        terminal_auth.decode_secret(creds["secret"]),
        method,
        args.path,
        body,
    )
    if body:
        headers["Content-Type"] = "application/json"
    if not args.path.startswith("/"):
        raise SystemExit(f"error: the path must start with / (/{args.path}?)")
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/") + args.path
    if not url.startswith(("http://", "https://")):
        raise SystemExit("error: --url must be http:// or https://")
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        raise SystemExit(f"error: --url is not a URL: {exc}") from None
    req = urllib.request.Request(url, data=body or None, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    except urllib.error.URLError as exc:
        print(f"error: cannot reach {url}: {exc.reason}", file=sys.stderr)
        return 2
    try:
        _print_json(orjson.loads(payload))
    except orjson.JSONDecodeError:
        sys.stdout.write(payload.decode(errors="replace"))
    print(f"HTTP {status}", file=sys.stderr)
    return 0 if status < 400 else 1


def cmd_demo_credential(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc import demo
    from protocols import card, population

    p = population.person(args.index, demo.DEMO_SEED)
    now = int(time.time())
    if args.kind == "ecard-code":
        if not p.has_ecard:
            raise SystemExit(f"demo person {args.index} has no electronic card (every 5th has none)")
        device = demo.demo_device(args.index, args.ecard_key_pool)
        device.counter = int(time.time() * 1000) % 2**31  # a fresh counter for every call from a shell
        _print_json({"code": device.next_code(now), "business_type": args.business_type})
    else:
        keys = _keys(settings)
        sim = card.CardSimulator(p.card_sn, master_key=keys.card_auth_master)
        body: dict[str, Any] = card.build_card_auth_request(sim, now, os.urandom(4))
        if args.kind == "tap":
            body.update(_demo_tap(settings, args, now))
        _print_json(body)
    return 0


def _demo_tap(settings: Settings, args: argparse.Namespace, now: int) -> dict[str, Any]:
    """The rest of an online tap at a demo validator: where, which way, and a fresh terminal_seq."""
    table = _fare_table(settings)
    where: dict[str, Any]
    if args.station:
        station = table.stations.get(args.station)
        if station is None:
            raise SystemExit(f"no station {args.station!r} in the fare table (docs/fares.md lists the demo's)")
        where = {"mode": "metro", "line_id": station.line, "station_id": args.station,
                 "direction": args.direction or "in"}  # fmt: skip
    else:
        if args.line not in table.bus_lines:
            raise SystemExit(f"no bus line {args.line!r} in the fare table: one of {', '.join(table.bus_lines)}")
        where = {"mode": "bus", "line_id": args.line, "direction": "single"}
    # A fresh sequence number per call from a shell (milliseconds, within the 32-bit range); a retry of
    # the same tap sends the printed body again.
    seq = int(time.time() * 1000) % 2**32
    return {"terminal_seq": seq, "time": now, "credential": "card", **where}


# ------------------------------------------------------------------ clearing and audit


def _fare_table(settings: Settings) -> Any:
    from cardsvc.transit import fares

    return fares.load_table(settings.fare_table) if settings.fare_table else fares.load_demo_table()


PROGRESS_LINE_S = 30.0  # a progress line this often when standard error is not a terminal


class _LineBar:
    """The progress of a long load on a standard error that is not a terminal (a log file, the journal
    under systemd): a line every PROGRESS_LINE_S seconds and one at the end, with the count, the share and
    the rate; never a carriage return."""

    def __init__(self, total: int, unit: str, desc: str) -> None:
        self.total, self.unit, self.desc = total, unit, desc
        self.done = 0
        self.started = self.shown = time.monotonic()

    def __enter__(self) -> _LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.done:
            self._line()

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.monotonic() - self.shown >= PROGRESS_LINE_S:
            self._line()

    @staticmethod
    def write(message: str, file: Any = None) -> None:  # (tqdm.write's signature)
        print(message, file=file or sys.stderr, flush=True)

    def _line(self) -> None:
        self.shown = time.monotonic()
        rate = self.done / max(self.shown - self.started, 1e-9)
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        self.write(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s{share}, {rate:,.0f}/s")


def _bar(total: int, unit: str, desc: str) -> Any:
    """A progress bar on standard error: tqdm's on a terminal, a line every half minute otherwise."""
    if not sys.stderr.isatty():
        return _LineBar(total, unit, desc)
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc)


def _progress(message: str) -> None:
    """A progress line on standard error: rewritten in place on a terminal, one line each otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K" + message)
    else:
        sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _register_operator(settings: Settings, args: argparse.Namespace) -> int:
    """`clearing register`: an operator no longer (or not yet) in the fare table, so that its days can
    still be cleared and the audit knows where its fares go."""
    from protocols.clearing import OPERATOR_ID_RE

    if not args.operator or not OPERATOR_ID_RE.fullmatch(args.operator) or not (args.name or "").strip():
        print("error: register needs --operator (1-16 of A-Z a-z 0-9 _ -) and --name", file=sys.stderr)
        return 2

    async def go() -> None:
        conn = await _connect(settings)
        try:
            await conn.execute(
                """INSERT INTO transit_operator (operator_id, name) VALUES ($1, $2)
                   ON CONFLICT (operator_id) DO UPDATE SET name = EXCLUDED.name""",
                args.operator, args.name.strip(),
            )  # fmt: skip
        finally:
            await conn.close()

    _run(go())
    print(f"operator {args.operator} registered for clearing")
    return 0


def cmd_clearing(settings: Settings, args: argparse.Namespace) -> int:
    import asyncpg

    from cardsvc.transit import clearing

    if args.action == "register":
        return _register_operator(settings, args)
    day: dt.date | None = None
    if args.date:
        # (fromisoformat alone also reads 20261130 and 2026-W48-1: the clearing file names the day as given)
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
            print(f"error: --date must be YYYY-MM-DD, got {args.date!r}", file=sys.stderr)
            return 2
        try:
            day = dt.date.fromisoformat(args.date)
        except ValueError:
            print(f"error: --date {args.date} is not a day of the calendar", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else settings.data_dir / "clearing"
    table = _fare_table(settings)
    if day is not None:
        try:
            clearing.business_day_bounds(table, day)
        except OverflowError:
            print(f"error: --date {args.date} is out of range", file=sys.stderr)
            return 2
    errors: list[str] = []

    async def go() -> list[Any]:
        conn = await _connect(settings)
        try:
            if day is not None:
                todo: list[tuple[dt.date, list[str] | None]] = [(day, [args.operator] if args.operator else None)]
            else:
                try:
                    due = await clearing.days_to_clear(conn, table, operator_id=args.operator)
                except clearing.ClearingError as exc:  # an unknown --operator
                    errors.append(str(exc))
                    return []
                if not due.todo:
                    print(f"nothing to clear up to {due.last_over}, the last day that is over", file=sys.stderr)
                every = set(await clearing.operators(conn, table))
                # A day missing for every operator is one run (one aggregate); otherwise only its missing
                # operators, so that the files already made are not written again.
                todo = [(d, None if set(ops) == every else ops) for d, ops in due.todo]
            results: list[Any] = []
            for k, (d, ops) in enumerate(todo, 1):
                if len(todo) > 1:
                    _progress(f"clearing {d} ({k}/{len(todo)})")
                one_each: list[str | None] = list(ops) if ops else [None]
                for op in one_each:
                    try:
                        results += await clearing.clear_day(
                            conn, table, d, out, operator_id=op, progress=_progress, settle_s=args.wait
                        )
                    except (clearing.ClearingError, OSError, asyncpg.PostgresError) as exc:
                        # that day (and operator) only: the others go on, and the output stays whole
                        errors.append(f"{d}{' ' + op if op else ''}: {exc}")
            return results
        finally:
            await conn.close()

    results = _run(go())
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if args.json:
        _print_json([r.to_json() for r in results])
    else:
        for r in results:
            where = f" -> {r.path}" if r.path else ""
            note = f" ({r.detail})" if r.detail else ""
            fixes = (f", {r.correction_count} corrections -{r.correction_fen} fen, net {r.total_fen - r.correction_fen} fen"
                     if r.correction_count else "")  # fmt: skip
            print(f"{r.status.upper():9} {r.operator_id} {r.business_date}: {r.txn_count} txns, "
                  f"{r.total_fen} fen{fixes}{where}{note}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 0 if all(r.ok for r in results) and not errors else 1


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc import audit

    async def go() -> Any:
        conn = await _connect(settings)
        try:
            at, checks = await audit.run_audit(
                conn, settings, _fare_table(settings), chunk_cards=args.chunk_cards,
                progress=_progress,
            )
            run_id = await audit.record_run(conn, at, checks) if args.record else None
            return at, checks, run_id
        finally:
            await conn.close()

    at, checks, run_id = _run(go())
    ok = all(c.ok for c in checks)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if run_id is not None:
        print(f"recorded as audit run {run_id}", file=sys.stderr)
    if args.json:
        _print_json({"ok": ok, "snapshot_at": at.isoformat(), "checks": [c.to_json() for c in checks]})
    else:
        for c in checks:
            print(c.line())
        print(f"audit {'PASSED' if ok else 'FAILED'}: {sum(c.ok for c in checks)}/{len(checks)} checks pass "
              f"(snapshot {at.isoformat()})")
    return 0 if ok else 1


def cmd_fares(settings: Settings, args: argparse.Namespace) -> int:
    from cardsvc.transit import fares, table_check

    path = args.table or settings.fare_table
    table = fares.load_table(path) if path else fares.load_demo_table()
    print(f"fare table {table.version} ({table.source}): valid, effective from {table.effective_from}")
    print(f"  {len(table.operators)} operators, {len(table.bus_lines)} bus lines, {len(table.metro_lines)} metro "
          f"lines, {len(table.stations)} stations, {len(table.retired)} retired")  # fmt: skip
    if args.no_database:
        return 0

    async def go() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        conn = await _connect(settings)
        try:
            stations, operators = await table_check.stations_in_use(
                conn, chunk_cards=args.chunk_cards, progress=_progress
            )
            return stations, operators, await table_check.unknown_operators(conn, table, operators)
        finally:
            await conn.close()

    used, operators, gone = _run(go())
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    unknown = table_check.unknown_stations(table, used)
    retired = sorted(s for s in used if s in table.retired)
    print(f"stored journeys name {len(used)} stations"
          + (f", {len(retired)} of them retired: {', '.join(retired)}" if retired else "")
          + f", and {len(operators)} operator{'s' * (len(operators) != 1)}")  # fmt: skip
    if not unknown and not gone:
        print("every one is priced by this table")
        return 0
    if unknown:
        n = len(unknown)
        print(f"{n} station{'s' * (n != 1)} this table cannot price (list under metro.retired):", file=sys.stderr)
        for station, cards in unknown.items():
            print(f"  {station}: {cards} card{'s' * (cards != 1)}", file=sys.stderr)
    if gone:
        n = len(gone)
        print(f"{n} operator{'s' * (n != 1)} running no metro line in this table and not registered "
              "(cardsvc clearing register --operator ID --name NAME):", file=sys.stderr)  # fmt: skip
        for operator, cards in gone.items():
            print(f"  {operator}: {cards} card{'s' * (cards != 1)}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------ parser


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {lo} or more" if hi is None else f"must be {lo} to {hi}")
        return value

    return parse


def _card_no(text: str) -> str:
    """An argparse type: a card number as the API reads it (9 characters A-Z 0-9; lowercase uppercased)."""
    from protocols.card import validate_card_no
    from protocols.errors import CodecError

    try:
        return validate_card_no(text)
    except CodecError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("must be a finite number of seconds, 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cardsvc",
        description="cardsvc: one credential (social security card or e-card) for every public service.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file (overrides CARDSVC_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[Settings, argparse.Namespace], int], help_: str, desc: str = ""
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=desc or help_,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(fn=fn)
        return p

    def server_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="listen address (CARDSVC_HOST, default 127.0.0.1)")
        p.add_argument("--port", type=int, help="listen port (CARDSVC_PORT, default 8080)")
        p.add_argument(
            "--workers", type=int, help="worker processes sharing the port (CARDSVC_WORKERS, default 1)"
        )

    p = add(
        "serve",
        cmd_serve,
        "run the HTTP service",
        "Run the service until SIGTERM/SIGINT (graceful: in-flight requests finish). With an external\n"
        "database the schema must be current (`cardsvc migrate`); the embedded default migrates itself.",
    )
    server_opts(p)

    p = add(
        "demo",
        cmd_demo,
        "load demo data, then run the service",
        "Start the embedded database (or use CARDSVC_DATABASE_URL), create keys if there are none,\n"
        "migrate, load a synthetic population and one demo terminal of each kind, then serve.",
    )
    server_opts(p)
    p.add_argument("--cards", type=_int_in(1), default=1000, help="size of the demo population (default 1000)")

    p = add("demo-data", cmd_demo_data, "load demo data only (idempotent)")
    p.add_argument("--cards", type=_int_in(1), default=1000, help="size of the demo population (default 1000)")

    p = add(
        "seed",
        cmd_seed,
        "load a large synthetic registry fast (load and size tests)",
        "Create --count cardholders with active cards, transit purses (opening balance in the journal)\n"
        "and, for 80%, e-cards whose device keys come from a pool of --ecard-key-pool keys; transit\n"
        "concessions for about a quarter (elderly for ~80% of those at the fare table's elderly_min_age\n"
        "or older today, with its annual quota; disability kinds for ~2.6%); plus the demo terminals.\n"
        "Deterministic from --seed: load generators derive every card's identity and\n"
        "credentials from its index (protocols/population.py). Into an empty registry the indexes are\n"
        "built after the load; a registry with cards needs --append (slower). See docs/schema.md.",
    )
    p.add_argument(
        "--count", type=_int_in(1, population.POPULATION_MAX), required=True, help="cardholders to create"
    )
    p.add_argument("--seed", default="cardsvc-demo", help="population seed (default cardsvc-demo)")
    p.add_argument(
        "--jobs", type=_int_in(0, 256), default=0, help="generator processes (default 0: number of CPUs)"
    )
    p.add_argument(
        "--ecard-key-pool",
        type=_int_in(1, 1_000_000),
        default=4096,
        help="precomputed e-card device keys (default 4096)",
    )
    p.add_argument("--append", action="store_true", help="add to a registry that has cards (slower)")
    p.add_argument("--verbose", action="store_true", help="report every stage and index build")

    p = add(
        "demo-credential",
        cmd_demo_credential,
        "print a credential of a demo person, as a request body",
        "Compute what a demo person's card or phone would present: a card-authentication answer\n"
        "(needs the key file), a fresh e-card code, or an online transit tap with that card (a bus\n"
        "line, or a metro station and direction). Pipe it into `cardsvc call ... --data @-`.",
    )
    p.add_argument("kind", choices=["card-auth", "ecard-code", "tap"])
    p.add_argument(
        "--index",
        type=_int_in(0, population.POPULATION_MAX - 1),
        default=1,
        help="demo person number (default 1)",
    )
    p.add_argument("--line", default="bus-105", help="tap: the bus line (default bus-105)")
    p.add_argument("--station", help="tap: a metro station instead of a bus (e.g. l1-chaotianmen)")
    p.add_argument("--direction", choices=["in", "out"], help="tap: metro direction (default in)")
    p.add_argument(
        "--business-type",
        default="01",
        choices=["01", "02", "03", "04"],
        help="e-card scene: 01 query, 02 payment, 03 other, 04 cross-region medical",
    )
    p.add_argument(
        "--ecard-key-pool",
        type=_int_in(1),
        default=None,
        help="for a database made by `cardsvc seed`: its e-card key pool size (default: demo-data keys)",
    )

    p = add("migrate", cmd_migrate, "apply pending database migrations")
    p.add_argument("--check", action="store_true", help="only report; exit 1 if migrations are pending")

    p = add(
        "db",
        cmd_db,
        "manage the embedded PostgreSQL",
        "  start | stop   the server in <data_dir>/pg (it keeps running across service restarts)\n"
        "  status         running or stopped (exit 3 when stopped)\n"
        "  url            its connection URL (Unix socket), starting it when needed\n"
        "  psql           a psql shell on the cardsvc database, starting it when needed",
    )
    p.add_argument("action", choices=["start", "stop", "status", "url", "psql"])

    add(
        "keys",
        cmd_keys,
        "create the key file (refuses to overwrite one)",
        "Write a new key file (card authentication master key, TAC master key, PII hash and encryption\n"
        "keys, terminal key-encryption key) with mode 0600 at CARDSVC_KEY_FILE or <data_dir>/keys.json.",
    )
    add("config", cmd_config, "print the effective configuration (no secrets)")

    p = add(
        "terminal",
        cmd_terminal,
        "register terminals, rotate their keys, disable them",
        "Terminals sign every request with HMAC-SM3 (protocols/terminal_auth.md).\n"
        "  add ID --kind K --org O     create one; prints its credentials once\n"
        "  rotate-key ID --key-id K2   add a key; older keys stop after --overlap-s\n"
        "  list | kinds | disable ID | enable ID",
    )
    p.add_argument("action", choices=["add", "rotate-key", "list", "kinds", "disable", "enable"])
    p.add_argument("terminal_id", nargs="?", help="terminal id (1-32 of A-Z a-z 0-9 . _ -)")
    p.add_argument("--kind", help="terminal kind (see `cardsvc terminal kinds`)")
    p.add_argument("--org", help="owning organisation")
    p.add_argument("--operations", help="comma-separated subset of the kind's operations (default: all)")
    p.add_argument("--description", help="free text (no personal data)")
    p.add_argument("--key-id", default="k2", help="new key id for rotate-key (1-16 of A-Z a-z 0-9 . _ -)")
    p.add_argument(
        "--overlap-s",
        type=_int_in(0),
        default=None,
        help="how long older keys stay valid after rotate-key (default CARDSVC_KEY_ROTATION_OVERLAP_S, 7 days)",
    )
    p.add_argument("--output", help="write credentials to this file (mode 0600) instead of stdout")

    p = add(
        "card",
        cmd_card,
        "card office operations from a shell (audited as terminal 'cli')",
        "show CARD_NO | events CARD_NO | <operation> CARD_NO, where operation is one of\n"
        "activate, temporary-loss, lift-loss, formal-loss, replace, cancel, lock-pin, unlock-pin,\n"
        "lock-app, unlock-app.",
    )
    p.add_argument(
        "action",
        choices=[
            "show",
            "events",
            "activate",
            "temporary-loss",
            "lift-loss",
            "formal-loss",
            "replace",
            "cancel",
            "lock-pin",
            "unlock-pin",
            "lock-app",
            "unlock-app",
        ],
    )
    p.add_argument("card_no", type=_card_no)
    p.add_argument("--operator", help="staff id recorded in the audit trail (default: your user name)")
    p.add_argument("--limit", type=_int_in(1, 500), default=100, help="events to show (1-500, default 100)")
    p.add_argument("--new-card-no", help="replace: the new card's number")
    p.add_argument("--new-card-sn", help="replace: the new card's identification code")
    p.add_argument("--expires-on", help="replace: the new card's expiry date YYYY-MM-DD")

    p = add(
        "call",
        cmd_call,
        "call the API with a signed request",
        "Sign a request as a terminal and send it; prints the JSON answer and the HTTP status.\n"
        "Credentials: --credentials FILE (as written by `terminal add --output`), or --as KIND for the\n"
        "demo terminals. Example: cardsvc call GET /v1/hotlist?since=0 --as transit_validator",
    )
    p.add_argument("method")
    p.add_argument("path", help="path and query, e.g. /v1/cards/A00000001")
    p.add_argument("--data", help="JSON body, @FILE, or @- for standard input")
    p.add_argument("--as", dest="as_", default="card_office", help="demo terminal kind (default card_office)")
    p.add_argument("--credentials", help="terminal credentials JSON file")
    p.add_argument("--url", help="service base URL (default http://CARDSVC_HOST:CARDSVC_PORT)")

    p = add(
        "clearing",
        cmd_clearing,
        "daily clearing files per transit operator",
        "run --date YYYY-MM-DD: for each operator (or --operator ID), the approved fares posted on that\n"
        "local business day (the fare table's UTC offset; a ride uploaded late is cleared on the day it\n"
        "arrived) as a clearing file (protocols/clearing.md) in --out, recorded in clearing_report. The\n"
        "fare corrections written that day are in it too, debiting the operator (file version 2).\n"
        "Re-running a day rewrites identical files; if the journal of a cleared day was changed by hand,\n"
        "the report and file are kept and the run exits 1 (an audit failure).\n"
        "run without --date (the nightly timer, deploy/cardsvc-clearing.timer): for each operator, every day\n"
        "without a report from the day of its first fare on (a night missed, a day refused, days before one\n"
        "cleared by hand), up to yesterday (local). Exit 1 if any day fails or the operator is unknown.\n"
        "register --operator ID --name NAME: an operator that is not in the fare table (removed from it,\n"
        "with fares still to clear), so that `run` clears it and `cardsvc audit` knows it.",
    )
    p.add_argument("action", choices=["run", "register"])
    p.add_argument(
        "--date", help="run: business day YYYY-MM-DD (it must be over); default: the days not cleared yet"
    )
    p.add_argument("--operator", help="run: only this operator id; register: the operator id")
    p.add_argument("--name", help="register: the operator's name")
    p.add_argument("--out", help="output directory (default <data_dir>/clearing)")
    p.add_argument(
        "--wait", type=_seconds, default=limits.CLEARING_SETTLE_S, metavar="SECONDS",
        help="wait this long for transactions that began before the day ended (default %(default)g)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = add(
        "fares",
        cmd_fares,
        "check a fare table before it goes live",
        "check [--table FILE]: load and validate the table (default: the configured one), then read the\n"
        "stored journey states and list every metro station they name that the table neither serves nor\n"
        "retires (metro.retired): such journeys could not be priced; and every operator they are credited\n"
        "to that runs no metro line in the table and is not registered (`cardsvc clearing register`): the\n"
        "sweep would not find those journeys. Exit 1 if there is either. Read-only; safe beside the running\n"
        "service. See docs/fares.md \"Closing a station\".",
    )
    p.add_argument("action", choices=["check"])
    p.add_argument("--table", type=Path, help="fare table file (default: CARDSVC_FARE_TABLE, else the demo table)")
    p.add_argument("--no-database", action="store_true", help="only validate the file")
    p.add_argument(
        "--chunk-cards", type=_int_in(1), default=1_000_000, help="card ids per statement (progress step)"
    )

    p = add(
        "audit",
        cmd_audit,
        "check the ledger's invariants on the database; exit 1 if any fails",
        "Purse balances equal their journals, journal postings, fare corrections (booked twice, never more\n"
        "than their fare), overdrafts, replacement transfers, terminal answers vs journal, clearing reports\n"
        "vs journal, hotlist versions, hotlist vs card status. Read-only, one consistent snapshot.\n"
        "With --record (the nightly timer, deploy/cardsvc-audit.timer) the outcome is kept in audit_run\n"
        "and shown on /metrics. See docs/operations.md.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--record", action="store_true",
        help="keep the outcome in audit_run (one row), for /metrics and its alerts; needs INSERT on it",
    )  # fmt: skip
    p.add_argument(
        "--chunk-cards",
        type=_int_in(1),
        default=1_000_000,
        help="card ids per purse- and hotlist-check statement (progress step)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "workers")}
    try:
        settings = load_settings(config_file=args.config, **overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    localtime.configure(settings.utc_offset_minutes)
    try:
        result: int = args.fn(settings, args)
        return result
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an operator-facing command: one clear line, not a traceback
        import asyncpg

        from cardsvc.security.keys import KeyFileError
        from cardsvc.store.embedded import EmbeddedPostgresError
        from cardsvc.store.migrate import MigrationError
        from cardsvc.transit.fare_table import FareTableError

        if isinstance(exc, asyncpg.UndefinedTableError):
            print(f"error: {exc}: the database schema is behind; run `cardsvc migrate`", file=sys.stderr)
            return 1
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            print(f"database error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, FareTableError):
            print(f"fare table error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, KeyFileError | EmbeddedPostgresError | MigrationError | ConfigError | OSError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
