"""deploy/: the alerting rules use only metrics the service exports (with their labels), and, when
promtool is installed, they pass `promtool check rules` and their unit tests; the systemd unit runs the
service's own commands."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from cardsvc import metrics

DEPLOY = Path(__file__).parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "cardsvc-alerts.yml"


def exported() -> dict[str, set[str]]:
    """Sample names the service can export -> their label names."""
    assert metrics.HTTP_REQUESTS is not None  # the module registers everything on import
    out: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):
        labels = set(getattr(collector, "_labelnames", ()))
        for family in REGISTRY._collector_to_names[collector]:
            if family.startswith("cardsvc_"):
                out[family] = labels | {"le"} if family.endswith("_bucket") else labels
    return out


def test_the_rules_use_only_exported_metrics_and_labels() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 8 and all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
    names = exported()
    used = 0
    for rule in rules:
        for name, selector in re.findall(r"\b(cardsvc_[a-z_]+)(?:\{([^}]*)\})?", rule["expr"]):
            assert name in names, (rule["alert"], name)
            for label in re.findall(r"([a-z_]+)\s*=~?", selector or ""):
                assert label in names[name] | {"instance", "job"}, (rule["alert"], name, label)
            used += 1
    assert used >= 8


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        ["promtool", "test", "rules", "cardsvc-alerts.test.yml"],
        cwd=RULES.parent, capture_output=True, text=True,
    )  # fmt: skip
    assert test.returncode == 0, test.stdout + test.stderr


def test_the_systemd_unit_migrates_then_serves() -> None:
    unit = (DEPLOY / "cardsvc.service").read_text()
    assert re.search(r"^ExecStartPre=\S+/cardsvc migrate$", unit, re.M)
    assert re.search(r"^ExecStart=\S+/cardsvc serve$", unit, re.M)
    assert "KillSignal=SIGTERM" in unit and "EnvironmentFile=/etc/cardsvc/cardsvc.env" in unit
    for line in (DEPLOY / "cardsvc.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.split("=", 1)[0].startswith("CARDSVC_"), line


def unit_sections(name: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for line in (DEPLOY / name).read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            sections.setdefault(current, {})[key] = value
    return sections


def test_the_systemd_unit_puts_each_key_in_its_section() -> None:
    """systemd ignores a key in the wrong section with only a warning: StartLimit* under [Service] left the
    crash-loop brake off."""
    sections = unit_sections("cardsvc.service")
    assert {"StartLimitIntervalSec", "StartLimitBurst", "After", "Wants"} <= set(sections["Unit"])
    assert {"ExecStart", "Restart", "RestartSec", "KillSignal"} <= set(sections["Service"])
    assert not {"StartLimitIntervalSec", "StartLimitBurst"} & set(sections["Service"])


def test_the_clearing_timer_runs_the_catch_up_command_nightly_in_china_time() -> None:
    service = unit_sections("cardsvc-clearing.service")
    assert service["Service"]["Type"] == "oneshot"
    # Without --date: the days not cleared yet (a fixed --date would clear the same day every night).
    assert re.fullmatch(r"\S+/cardsvc clearing run", service["Service"]["ExecStart"])
    assert service["Service"]["EnvironmentFile"] == "/etc/cardsvc/cardsvc.env"
    assert service["Service"]["User"] == unit_sections("cardsvc.service")["Service"]["User"]
    timer = unit_sections("cardsvc-clearing.timer")
    # Business days are China time: a timer on the host's zone (often UTC) would run at 08:10 local.
    assert timer["Timer"]["OnCalendar"].endswith(" Asia/Shanghai") and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_the_audit_timer_records_a_nightly_audit_away_from_the_clearing_run() -> None:
    service = unit_sections("cardsvc-audit.service")
    assert service["Service"]["Type"] == "oneshot"
    # --record: without it the run leaves nothing for /metrics and CardsvcAuditNotRun fires every day.
    assert re.fullmatch(r"\S+/cardsvc audit --record", service["Service"]["ExecStart"])
    assert service["Service"]["EnvironmentFile"] == "/etc/cardsvc/cardsvc.env"
    audit_at = unit_sections("cardsvc-audit.timer")["Timer"]["OnCalendar"]
    clearing_at = unit_sections("cardsvc-clearing.timer")["Timer"]["OnCalendar"]
    assert audit_at.endswith(" Asia/Shanghai") and audit_at != clearing_at
    hour = int(audit_at.split()[1].split(":")[0])
    assert 1 <= hour <= 5, audit_at  # a quiet hour, after midnight's clearing, before the morning peak


def test_the_dashboard_queries_only_exported_metrics_and_labels() -> None:
    """deploy/grafana/cardsvc-dashboard.json: a panel on a renamed metric or label shows "No data", which
    reads as "all quiet"."""
    dashboard = json.loads((DEPLOY / "grafana" / "cardsvc-dashboard.json").read_text())
    names = exported()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 16 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            found = re.findall(r"\b(cardsvc_[a-z_]+)(?:\{([^}]*)\})?", expr)
            assert found, (panel["title"], expr)
            for name, selector in found:
                assert name in names, (panel["title"], name)
                for label in re.findall(r"([a-z_]+)\s*[=!]~?", selector or ""):
                    assert label in names[name] | {"instance", "job"}, (panel["title"], name, label)
                used.add(name.removesuffix("_bucket"))
            for label in re.findall(r"by \(([^)]*)\)", expr):
                for one in (x.strip() for x in label.split(",")):
                    assert any(one in labels for labels in names.values()) or one in {"instance", "le"}, one
    # Every metric the service exports is on the dashboard (a counter by its `_total` samples).
    families = {
        n.removesuffix("_bucket")
        for n in names
        if not n.endswith(("_count", "_sum", "_created")) and n + "_total" not in names
    }
    assert families <= used, sorted(families - used)
