"""Drift and quality monitors (streams/monitors/): statistics on plain values, the refusal
rules on the labelled set, state round trips, gauges, and the real offline embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streams.monitors import (
    DriftConfig,
    DriftMonitor,
    MonitorCollector,
    MonitorSet,
    QualityCounts,
    Reference,
    ks_test,
    mmd_test,
)
from streams.monitors.power import coding_prompts, general_prompts, measure_power
from streams.monitors.quality import is_truncated
from streams.monitors.refusals import evaluate, is_refusal, load_labelled, refusal_rule

REFUSALS = Path(__file__).resolve().parents[1] / "data" / "refusals.jsonl"


# -- two-sample tests ---------------------------------------------------------------------
def test_ks_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.3, 1.0):
        a, b = rng.normal(0, 1, 150), rng.normal(shift, 1, 120)
        ours = ks_test(a, b)
        theirs = stats.ks_2samp(a, b, method="asymp")
        assert ours.statistic == pytest.approx(theirs.statistic)
        assert ours.p_value == pytest.approx(theirs.pvalue, abs=0.02)


def test_ks_sees_a_shift_and_not_its_absence() -> None:
    rng = np.random.default_rng(2)
    assert ks_test(rng.poisson(40, 200), rng.poisson(40, 200)).p_value > 0.01
    assert ks_test(rng.poisson(40, 200), rng.poisson(25, 200)).p_value < 1e-6
    assert ks_test([1, 2, 3], [1, 2, 3]).statistic == 0.0
    with pytest.raises(ValueError):
        ks_test([], [1.0])


def test_mmd_flags_a_shifted_cloud_only() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 1, (60, 8))
    same = mmd_test(ref, rng.normal(0, 1, (60, 8)), permutations=200, rng=rng)
    moved = mmd_test(ref, rng.normal(0.7, 1, (60, 8)), permutations=200, rng=rng)
    assert same.p_value > 0.05 and abs(same.statistic) < 0.05
    assert moved.p_value <= 1 / 201 + 1e-9 and moved.statistic > same.statistic
    assert (same.n_reference, same.n_current) == (60, 60)


def test_mmd_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        mmd_test(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        mmd_test(np.zeros((4, 3)), np.zeros((5, 2)))


# -- drift monitor ------------------------------------------------------------------------
def test_the_first_results_are_the_reference_then_a_sliding_current() -> None:
    config = DriftConfig(reference_size=40, current_size=30, min_current=20, permutations=100)
    monitor = DriftMonitor(config)
    rng = np.random.default_rng(4)
    for v in rng.normal(0, 1, (40, 4)):
        monitor.add_prompt(v)
        monitor.add_response_length(float(rng.poisson(30)))
    empty = monitor.reading(rng)
    assert empty.prompt_p_value is None and empty.reference_prompts == 40
    for v in rng.normal(2, 1, (50, 4)):
        monitor.add_prompt(v)
        monitor.add_response_length(float(rng.poisson(5)))
    reading = monitor.reading(rng)
    assert reading.current_prompts == 30 and reading.current_lengths == 30
    assert reading.prompt_drifted(0.01) and reading.length_drifted(0.01)
    fields = reading.window_fields()
    assert fields["prompt_drift"] == reading.prompt_mmd2
    assert fields["response_length_drift"] == reading.length_ks


def test_a_pinned_reference_is_used_from_the_first_result() -> None:
    rng = np.random.default_rng(5)
    reference = Reference(rng.normal(0, 1, (30, 4)).astype(np.float32), (10.0,) * 30)
    monitor = DriftMonitor(DriftConfig(min_current=10, permutations=50), reference)
    for v in rng.normal(0, 1, (10, 4)):
        monitor.add_prompt(v)
        monitor.add_response_length(10.0)
    reading = monitor.reading(rng)
    assert reading.reference_prompts == 30 and reading.current_prompts == 10
    assert reading.length_ks == 0.0


def test_reference_from_records_embeds_the_prompts() -> None:
    reference = Reference.from_records(
        [{"prompt": "a", "completion_tokens": 3}, {"prompt": "bb"}, {"completion_tokens": 5}],
        lambda texts: np.array([[len(t), 1.0] for t in texts]),
    )
    assert reference.prompts.tolist() == [[1.0, 1.0], [2.0, 1.0]]
    assert reference.lengths == (3.0, 5.0)


def test_drift_state_round_trips_through_json() -> None:
    config = DriftConfig(reference_size=20, current_size=20, min_current=5, permutations=50)
    monitor = DriftMonitor(config)
    rng = np.random.default_rng(6)
    for v in rng.normal(0, 1, (35, 384)):
        monitor.add_prompt(v)
        monitor.add_response_length(float(rng.integers(1, 50)))
    restored = DriftMonitor.from_state(json.loads(json.dumps(monitor.to_state())), config)
    a = monitor.reading(np.random.default_rng(0))
    b = restored.reading(np.random.default_rng(0))
    assert a.length_ks == b.length_ks and a.current_prompts == b.current_prompts
    assert a.prompt_mmd2 == pytest.approx(b.prompt_mmd2, abs=1e-3)  # float16 storage


# -- quality -------------------------------------------------------------------------------
def result(text: str, finish: str = "stop", status: str = "OK") -> dict[str, object]:
    return {"status": status, "text": text, "finish_reason": finish}


def test_quality_rates_count_answers_only() -> None:
    counts = QualityCounts()
    for record in (
        result("Paris."),
        result("   "),
        result("I'm sorry, but I can't help with that."),
        result("The list goes on and", "length"),
        result("A complete sentence.", "length"),
        result("", "error", "ERROR"),
    ):
        counts.add_result(record)
    assert counts.answers == 5
    assert counts.empty_rate == pytest.approx(1 / 5)
    assert counts.refusal_rate == pytest.approx(1 / 5)
    assert counts.truncated_rate == pytest.approx(1 / 5)
    assert counts.length_finish_rate == pytest.approx(2 / 5)
    counts.add_feedback({"score": -1})
    counts.add_feedback({"score": 1})
    counts.add_feedback({"score": 1})
    assert counts.feedback_mean_score == pytest.approx(1 / 3)
    assert set(counts.window_fields()) == {"refusal_rate", "empty_rate", "length_finish_rate"}
    other = QualityCounts.from_state(json.loads(json.dumps(counts.to_state())))
    other.merge(counts)
    assert other.answers == 10 and other.empty == 2
    assert QualityCounts().empty_rate is None


def test_truncation_needs_the_length_limit() -> None:
    assert is_truncated("and then", "length")
    assert not is_truncated("and then", "stop")
    assert not is_truncated("Done.", "length")


# -- refusals -----------------------------------------------------------------------------
def test_the_labelled_set_is_big_enough_and_balanced() -> None:
    labelled = load_labelled(REFUSALS)
    assert len(labelled) >= 100
    refusals = sum(item["refusal"] for item in labelled)
    assert 40 <= refusals <= len(labelled) - 40
    assert len({item["id"] for item in labelled}) == len(labelled)


def test_refusal_rules_precision_and_recall() -> None:
    quality = evaluate(load_labelled(REFUSALS))
    # measured: precision 59/60, recall 59/60 (one miss, one false alarm)
    assert quality.precision >= 0.95, quality.false_alarms
    assert quality.recall >= 0.95, quality.missed


def test_refusals_are_read_from_the_head_of_the_answer() -> None:
    assert refusal_rule("I cannot assist with that.") == "first_person_inability"
    assert is_refusal("Sorry, that's not something I'm able to do.")
    assert not is_refusal("Paris is the capital. " * 10 + "I can't say more.")
    assert not is_refusal("")


# -- the set the metrics job feeds, and its gauges -----------------------------------------
class CountingEmbedder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[float(len(t)), 1.0] for t in texts])


def test_monitor_set_joins_prompts_to_results_and_embeds_in_batches() -> None:
    embedder = CountingEmbedder()
    config = DriftConfig(reference_size=3, current_size=5, min_current=2, permutations=20)
    monitors = MonitorSet(config, embedder, embed_batch=4, prompt_lookup=100)
    for i in range(6):
        monitors.add_request({"request_id": f"r{i}", "prompt": "x" * (i + 1)})
    for i in range(6):
        monitors.add_result(
            {
                "request_id": f"r{i}",
                "status": "OK",
                "model": "m",
                "model_version": "v2",
                "completion_tokens": i,
            }
        )
    monitors.add_result({"request_id": "zz", "status": "OK", "model": "m", "model_version": "v2"})
    monitors.add_result(
        {"request_id": "r0", "status": "ERROR", "model": "m", "model_version": "v2"}
    )
    assert monitors.embed_pending() == 4
    assert embedder.calls == [["x", "xx", "xxx", "xxxx"]]
    assert monitors.counts["prompt_not_sampled"] == 2
    assert monitors.counts["prompt_unknown"] == 1
    reading = monitors.reading("m", "v2")
    assert (reading.reference_prompts, reading.current_prompts) == (3, 1)
    assert (reading.reference_lengths, reading.current_lengths) == (3, 4)
    copy = MonitorSet(config, embedder)
    copy.restore(json.loads(json.dumps(monitors.to_state())))
    assert copy.versions == [("m", "v2")]
    assert copy.reading("m", "v2").current_lengths == 4


def test_gauges_show_the_readings_on_the_given_registry() -> None:
    registry = CollectorRegistry()
    collector = MonitorCollector(registry)
    monitor = DriftMonitor(DriftConfig(reference_size=5, current_size=5, min_current=5))
    rng = np.random.default_rng(7)
    for v in rng.normal(0, 1, (10, 3)):
        monitor.add_prompt(v)
        monitor.add_response_length(3.0)
    counts = QualityCounts()
    counts.add_result(result(""))
    counts.add_result(result("Fine."))
    collector.publish("m", "v1", drift=monitor.reading(rng), quality=counts)
    labels = {"model": "m", "version": "v1"}
    assert registry.get_sample_value("sluice_monitor_empty_answer_ratio", labels) == 0.5
    assert registry.get_sample_value("sluice_monitor_response_length_ks", labels) == 0.0
    assert registry.get_sample_value("sluice_monitor_prompt_drift_p_value", labels) is not None
    assert registry.get_sample_value("sluice_monitor_feedback_score", labels) is None  # none yet


# -- power on synthetic vectors (fast) and the real embedder ------------------------------
def test_power_measure_flags_shifts_and_rarely_the_unshifted() -> None:
    rng = np.random.default_rng(8)
    base = rng.normal(0, 1, (400, 6))
    shifted = rng.normal(0.8, 1, (200, 6))
    config = DriftConfig(reference_size=60, current_size=60, min_current=20, permutations=100)
    report = measure_power(base, shifted, config, trials=10, max_requests=100, check_every=20)
    assert report.detection_rate == 1.0
    assert report.false_alarm_rate <= 0.2
    assert report.summary()["requests_to_flag_median"] <= 40


@pytest.mark.slow
def test_the_offline_embedder_sees_a_topic_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any hub access would fail the load
    from streams.monitors.embeddings import DIMENSION, MiniLMEmbedder

    embedder = MiniLMEmbedder()
    general = embedder.embed(general_prompts(80, seed=3))
    coding = embedder.embed(coding_prompts(40, seed=4))
    assert general.shape == (80, DIMENSION)
    assert np.allclose(np.linalg.norm(general, axis=1), 1.0, atol=1e-3)
    rng = np.random.default_rng(0)
    calm = mmd_test(general[:40], general[40:], permutations=200, rng=rng)
    shift = mmd_test(general[:40], coding, permutations=200, rng=rng)
    assert calm.p_value > 0.01
    assert shift.p_value < 0.01 and shift.statistic > calm.statistic


# -- alert rules ----------------------------------------------------------------------------
PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def require_tool(name: str) -> str:
    """The tool's path; a missing one skips locally and fails in CI (make test installs it)."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: make test installs Debian's prometheus")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


