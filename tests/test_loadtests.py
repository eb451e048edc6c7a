"""Smoke tests of the load generators (no load): the pre-signed tap format, its signatures as the service
checks them, the offline batches the benchmark builds, the Locust file loading, and the report merge."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from cardsvc.security.credentials import CardKeyDeriver
from cardsvc.security.keys import KeyRing
from loadtests import credbook, presign, terminal_cache_bench, transit_bench
from protocols import population, terminal_auth, transit
from tests.helpers import ServiceHarness, purse_vs_journal

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("path", "terminal", "key_id", "timestamp", "nonce", "signature", "body")


def _presigned(tmp_path: Path, keys: KeyRing, creds: dict[str, str], count: int = 20) -> list[dict[str, str]]:
    out = tmp_path / "taps.tsv"
    presign.presign_taps(keys, creds, count, 5000, out, b"cardsvc-demo", first_seq=7)
    lines = out.read_text(encoding="ascii").splitlines()
    assert len(lines) == count
    return [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in lines]


def _headers(row: dict[str, str]) -> dict[str, str]:
    return {
        terminal_auth.HEADER_TERMINAL: row["terminal"],
        terminal_auth.HEADER_KEY_ID: row["key_id"],
        terminal_auth.HEADER_TIMESTAMP: row["timestamp"],
        terminal_auth.HEADER_NONCE: row["nonce"],
        terminal_auth.HEADER_SIGNATURE: row["signature"],
    }


def test_presigned_taps_have_the_replay_format_and_verify(tmp_path: Path) -> None:
    keys = KeyRing.generate()
    secret = terminal_auth.generate_secret()
    creds = {"terminal_id": "bench-v1", "key_id": "k1", "secret": terminal_auth.encode_secret(secret)}
    rows = _presigned(tmp_path, keys, creds)
    deriver = CardKeyDeriver(keys.card_auth_master)  # the service's verifier
    nonces = set()
    for n, row in enumerate(rows):
        assert row["path"] == presign.TAP_PATH and row["terminal"] == "bench-v1" and row["key_id"] == "k1"
        assert abs(int(row["timestamp"]) - time.time()) < 60
        nonces.add(row["nonce"])
        body = orjson.loads(row["body"])
        assert body["terminal_seq"] == 7 + n  # consecutive from --first-seq: no two taps share a key
        assert body["mode"] == "bus" and body["direction"] == "single" and body["credential"] == "card"
        # The signature is the one the service computes ...
        auth = terminal_auth.parse_auth_headers(_headers(row))
        assert terminal_auth.verify_request(secret, "POST", row["path"], row["body"].encode(), auth)
        # ... over these exact bytes: one changed byte of the body and it no longer verifies.
        tampered = row["body"].replace('"bus"', '"Bus"').encode()
        assert not terminal_auth.verify_request(secret, "POST", row["path"], tampered, auth)
        # The card answer is a real one: it verifies with the card key derived from the master key.
        assert deriver.verify(
            body["card_sn"],
            bytes.fromhex(body["card_challenge"]),
            bytes.fromhex(body["terminal_challenge"]),
            bytes.fromhex(body["cryptogram"]),
        )
    assert len(nonces) == len(rows)


async def test_a_presigned_tap_passes_the_service_signature_check(svc: ServiceHarness, tmp_path: Path) -> None:
    t = svc.terminals["transit_validator"]
    creds = {"terminal_id": t.terminal_id, "key_id": t.key_id, "secret": terminal_auth.encode_secret(t.secret)}
    row = _presigned(tmp_path, svc.keys, creds, count=2)[0]
    raw = row["body"].encode()
    headers = {**_headers(row), "Content-Type": "application/json"}
    r = await svc.request("POST", row["path"], raw=raw, headers=headers, sign=False)
    # Signed correctly: the tap reaches the engine, which declines the population card this test database
    # does not hold (a business answer, not a 401).
    assert r.status == 200, r.body
    assert r.body["result"] == "declined" and r.body["reason"] == "unknown_card"
    replay = await svc.request("POST", row["path"], raw=raw, headers=headers, sign=False)
    assert replay.status == 401 and replay.body["code"] == "auth_replayed"


async def test_benchmark_offline_batches_are_accepted(svc: ServiceHarness) -> None:
    c = await svc.new_card(has_purse=True)
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups",
        {"terminal_seq": 91_001, "amount_fen": 500, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    rich = transit.PurseCard(c["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=500)
    tid = svc.terminals["transit_validator"].terminal_id
    verdicts = []
    for batch_id in (1, 2, 3):
        batch = transit_bench.offline_batch([rich], tid, batch_id, 100 + batch_id, int(time.time()) - 60)
        if batch is None:  # 500 fen pays two debits of 180; the chip cannot pay a third
            break
        r = await svc.post(transit_bench.OFFLINE_PATH, transit.batch_to_dict(batch), as_="transit_validator")
        assert r.status == 200, r.body
        verdicts += [x["result"] for x in r.body["records"]]
    assert verdicts == ["accepted", "accepted"]
    r = await svc.get(f"/v1/purses/{c['card_no']}", as_="ops")
    assert r.body["balance_fen"] == 500 - 2 * transit_bench.OFFLINE_AMOUNT_FEN


async def test_a_reused_data_dir_gets_its_offline_purses_topped_up_with_journal_rows(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """Earlier runs spend the offline cards' purses; the bench tops up those that hold less than the run
    will debit, as journal top-ups, so that the audit still balances and the mix still uploads."""
    cards = [await svc.new_card(has_purse=True) for _ in range(3)]
    ids = [await db.fetchval("SELECT card_id FROM card WHERE card_no = $1", c["card_no"]) for c in cards]
    r = await svc.post(
        f"/v1/purses/{cards[1]['card_no']}/top-ups",
        {"terminal_seq": 92_001, "amount_fen": 5_000, "channel": "cash", "operator": "staff-1"},
    )
    assert r.status == 200, r.body
    lo, hi = min(ids) - 1, max(ids)  # card ids lo+1..hi, like the bench's card index ranges
    refilled = await asyncio.to_thread(transit_bench.refill_purses, svc.dsn, lo, hi, 900)
    assert refilled == 2
    rows = await db.fetch("SELECT card_id, balance_fen FROM purse WHERE card_id = ANY($1) ORDER BY card_id", ids)
    assert [r["balance_fen"] for r in rows] == [900, 5_000, 900]
    assert all(r["balance_fen"] == r["journal"] for r in await purse_vs_journal(svc.dsn))
    assert await asyncio.to_thread(transit_bench.refill_purses, svc.dsn, lo, hi, 900) == 0


def test_purse_cards_hold_the_keys_and_state_of_the_seeded_cards() -> None:
    keys = KeyRing.generate()
    chips = transit_bench.purse_cards(keys.card_tac_master, b"cardsvc-demo", 40, [5000, 120], [0, 65537])
    sn = population.person(41, b"cardsvc-demo").card_sn
    assert chips[1].card_sn == sn
    assert chips[1].tac_key == transit.PurseCard(sn, master_key=keys.card_tac_master).tac_key
    assert (chips[1].balance_fen, chips[1].purse_seq) == (120, 1)  # the u16 counter of an unwrapped 65537
    batch = transit_bench.offline_batch(chips, "bench-off0", 1, 1, int(time.time()))
    assert batch is not None and [r.card_sn for r in batch.records] == [chips[0].card_sn]  # 120 < 180: skipped


def test_population_regions_are_disjoint_and_refuse_a_too_large_offline_share() -> None:
    r = transit_bench.regions(200_000, 20_000, 10_000)
    assert r.online == (0, 170_000) and r.peak_offline == (170_000, 190_000)
    assert r.locust_offline == (190_000, 200_000)
    with pytest.raises(ValueError):
        transit_bench.regions(100_000, 40_000, 20_000)


def test_the_report_section_replaces_only_its_markers() -> None:
    doc = "# Benchmarks\n\nwritten by loadtests/bench.py\n"
    first = transit_bench.merge_section(doc, f"{transit_bench.MARK_BEGIN}\nrun 1\n{transit_bench.MARK_END}\n")
    assert first.startswith(doc) and "run 1" in first
    second = transit_bench.merge_section(
        first + "\n## After\n", f"{transit_bench.MARK_BEGIN}\nrun 2\n{transit_bench.MARK_END}\n"
    )
    assert "run 1" not in second and "run 2" in second
    assert second.startswith(doc) and second.endswith("## After\n")
    assert second.count(transit_bench.MARK_BEGIN) == 1


def test_the_terminal_cache_benchmark_reports_a_refresh_beside_a_whole_load(
    tmp_path: Path, pg_admin_dsn: str
) -> None:
    """`./dev bench terminals` at a small size: its section lands in benchmarks.md beside the transit
    section (kept), and its numbers in benchmarks.json, one row per size."""
    (tmp_path / "benchmarks.md").write_text(
        f"# Benchmarks\n\n{transit_bench.MARK_BEGIN}\ntransit run\n{transit_bench.MARK_END}\n"
    )
    argv = ["--terminals", "40", "300", "--repeat", "2", "--admin-dsn", pg_admin_dsn, "--docs-dir", str(tmp_path)]
    assert terminal_cache_bench.main(argv) == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert "transit run" in text and text.count(terminal_cache_bench.MARK_BEGIN) == 1
    rows = orjson.loads((tmp_path / "benchmarks.json").read_bytes())["terminal_cache"]
    assert [r["terminals"] for r in rows] == [40, 300]
    for r in rows:
        assert f"| {r['terminals']:,} | {r['full_load']['median_ms']:,} (" in text
        assert 0 < r["refresh_one_rotation"]["median_ms"] <= r["refresh_one_rotation"]["max_ms"]


def test_the_report_says_which_concessions_the_registry_held() -> None:
    committed = orjson.loads((ROOT / "docs" / "benchmarks.json").read_bytes())
    committed["transit"].pop("concessions", None)

    def line(d: dict[str, object]) -> str:
        return next(x for x in transit_bench.render_section(d).splitlines() if "transit concession" in x)

    assert line(committed).endswith("| not recorded |")  # a report from before the count was kept
    committed["transit"]["concessions"] = {}
    assert line(committed).endswith("| none |")
    committed["transit"]["concessions"] = {"disabled_free": 1_040_000, "elderly": 8_560_123}
    assert line(committed).endswith("| disabled_free 1,040,000, elderly 8,560,123 |")


def test_wrk_output_is_read() -> None:
    out = """  Latency Distribution
     50%    3.21ms
     75%    5.00ms
     90%    9.10ms
     99%    1.20s
