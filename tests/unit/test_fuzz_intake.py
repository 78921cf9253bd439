"""The coverage-guided fuzzer of the decoder and admission, run for a bounded time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

atheris = pytest.importorskip(
    "atheris", reason="atheris is a dev dependency: pip install -e .[dev]"
)

REPO = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("SLUICE_FUZZ_SECONDS", "20"))


def test_decoder_and_admission_survive_coverage_guided_fuzzing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import random

    from connectors.fuzzing.payloads import valid_request
    from schemas.codec import AvroCodec

    codec = AvroCodec.default()
    for i in range(8):  # seeds: valid records, so mutations reach admission
        record = valid_request(random.Random(i), f"seed-{i}", "benchmark")
        (corpus / f"seed-{i}").write_bytes(codec.encode("InferenceRequest", record))
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "fuzz" / "fuzz_intake.py"),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=0",  # the target bounds current RSS itself; see its docstring
            str(corpus),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
    )
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, f"the fuzzer found a crash:\n{tail}"
    assert "Done" in tail, tail
