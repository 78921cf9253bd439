"""A tiny ``sluice bench`` against the session broker: every mode runs, files appear."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest
from rich.console import Console

from connectors.bench import BENCHMARK_ENGINE, BenchOptions, run_bench
from streams.settings import Settings
from tests.conftest import STATE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _topics(bootstrap: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_tiny_bench_all_modes(kafka_bootstrap: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    settings = Settings(
        home=STATE,
        kafka_bootstrap=kafka_bootstrap,
        metrics_port=0,
        # The feedback join agent is not what this test is about (see the bench report).
        feedback_join=False,
    )
    options = BenchOptions(
        requests=4,
        pipeline_requests=300,
        max_new_tokens=4,
        prompt_words="8,32",
        batch_sizes="1,2",
        sweep_requests=2,
        partitions=2,
        anchor_requests=2,
        anchor_concurrency=2,
        load_requests=3,
        lone_requests=2,
        out_dir=tmp_path / "out",
    )
    console = Console(record=True, width=160)
    report = run_bench(settings, options, console)

    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    jsons = [f for f in files if f.endswith(".json")]
    pngs = [f for f in files if f.endswith(".png")]
    assert len(jsons) == 1, files
    # batch sweep, latency CDF, ceiling added-latency CDF, partial-load latency CDF
    assert len(pngs) == 4, files
    for name in pngs:
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / jsons[0]).read_text())
    assert saved["schema"] == "sluice-bench/1"
    assert saved["options"]["requests"] == 4
    assert saved["environment"]["cpu_count"] >= 1
    assert saved["environment"]["engine"]["name"] == "TorchEngine"

    direct, pipeline = saved["modes"]["direct"], saved["modes"]["pipeline"]
    for run in (direct, pipeline):
        assert run["ok"] == run["requests"] == 4
        assert run["requests_per_s"] > 0 and run["output_tokens_per_s"] > 0
        assert run["latency_ms"]["total"]["p99"] > 0
        assert run["latency_ms"]["inference"]["p50"] > 0
    assert pipeline["latency_ms"]["e2e"]["p50"] >= pipeline["latency_ms"]["inference"]["p50"]
    assert pipeline["cpu"]["workers"]["cpu_s"] > 0
    assert pipeline["worker_exit_codes"] == [0]
    assert [p["batch_size"] for p in direct["sweep"]] == [1, 2]
    assert all(p["output_tokens_per_s"] > 0 for p in direct["sweep"])

    ceiling = saved["modes"]["ceiling"]
    assert ceiling["engine"] == BENCHMARK_ENGINE
    assert ceiling["saturation"]["ok"] == 300
    assert ceiling["saturation"]["requests_per_s"] > 0
    assert ceiling["saturation"]["model_versions"] == ["benchmark"]
    half = ceiling["half_rate"]
    assert half["target_rate"] == pytest.approx(0.5 * ceiling["saturation"]["requests_per_s"])
    assert half["ok"] == half["requests"] > 0
    assert half["latency_ms"]["added"]["p99"] >= 0

    load = saved["load"]
    assert load["saturation_from"] == "pipeline"
    assert load["saturation_requests_per_s"] == pytest.approx(pipeline["requests_per_s"])
    assert load["lone"]["ok"] == load["lone"]["requests"] == 2 and load["lone"]["p50"] > 0
    assert [row["fraction"] for row in load["levels"]] == [0.25, 0.5, 0.9]
    for row in load["levels"]:
        assert row["ok"] == row["requests"] == 3
        assert row["target_rate"] == pytest.approx(row["fraction"] * pipeline["requests_per_s"])
        assert row["p50"] > 0 and row["p50_vs_lone"] == pytest.approx(
            row["p50"] / load["lone"]["p50"]
        )
        run = load["runs"][f"level{row['fraction'] * 100:g}"]
        assert run["publish"]["behind_schedule_ms"]["count"] == 3
    assert saved["targets"]["half_load_p50_vs_lone"]["value"] > 0

    quantize = saved["quantize"]
    assert quantize["int8"]["engine"].endswith("int8-dynamic")
    assert quantize["speedup_requests"] > 0
    assert 0.0 <= quantize["agreement"]["identical"] <= 1.0
    assert 0.0 <= quantize["agreement"]["token_overlap"] <= 1.0

    outputs = saved["outputs"]
    for name in ("prompts", "direct", "pipeline", "direct-fp32", "direct-int8"):
        assert len(outputs[name]) == 4, name
    assert outputs["direct"] == outputs["direct-fp32"]

    anchor = saved["anchor"]
    rows = {r["engine"]: r for r in anchor["engines"]}
    assert anchor["prompts"] == 2 and anchor["configured"] == "torch fp32"
    assert rows["torch fp32"]["agreement_with_fp32"]["identical"] == 1.0  # the reference
    assert len(outputs["anchor torch fp32"]) == 2
    if importlib.util.find_spec("llama_cpp") is not None:  # installed by `make install`
        llama = rows["llama.cpp"]
        assert llama["one_tokens_per_s"] > 0 and llama["concurrent_tokens_per_s"] > 0
        assert rows["torch fp32"]["one_vs_anchor_one"] > 0
        assert 0.0 <= llama["agreement_with_fp32"]["identical"] <= 1.0
        assert saved["targets"]["anchor_batch1"]["value"] > 0
    targets = saved["targets"]
    assert targets["pipeline_vs_direct"]["requests_ratio"] > 0
    assert targets["ceiling_requests_per_s"]["value"] > 0
    assert report["files"]["json"].endswith(jsons[0])

    # The per-run topics are gone again.
    left = asyncio.run(_topics(kafka_bootstrap))
    assert pipeline["topics_prefix"] != ceiling["topics_prefix"]
    for prefix in (pipeline["topics_prefix"], ceiling["topics_prefix"]):
        assert not [t for t in left if t.startswith(prefix)]
    out = console.export_text()
    assert "Targets" in out and "pipeline / direct" in out
    assert "anchor: output tokens/s against llama.cpp" in out
    assert "publish -> result at partial load" in out and "at 50 % load" in out