taps: lines=100 answered=98 approved=88 declined=10 failed=0 elapsed_us=2000000
missing: 3,17
"""
    assert transit_bench.parse_wrk_latency(out) == {"p50": 3.21, "p75": 5.0, "p90": 9.1, "p99": 1200.0}
    counts = transit_bench.parse_taps_line(out)
    assert counts["approved"] == 88 and counts["elapsed_us"] == 2_000_000
    assert transit_bench.parse_missing(out) == [3, 17]
    assert transit_bench.parse_missing("missing: \n") == []


def test_the_locustfile_loads_with_every_user_class() -> None:
    # In a child process: importing Locust monkey-patches the standard library (gevent).
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    listed = {line.strip() for line in out.stdout.splitlines()}
    assert {"MetroValidator", "BusValidator", "AcceptancePoint", "HotlistClient", "OfflineUploader",
            "CardOffice"} <= listed  # fmt: skip


def test_a_benchmark_report_names_the_commit_it_measured(tmp_path: Path) -> None:
    from loadtests.bench import code_revision

    head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, check=True)
    assert code_revision().split(" ")[0] == head.stdout.strip()
    # Outside a checkout it says so instead of failing the run.
    out = subprocess.run(
        [sys.executable, "-c", "from loadtests.bench import code_revision; print(code_revision())"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "GIT_DIR": str(tmp_path / "none")},
    )
    assert out.stdout.strip() == "unknown (not a git checkout)"


def test_the_transit_benchmark_runs_end_to_end_and_reconciles_with_the_journal(tmp_path: Path) -> None:
    """`./dev bench transit` at a small scale, without the wrk phases: seed, TPC-B, the service with two
    workers, offline ingestion, the Locust mix (every request type, loss reports whose cards must then be
    refused), the audit and the generators' counts against the journal, and the report."""
    docs = tmp_path / "docs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Not under tmp_path: as root the server runs as its own user, which must traverse to its data dir,
    # and every pytest start makes /tmp/pytest-of-<user> private again (the suite's server is in /tmp too).
    data = Path(tempfile.mkdtemp(prefix="cardsvc-bench-test-"))
    try:
        _run_small_bench(data, docs, port)
    finally:
        env = {k: v for k, v in os.environ.items() if k != "CARDSVC_DATABASE_URL"}  # the bench's own server
        subprocess.run([sys.executable, "-m", "cardsvc", "db", "stop"], env={**env,
                       "CARDSVC_DATA_DIR": str(data / "bench")}, capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)