@pytest.mark.parametrize(
    "args",
    [["check", "rules", "monitors.rules.yml"], ["test", "rules", "monitors.rules.test.yml"]],
    ids=["check", "test"],
)
def test_monitor_alert_rules_with_promtool(args: list[str]) -> None:
    import subprocess

    done = subprocess.run(
        [require_tool("promtool"), *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_monitor_gauge_has_an_alert() -> None:
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load((PROMETHEUS_DIR / "monitors.rules.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    collector = MonitorCollector(CollectorRegistry())
    names = {g._name for g in vars(collector).values()}
    # the statistics themselves are for dashboards; their p-values are what alerts
    statistics = {"sluice_monitor_prompt_drift_mmd2", "sluice_monitor_response_length_ks"}
    missing = {n for n in names - statistics if n not in exprs}
    assert not missing, missing


def test_the_monitor_rules_ship_with_compose_and_kubernetes() -> None:
    yaml = pytest.importorskip("yaml")
    import importlib.util

    deploy = PROMETHEUS_DIR.parent
    spec = importlib.util.spec_from_file_location(
        "render_prometheusrule", PROMETHEUS_DIR / "render_prometheusrule.py"
    )
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    shipped = deploy / "k8s" / "prometheusrule-monitors.yaml"
    assert render.render_monitors() == shipped.read_text(), (
        "deploy/k8s/prometheusrule-monitors.yaml is stale: run render_prometheusrule.py"
    )
    rules = yaml.safe_load((PROMETHEUS_DIR / "monitors.rules.yml").read_text())
    assert yaml.safe_load(shipped.read_text())["spec"]["groups"] == rules["groups"]
    kustomization = yaml.safe_load((deploy / "k8s" / "kustomization.yaml").read_text())
    assert "prometheusrule-monitors.yaml" in kustomization["resources"]
    compose = yaml.safe_load((deploy / "compose" / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(
        m.startswith("../prometheus/monitors.rules.yml:/etc/prometheus/rules/") for m in mounts
    )
    assert compose["services"]["metrics"]["environment"]["SLUICE_WORKER_ROLE"] == "metrics"
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["sluice-metrics"]["dns_sd_configs"][0]["names"] == ["metrics"]


def test_every_cost_counter_has_an_alert() -> None:
    yaml = pytest.importorskip("yaml")
    from streams.metrics_windows.cost import CostCounters

    rules = yaml.safe_load((PROMETHEUS_DIR / "monitors.rules.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    cost = CostCounters(CollectorRegistry(), top_k=3)
    used = {c._name for c in (cost.engine_seconds, cost.requests) if c._name in exprs}
    assert used == {"sluice_tenant_engine_seconds", "sluice_tenant_requests"}


def test_kubernetes_runs_one_metrics_worker_that_prometheus_scrapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    yaml = pytest.importorskip("yaml")
    from streams.settings import Settings

    k8s = PROMETHEUS_DIR.parent / "k8s"
    docs = {d["kind"]: d for d in yaml.safe_load_all((k8s / "metrics.yaml").read_text())}
    deployment, service, monitor = docs["Deployment"], docs["Service"], docs["ServiceMonitor"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two at once
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (container,) = pod["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    env = yaml.safe_load((k8s / "configmap.yaml").read_text())["data"]
    env |= {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.worker_role == "metrics" and settings.metrics_port == port
    assert settings.metrics_host == "0.0.0.0"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    assert "metrics.yaml" in kustomization["resources"]
