"""``sluice demo`` leaves the windows of its traffic on ``llm.metrics``: it starts a metrics
worker beside the inference worker, waits until the windows holding every answer and dead
letter are published, prints them, and ``sluice tail llm.metrics -b --no-follow`` shows them.
Run on the benchmark backend (the model's answers are not what this is about)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from connectors.cli import app
from connectors.demo import SAMPLE_PROMPTS, run_demo
from connectors.processes import settings_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_publishes_and_shows_its_windows(
    settings_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_factory(
        backend="benchmark",
        home=tmp_path / "home",
        metrics_window_s=2,
        metrics_rollup_s=0,
        metrics_lateness_s=1,
    )
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)  # the workers the demo starts read the environment
    console = Console(record=True, width=200)
    report = run_demo(settings, console, max_new_tokens=8, timeout_s=180)
    output = console.export_text()

    wanted = len(SAMPLE_PROMPTS) + 1
    assert len(report.rows) == len(SAMPLE_PROMPTS) and len(report.rejected) == 1
    counted = sum(w["requests_total"] + w["dead_letters_total"] for w in report.windows)
    assert counted == wanted, report.windows
    assert f"hold the demo's {wanted} records" in output
    assert "Started a metrics worker" in output
    assert "dlq 1 (bad_sampling 1)" in output

    tailed = CliRunner().invoke(app, ["tail", settings.metrics_topic, "-b", "--no-follow"])
    assert tailed.exit_code == 0, tailed.output
    lines = [line for line in tailed.output.splitlines() if " 2s " in line]
    assert sum(int(line.split(" req ")[1].split()[0]) for line in lines) == len(SAMPLE_PROMPTS)
    assert any("dlq 1 (bad_sampling 1)" in line for line in lines)
