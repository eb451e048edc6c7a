"""What operators meet: alert rules against what the service really exports (promtool on the shipped rules),
settings refused when an alert could not work with them, and commands that fail with one line, not a
traceback."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cardsvc import cli, limits
from cardsvc.config import ConfigError, load_settings
from cardsvc.security.keys import KeyRing
from protocols import population
from tests.service.serving import Service, metric_samples

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "cardsvc-alerts.yml"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"


def _rule(name: str) -> dict[str, Any]:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if r["alert"] == name)


# ------------------------------------------------------------------ alert rules vs the exported series


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed"
)
async def test_the_offline_bad_tac_alert_fires_on_the_first_bad_tac_records(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """CardsvcOfflineBadTac fires on *any* offline record with a wrong TAC ("any: tampered records or a cloned
    card", docs/operations.md). Its expression is `increase(...{result="bad_tac"}[1h]) > 0`, and increase()
    only counts rises between samples it has: a series born at its first increment, already at 1, would
    never raise it for the first bad-TAC upload of a service's lifetime (usually the only one). So a fresh
    service exports the series at 0.

    Here: scrape a real `cardsvc serve` for what it exports before any upload, then let promtool evaluate
    the rule on exactly that series followed by one bad-TAC record."""
    svc = Service(tmp_path, db_dsn, keys_for_process)
    try:
        svc.start()
        await svc.wait_ready()
        status, _, text = await svc.send("GET", "/metrics")
        assert status == 200
        assert await svc.terminate() == 0
    finally:
        await svc.close()

    exported = [
        labels
        for labels, _ in metric_samples(text, "cardsvc_transit_uploaded_records_total")
        if labels.get("kind") == "purse" and labels.get("result") == "bad_tac"
    ]

    def series(labels: dict[str, str], values: str) -> dict[str, str]:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted({**labels, "instance": "h1:8080"}.items()))
        return {"series": f"cardsvc_transit_uploaded_records_total{{{inner}}}", "values": values}

    # Ten minutes of the service as scraped, then one bad-TAC record (the upload's reason is tac_mismatch).
    assert [x.get("reason") for x in exported] == ["tac_mismatch"], exported
    inputs = [series(exported[0], "0x10 1x30")]
    rule = _rule("CardsvcOfflineBadTac")
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "CardsvcOfflineBadTac",
                        "exp_alerts": [
                            {"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "first-bad-tac.test.yml").write_text(yaml.safe_dump(unit))
    result = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "test", "rules", "first-bad-tac.test.yml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, (exported, result.stdout + result.stderr)


# ------------------------------------------------------------------ settings as documented


# ------------------------------------------------------------------ commands: one line, not a traceback


def _outcome(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    try:
        code: Any = cli.main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "case",
    [
        "call-with-the-key-file-as-credentials",  # KeyError: 'terminal_id'
        "call-with-credentials-not-json",  # orjson.JSONDecodeError
        "demo-credential-index-past-the-population",  # AssertionError in protocols/population.py
        "demo-credential-key-pool-0",  # AssertionError in protocols/population.py
        "database-url-with-a-bad-port",  # ValueError from asyncpg's DSN parser
        "clearing-wait-not-a-number",  # waited forever for a transaction that stays open
    ],
)
def test_operator_mistakes_are_one_line_errors_not_tracebacks(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """cli.main: "an operator-facing command: one clear line, not a traceback", also for `cardsvc call
    --credentials` given the key file (or any JSON without terminal_id/key_id/secret) or a file that is not
    JSON; `demo-credential` given an --index past the synthetic population or --ecard-key-pool 0; and any
    command against a CARDSVC_DATABASE_URL whose port is not a number."""
    for name in [n for n in os.environ if n.startswith("CARDSVC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CARDSVC_DATA_DIR", str(tmp_path))
    key_file = tmp_path / "keys.json"
    KeyRing.generate().write(key_file)
    not_json = tmp_path / "t0001.json"
    not_json.write_text("terminal_id = T0001\n")
    args = {
        "call-with-the-key-file-as-credentials": [
            "call",
            "GET",
            "/v1/hotlist?since=0",
            "--credentials",
            str(key_file),
        ],
        "call-with-credentials-not-json": [
            "call",
            "GET",
            "/v1/hotlist?since=0",
            "--credentials",
            str(not_json),
        ],
        "demo-credential-index-past-the-population": [
            "demo-credential",
            "ecard-code",
            "--index",
            str(population.POPULATION_MAX),
        ],
        "demo-credential-key-pool-0": [
            "demo-credential",
            "ecard-code",
            "--index",
            "1",
            "--ecard-key-pool",
            "0",
        ],
        "clearing-wait-not-a-number": ["clearing", "run", "--wait", "nan"],
        "database-url-with-a-bad-port": ["migrate"],
    }[case]
    if case == "database-url-with-a-bad-port":
        monkeypatch.setenv("CARDSVC_DATABASE_URL", "postgresql://cardsvc@db.internal:54x2/cardsvc")
    code, err = _outcome(args, capsys)  # an uncaught exception fails the test right here
    assert code not in (0, None), (code, err)
    said = err + (code if isinstance(code, str) else "")  # SystemExit("error: ...") prints at exit
    assert "Traceback" not in said and said.strip(), said


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed"
)
def test_the_maintenance_alert_fires_at_every_accepted_sweep_interval(tmp_path: Path) -> None:
    """CardsvcMaintenanceFailing is `increase(cardsvc_maintenance_failures_total[30m]) >= 5`: five failed
    rounds in half an hour. A step that fails in *every* round (partitions: journal writes stop at the next
    month) raises it at the slowest SWEEP_INTERVAL_S the service accepts; a slower one (from about 6 minutes
    up it could never reach 5) is refused at start. Here: rounds at that slowest interval, each failing,
    for two hours, the series at 0 before the first (as the service exports it)."""
    interval_s = int(limits.SWEEP_INTERVAL_S_MAX)
    with pytest.raises(ConfigError, match="SWEEP_INTERVAL_S"):
        load_settings({"CARDSVC_SWEEP_INTERVAL_S": str(interval_s + 1)})
    assert load_settings({"CARDSVC_SWEEP_INTERVAL_S": str(interval_s)}).sweep_interval_s == interval_s
    rounds = "0 " + " ".join(str(1 + minute * 60 // interval_s) for minute in range(120))
    rule = _rule("CardsvcMaintenanceFailing")
    labels = {**rule["labels"], "instance": "h1:8080", "step": "partitions"}
    annotations = {
        k: v.replace("{{ $labels.step }}", "partitions").replace("{{ $labels.instance }}", "h1:8080")
        for k, v in rule["annotations"].items()
    }
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'cardsvc_maintenance_failures_total{instance="h1:8080", step="partitions"}', "values": rounds}
                ],
                "alert_rule_test": [
                    {"eval_time": "110m", "alertname": "CardsvcMaintenanceFailing",
                     "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}]}
                ],
            }
        ],
    }  # fmt: skip
    (tmp_path / "slow-rounds.test.yml").write_text(yaml.safe_dump(unit))
    result = subprocess.run(
        ["promtool", "test", "rules", "slow-rounds.test.yml"], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
