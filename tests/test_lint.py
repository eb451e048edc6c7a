"""Lint and type checks run as part of the tests: ruff on everything, mypy --strict on the packages and the
load tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_clean() -> None:
    result = _run("ruff", "check", "cardsvc", "protocols", "tests", "loadtests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_clean() -> None:
    result = _run("mypy", "cardsvc", "protocols", "loadtests")
    assert result.returncode == 0, result.stdout + result.stderr