def _run_small_bench(data: Path, docs: Path, port: int) -> None:
    argv = [
        sys.executable, "-m", "loadtests.transit_bench", "--data-dir", str(data / "bench"),
        "--cards", "4000", "--peak-taps", "0", "--tpcb-scale", "1", "--tpcb-seconds", "2",
        "--offline-cards", "400", "--offline-batches", "6", "--offline-batch-records", "100",
        "--locust-offline-cards", "600", "--locust-duration", "20", "--locust-users", "12",
        "--locust-rate", "120", "--port", str(port), "--docs-dir", str(docs),
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    data = orjson.loads((docs / "benchmarks.json").read_bytes())
    t = data["transit"]
    assert data["cards"] == 4000 and data["tpcb_tps"] > 0
    assert data["online_tap_per_s"] is None and t["peak_online"] is None  # not measured without wrk
    assert data["audit_passed"], t["audit"]
    loc = t["locust"]
    assert loc["exit_code"] == 0 and loc["failures"] == 0, loc["failure_list"]
    names = {r["name"] for r in loc["per_type"] if r["requests"] > 0}
    assert {"tap metro in", "tap metro out", "tap bus card", "tap bus e-card", "ecard code verify",
            "card verify", "hotlist", "offline batch", "loss report", "tap lost card"} <= names, names  # fmt: skip
    c = loc["counters"]
    assert c["loss_reports"] > 0 and c["lost_card_refused"] == c["loss_reports"]
    # The phones' codes and the cards' answers came from the book made before the run (the lost cards'
    # taps make theirs live), and the service accepted them: no failures above.
    assert loc["book"]["credentials"] > 0, loc["book"]
    shown = {r["name"]: r["requests"] for r in loc["per_type"]}
    assert c["live_ecard_codes"] < (shown["ecard code verify"] + shown["tap bus e-card"]) // 2, (c, loc["book"])
    answers = shown["tap bus card"] + shown["tap metro in"] + shown["tap metro out"] + shown["card verify"]
    assert c["live_card_answers"] < answers // 2, (c, loc["book"])
    assert c["lost_card_violations"] == 0 and not c["unexpected_tap_declines"]
    rec = t["reconciliation"]
    assert rec["generator_approved_taps"] == rec["journal_fare_rows"] > 0
    assert rec["generator_posted_offline"] == rec["journal_offline_rows"] > t["offline"]["posted"] > 0
    assert rec["generator_topups"] == rec["journal_topup_rows"]
    look = t["sweep_look"]  # the sweep's reads once the run's journeys time out: every window looked at
    assert look["windows"] and look["timed_out"] == 0, look
    assert data["sweep_window_max_s"] == look["window_max_s"] >= 0
    # Whether riders are still inside when a run this short ends is chance (0 of 244 once): which purses
    # are due is tests/transit/test_sweep.py's; here, that the metro riders of the run were looked at.
    assert 0 <= look["busiest"]["due"] <= look["busiest"]["cards_with_metro_taps"] > 0, look
    report = (docs / "benchmarks.md").read_text()
    assert "| journey sweep once this run's journeys time out" in report and "0 of " in report
    assert "not measured (`--peak-taps 0`)" in report and "| `cardsvc audit` after the run | PASSED |" in report


# ------------------------------------------------------------------ credentials made ahead


def _book_spec(tmp_path: Path, keys: KeyRing, rate: float = 50) -> credbook.BookSpec:
    key_file = tmp_path / "keys.json"
    keys.write(key_file)
    return credbook.BookSpec(str(key_file), "cardsvc-demo", 5000, 16, rate)


def test_a_book_holds_real_credentials_of_its_moment_each_once(tmp_path: Path) -> None:
    from cardsvc.security.credentials import CardKeyDeriver
    from protocols import card, ecard, sm

    keys = KeyRing.generate()
    spec = _book_spec(tmp_path, keys)
    first = 90_000_000
    made = credbook.build(spec, tmp_path / "book", first, 2, processes=1, progress=False)
    clock = [first * credbook.SLOT_S + 3.0]
    book = credbook.Book(tmp_path / "book", clock=lambda: clock[0])
    deriver = CardKeyDeriver(keys.card_auth_master)  # the service's verifier
    seed = b"cardsvc-demo"
    taken = 0
    seen: set[str] = set()
    for slot in (first, first + 1):
        clock[0] = slot * credbook.SLOT_S + 3.0
        start = slot * credbook.SLOT_S
        while (got := book.ecard_code()) is not None:
            index, text = got
            code = ecard.decode_code(text)
            assert code.ecard_id == index + 1 and index % 5 and 0 <= index < 5000  # a person with an e-card
            assert code.issued_at == start  # made for this slot: shown within SLOT_S of it
            key = sm.private_key_from_seed(sm.ALG_SM2_SM3, population.ecard_pool_seed(index % 16, seed))
            assert ecard.verify_code(code, sm.public_key_bytes(key)), index
            assert text not in seen
            seen.add(text)
            taken += 1
        answers = []
        while (got2 := book.card_answer()) is not None:
            answers.append(got2)
        while (got3 := book.metro_journey()) is not None:
            index, a, b = got3
            assert a["card_sn"] == b["card_sn"] and a["terminal_challenge"] != b["terminal_challenge"]
            answers += [(index, a), (index, b)]
        for index, a in answers:
            assert a["card_sn"] == population.person(index, seed).card_sn
            term_ch = bytes.fromhex(a["terminal_challenge"])  # made at the slot's start: fresh all through it
            assert card.check_terminal_challenge(term_ch, start, 60, 0) is None
            assert card.check_terminal_challenge(term_ch, start + credbook.SLOT_S - 1, credbook.SLOT_S, 0) is None
            assert deriver.verify(a["card_sn"], bytes.fromhex(a["card_challenge"]), term_ch,
                                  bytes.fromhex(a["cryptogram"]))  # fmt: skip
            assert a["terminal_challenge"] not in seen
            seen.add(a["terminal_challenge"])
        taken += len(answers)
    assert taken == made > 0
    # Past its slots (or a slot used up) the book has nothing: the locustfile then makes them live.
    clock[0] = (first + 2) * credbook.SLOT_S
    assert book.ecard_code() is None and book.card_answer() is None and book.metro_journey() is None
    # A clock stepped back to a slot read before gets nothing either: its credentials may have been shown.
    clock[0] = first * credbook.SLOT_S + 3.0
    assert book.ecard_code() is None and book.card_answer() is None


def test_a_book_is_sized_from_the_mix_the_locustfile_sends() -> None:
    import ast

    tree = ast.parse((ROOT / "loadtests" / "locustfile.py").read_text())
    weights = {
        c.name: n.value.value
        for c in tree.body
        if isinstance(c, ast.ClassDef)
        for n in c.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        and any(isinstance(t, ast.Name) and t.id == "weight" for t in n.targets)
    }  # fmt: skip
    assert weights == {"MetroValidator": 36, "BusValidator": 36, "AcceptancePoint": 16, "HotlistClient": 4}
    assert credbook._WEIGHTS == {"metro": 36, "bus": 36, "acceptance": 16, "hotlist": 4}
    s = credbook.shares()
    # Every weighted request but the hotlist's shows one credential; a metro journey's two taps show two.
    assert s["ecard"] + s["card"] + 2 * s["metro"] == pytest.approx(88 / 92)
