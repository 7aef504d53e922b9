from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

RESULTS = Path(
    os.environ.get(
        "SCALEKIT_FAULTS_RESULTS", Path(tempfile.gettempdir()) / "scalekit-faults.json"
    )
)


@pytest.fixture
def record():
    """Record a scenario's outcome; the session prints them as a table."""

    def add(scenario: str, **figures: object) -> None:
        rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        rows[scenario] = figures
        RESULTS.write_text(json.dumps(rows, indent=2))

    return add


def pytest_sessionstart(session):
    if RESULTS.exists():
        RESULTS.unlink()


def pytest_terminal_summary(terminalreporter):
    if not RESULTS.exists():
        return
    rows = json.loads(RESULTS.read_text())
    terminalreporter.section("fault scenarios")
    for scenario, figures in rows.items():
        shown = ", ".join(f"{k}={v}" for k, v in figures.items())
        terminalreporter.write_line(f"{scenario}: {shown}")
