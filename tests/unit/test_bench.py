"""The pure parts of ``sluice bench``: percentiles, pacing, aggregation, report shape."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from pydantic import SecretStr

from connectors.bench import BENCHMARK_ENGINE, REPORT_SCHEMA, BenchError, BenchOptions
from connectors.bench.anchor import anchor_engine_settings, configured_label
from connectors.bench.pipeline import process_cpu_s, run_settings, run_topics, worker_env
from connectors.bench.report import busy_warning, jsonable, print_report
from connectors.bench.stats import (
    ANCHOR_ENGINE,
    REFERENCE_ENGINE,
    Sample,
    anchor_figures,
    anchor_targets,
    batch_histogram,
    compare_outputs,
    cpu_usage,
    latency_summary,
    load_figures,
    load_targets,
    percentile,
    ratio,
    summarize,
    targets,
)
from connectors.bench.workload import (
    level_count,
    make_prompts,
    paced,
    poisson_offsets,
    schedule_offsets,
    sweep_plan,
)
from streams.settings import Settings


# -- percentiles ---------------------------------------------------------------------------
def test_percentile_matches_linear_interpolation() -> None:
    values = [10.0, 1.0, 4.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 75) == 4.0
    assert percentile(values, 90) == pytest.approx(4.0 + 0.6 * 6.0)


def test_percentile_agrees_with_numpy() -> None:
    np = pytest.importorskip("numpy")
    data = [float((i * 37) % 101) for i in range(257)]
    for q in (1, 50, 95, 99, 99.9):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary() -> None:
    s = latency_summary([float(i) for i in range(1, 101)])
    assert s["count"] == 100
    assert s["p50"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)
    assert s["mean"] == pytest.approx(50.5)
    assert s["max"] == 100.0
    empty = latency_summary([])
    assert empty["count"] == 0 and empty["p99"] is None and empty["mean"] is None


# -- rate limiter ------------------------------------------------------------------------
def test_schedule_offsets() -> None:
    assert schedule_offsets(3, None) == [0.0, 0.0, 0.0]
    assert schedule_offsets(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert schedule_offsets(0, 10.0) == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_paced_releases_each_request_at_its_time() -> None:
    clock = FakeClock()
    sent: list[tuple[int, float]] = []
    async for i in paced(5, 10.0, clock=clock, sleep=clock.sleep):
        sent.append((i, clock.now - 100.0))
    assert [i for i, _ in sent] == [0, 1, 2, 3, 4]
    for i, at in sent:
        assert at == pytest.approx(i / 10.0)


async def test_paced_open_loop_catches_up_without_sleeping() -> None:
    """A slow sender does not push the schedule back: overdue requests go out at once."""
    clock = FakeClock()
    sent: list[float] = []
    async for _ in paced(6, 100.0, clock=clock, sleep=clock.sleep, yield_every=1000):
        sent.append(clock.now - 100.0)
        clock.now += 0.025  # each send takes 25 ms, 2.5 intervals
    assert clock.sleeps == []  # always behind: no waiting
    assert sent[-1] == pytest.approx(5 * 0.025)


async def test_paced_without_rate_only_yields_to_the_loop() -> None:
    clock = FakeClock()
    got = [i async for i in paced(130, None, clock=clock, sleep=clock.sleep, yield_every=64)]
    assert got == list(range(130))
    assert clock.sleeps == [0, 0]  # after #63 and #127
    assert clock.now == 100.0


# -- prompts and plans ---------------------------------------------------------------------
def test_make_prompts_is_deterministic_and_cycles_lengths() -> None:
    a = make_prompts(6, [8, 32, 128], seed=3)
    assert a == make_prompts(6, [8, 32, 128], seed=3)
    assert a != make_prompts(6, [8, 32, 128], seed=4)
    assert [len(p.split()) for p in a] == [8, 32, 128, 8, 32, 128]
    assert len(make_prompts(3, [2], seed=1)[0].split()) == 1


def test_sweep_plan_whole_batches() -> None:
    assert sweep_plan([1, 4, 8, 16], None) == [(1, 6), (4, 8), (8, 16), (16, 32)]
    assert sweep_plan([3], 10) == [(3, 12)]
    assert sweep_plan([5], 2) == [(5, 5)]


# -- aggregation ---------------------------------------------------------------------------
def _sample(i: int, total: float, inference: float, tokens: int = 4, status: str = "OK") -> Sample:
    return Sample(
        index=i,
        status=status,
        prompt_tokens=10,
        completion_tokens=tokens,
        batch_size=2,
        stages={"inference": inference, "total": total, "added": total - inference},
    )


def test_summarize_counts_only_ok_requests() -> None:
    samples = [_sample(0, 100.0, 90.0), _sample(1, 200.0, 150.0), _sample(2, 5.0, 0.0, 0, "ERROR")]
    s = summarize(samples, 2.0, label="x", engine="e")
    assert s["requests"] == 3 and s["ok"] == 2
    assert s["statuses"] == {"OK": 2, "ERROR": 1}
    assert s["requests_per_s"] == pytest.approx(1.0)
    assert s["output_tokens"] == 8
    assert s["output_tokens_per_s"] == pytest.approx(4.0)
    assert s["prompt_tokens"] == 20
    assert s["mean_batch_size"] == 2.0
    assert s["batch_size_histogram"] == {"2": 2}
    assert list(s["latency_ms"]) == ["inference", "added", "total"]  # STAGES order
    assert s["latency_ms"]["added"]["max"] == 50.0
    assert s["latency_ms"]["total"]["count"] == 2


def test_batch_histogram() -> None:
    samples = [_sample(i, 1.0, 1.0) for i in range(3)]
    samples[0].batch_size = 16
    assert batch_histogram(samples) == {"2": 2, "16": 1}
    assert batch_histogram([]) == {}


def test_summarize_empty_and_zero_wall() -> None:
    s = summarize([], 0.0, label="x", engine="e")
    assert s["requests_per_s"] == 0.0 and s["output_tokens_per_s"] == 0.0
    assert s["latency_ms"] == {}


def test_ratio() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None
    assert ratio(1.0, 0.0) is None


def test_compare_outputs() -> None:
    a = ["the cat sat", "one two three four", "", "x"]
    b = ["the cat sat", "one two tree four", "", "y z"]
    got = compare_outputs(a, b, str.split)
    assert got["pairs"] == 4
    assert got["identical"] == pytest.approx(0.5)
    # overlaps per pair: 1, 3/4, 1 (both empty), 0/2
    assert got["token_overlap"] == pytest.approx((1 + 0.75 + 1 + 0) / 4)
    # common prefixes: 3/3, 2/4, 1, 0
    assert got["prefix_overlap"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert compare_outputs([], [], str.split)["identical"] is None
    with pytest.raises(ValueError):
        compare_outputs(["a"], [], str.split)


def test_cpu_usage() -> None:
    got = cpu_usage(
        {"workers": 1.0, "client": 2.0, "broker": None},
        {"workers": 3.0, "client": 2.5, "broker": 9.0},
        wall_s=4.0,
        requests=1000,
    )
    assert got["workers"] == {"cpu_s": 2.0, "cores": 0.5, "us_per_request": 2000.0}
    assert got["client"]["cores"] == pytest.approx(0.125)
    assert "broker" not in got


def test_process_cpu_of_this_process() -> None:
    import os

    used = process_cpu_s(os.getpid())
    if Path("/proc/self/stat").exists():
        assert used is not None and used >= 0
    assert process_cpu_s(2**31 - 1) is None


def _run(rps: float, tps: float, added_p99: float | None = None) -> dict:
    out = {"requests_per_s": rps, "output_tokens_per_s": tps, "latency_ms": {}}
    if added_p99 is not None:
        out["latency_ms"]["added"] = {"p99": added_p99}
    return out


def test_targets() -> None:
    modes = {
        "direct": _run(10.0, 100.0),
        "pipeline": _run(9.6, 94.0),
        "ceiling": {
            "saturation": _run(12_000.0, 0.0),
            "half_rate": _run(6_000.0, 0.0, added_p99=16.0) | {"target_rate": 6000.0},
        },
    }
    t = targets(modes)
    assert t["pipeline_vs_direct"]["requests_ratio"] == pytest.approx(0.96)
    assert t["pipeline_vs_direct"]["tokens_ratio"] == pytest.approx(0.94)
    assert t["pipeline_vs_direct"]["met"] is False  # tokens below 0.95
    assert t["ceiling_requests_per_s"] == {"value": 12_000.0, "target": 10_000.0, "met": True}
    assert t["half_rate_added_p99_ms"]["met"] is False
    assert t["half_rate_added_p99_ms"]["rate"] == 6000.0
    assert targets({}) == {}


# -- anchor --------------------------------------------------------------------------------
def _pair(one: float, concurrent: float) -> dict:
    return {
        "one": {"output_tokens_per_s": one, "engine": "E", "concurrency": 1},
        "concurrent": {"output_tokens_per_s": concurrent, "concurrency": 16},
    }


def test_anchor_figures_are_ratios_of_llama_cpp() -> None:
    runs = {"llama.cpp": _pair(80.0, 200.0), "torch fp32": _pair(20.0, 240.0)}
    agreement = {"llama.cpp": {"identical": 0.5}, "torch fp32": {"identical": 1.0}}
    rows = {r["engine"]: r for r in anchor_figures(runs, agreement)}
    torch_row = rows["torch fp32"]
    assert torch_row["one_vs_anchor_one"] == pytest.approx(0.25)
    assert torch_row["concurrent_vs_anchor_one"] == pytest.approx(3.0)
    assert torch_row["concurrent_vs_anchor_concurrent"] == pytest.approx(1.2)
    assert torch_row["agreement_with_fp32"] == {"identical": 1.0}
    assert torch_row["concurrency"] == 16
    assert rows["llama.cpp"]["one_vs_anchor_one"] == pytest.approx(1.0)
    # Without llama.cpp there is nothing to divide by: figures stay, ratios are None.
    (alone,) = anchor_figures({"torch fp32": _pair(20.0, 240.0)}, {})
    assert alone["one_tokens_per_s"] == 20.0 and alone["one_vs_anchor_one"] is None


def test_anchor_targets() -> None:
    runs = {"llama.cpp": _pair(80.0, 200.0), "torch fp32": _pair(100.0, 230.0)}
    anchor = {"configured": "torch fp32", "engines": anchor_figures(runs, {})}
    t = anchor_targets(anchor)
    assert t["anchor_batch1"]["value"] == pytest.approx(1.25) and t["anchor_batch1"]["met"]
    assert t["anchor_concurrent"]["value"] == pytest.approx(230.0 / 80.0)
    assert t["anchor_concurrent"]["met"] is False  # below 3x llama.cpp one at a time
    assert anchor_targets({}) == {}
    no_llama = {"configured": "torch fp32", "engines": anchor_figures({"x": _pair(1, 2)}, {})}
    assert anchor_targets(no_llama) == {}


def test_anchor_engines_and_labels(tmp_path: Path) -> None:
    import importlib.util

    base = Settings(home=tmp_path)
    engines = anchor_engine_settings(base)
    assert configured_label(base) == REFERENCE_ENGINE
    assert engines[REFERENCE_ENGINE].backend == "torch"
    assert engines[REFERENCE_ENGINE].torch_quantize == "none"
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    assert (ANCHOR_ENGINE in engines) == has_llama
    assert len(engines) == 1 + has_llama  # the configured engine is the reference
    if has_llama:
        assert engines[ANCHOR_ENGINE].backend == "llama_cpp"
    int8 = base.model_copy(update={"torch_quantize": "int8"})
    assert configured_label(int8) == "torch auto auto int8"
    assert anchor_engine_settings(int8)["torch auto auto int8"] is int8
    llama = base.model_copy(update={"backend": "llama_cpp"})
    assert configured_label(llama) == ANCHOR_ENGINE


# -- options and settings --------------------------------------------------------------------
def test_options_parse_and_validate() -> None:
    o = BenchOptions(modes="ceiling, direct", batch_sizes="8,1,8", prompt_words="8, 32")
    assert o.mode_list() == ["direct", "ceiling"]
    assert o.batch_size_list() == [1, 8]
    assert o.prompt_word_list() == [8, 32]
    o.validate(Settings())
    for bad in (
        BenchOptions(modes="direct,bogus"),
        BenchOptions(modes=""),
        BenchOptions(batch_sizes="1,x"),
        BenchOptions(prompt_words="0"),
        BenchOptions(requests=0),
        BenchOptions(rate=0.0),
        BenchOptions(concurrency=0),
        BenchOptions(max_new_tokens=10_000),
    ):
        with pytest.raises(BenchError):
            bad.validate(Settings())


def test_defaults() -> None:
    o = BenchOptions()
    assert (o.requests, o.pipeline_requests, o.max_new_tokens) == (64, 20_000, 16)
    assert (o.partitions, o.workers, o.quantize_compare) == (4, 1, True)
    assert o.mode_list() == ["direct", "pipeline", "ceiling"]
    assert o.batch_size_list() == [1, 4, 8, 16]
    assert o.out_dir == Path("bench-results")


def test_run_settings_gives_every_topic_a_fresh_name(tmp_path: Path) -> None:
    base = Settings(home=tmp_path, metrics_port=9464)
    a = run_settings(base, "127.0.0.1:1", "aaaa", partitions=2)
    b = run_settings(base, "127.0.0.1:1", "bbbb")
    assert a.app_id == "sluice-bench-aaaa" and a.partitions == 2
    assert a.kafka_bootstrap == "127.0.0.1:1" and a.metrics_port == 0
    assert a.home.is_absolute()
    topics_a, topics_b = run_topics(a), run_topics(b)
    assert len(topics_a) == len(set(topics_a)) >= 7
    assert all(t.startswith("bench-aaaa.") for t in topics_a)
    assert not set(topics_a) & set(topics_b)
    assert a.requests_topic == "bench-aaaa.llm.requests"


def test_worker_env_round_trips_and_passes_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        kafka_bootstrap="h:1",
        kafka_sasl_password=SecretStr("s3cret"),
        backend="benchmark",
        batch_max_wait_ms=5.0,
    )
    env = worker_env(settings)
    assert env["SLUICE_KAFKA_SASL_PASSWORD"] == "s3cret"
    assert "SLUICE_WORKER_ID" not in env
    assert "SLUICE_MODEL_PATH" not in env  # None is left out
    for key in list(__import__("os").environ):
        if key.startswith("SLUICE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    again = Settings()
    assert again.backend == "benchmark" and again.batch_max_wait_ms == 5.0
    assert again.kafka_sasl_password is not None
    assert again.kafka_sasl_password.get_secret_value() == "s3cret"


# -- report shape ------------------------------------------------------------------------
def _fake_report(tmp_path: Path) -> dict:
    direct = summarize([_sample(0, 100.0, 90.0)], 1.0, label="direct", engine="TorchEngine")
    direct["sweep"] = [
        {
            "batch_size": 1,
            "requests": 2,
            "ok": 2,
            "wall_s": 1.0,
            "requests_per_s": 2.0,
            "output_tokens": 8,
            "output_tokens_per_s": 8.0,
            "batch_ms": latency_summary([500.0, 500.0]),
        }
    ]
    pipeline = summarize([_sample(0, 104.0, 90.0)], 1.05, label="pipeline", engine="torch")
    saturation = summarize([_sample(0, 3.0, 0.0)], 0.001, label="c", engine=BENCHMARK_ENGINE)
    half = summarize([_sample(0, 2.0, 0.0)], 0.002, label="c", engine=BENCHMARK_ENGINE)
    half["target_rate"] = 500.0
    modes = {
        "direct": direct,
        "pipeline": pipeline,
        "ceiling": {"saturation": saturation, "half_rate": half},
    }
    return {
        "schema": REPORT_SCHEMA,
        "options": jsonable(vars(BenchOptions(out_dir=tmp_path))),
        "modes": modes,
        "targets": targets(modes),
        "files": {"json": str(tmp_path / "b.json"), "plots": {}},
    }


def test_report_is_json_and_prints(tmp_path: Path) -> None:
    from rich.console import Console

    report = _fake_report(tmp_path)
    text = json.dumps(jsonable(report))
    back = json.loads(text)
    assert back["options"]["out_dir"] == str(tmp_path)
    assert set(back["targets"]) == {
        "pipeline_vs_direct",
        "ceiling_requests_per_s",
        "half_rate_added_p99_ms",
    }
    console = Console(record=True, width=160)
    print_report(report, console)
    out = console.export_text()
    assert "pipeline / direct req/s" in out
    assert "benchmark engine" in out
    assert "ceiling req/s" in out


def test_jsonable_cleans_values() -> None:
    got = jsonable({"p": Path("/x"), "f": math.inf, "t": (1, 2), "s": SecretStr("k")})
    assert got == {"p": "/x", "f": None, "t": [1, 2], "s": "**********"}


def test_plots(tmp_path: Path) -> None:
    plots = pytest.importorskip("connectors.bench.plots")
    sweep = [
        {"batch_size": b, "requests_per_s": b * 0.5, "output_tokens_per_s": b * 7.0}
        for b in (1, 4, 8)
    ]
    a = plots.plot_batch_sweep(sweep, tmp_path / "sweep.png")
    b = plots.plot_latency_cdf({"x": [1.0, 2.0, 300.0], "empty": []}, tmp_path / "cdf.png")
    for path in (a, b):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_warning() -> None:
    assert busy_warning([1.5, 1.0, 1.0], 2) is None
    assert busy_warning(None, 2) is None
    note = busy_warning([5.0, 1.0, 1.0], 2)
    assert note is not None and "lower bounds" in note


# -- partial load ------------------------------------------------------------------------
def test_poisson_offsets_are_seeded_increasing_and_have_the_rate() -> None:
    a = poisson_offsets(2000, 50.0, seed=3)
    assert a == poisson_offsets(2000, 50.0, seed=3)
    assert a != poisson_offsets(2000, 50.0, seed=4)
    assert a[0] == 0.0 and all(x < y for x, y in itertools.pairwise(a))
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50.0, rel=0.1)
    # exponential gaps: the coefficient of variation is about 1 (a fixed rate gives 0)
    mean = sum(gaps) / len(gaps)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert sd / mean == pytest.approx(1.0, abs=0.15)
    assert poisson_offsets(0, 1.0) == [] and poisson_offsets(1, 1.0) == [0.0]
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            poisson_offsets(3, bad)


def test_level_count_bounds_the_arrival_span() -> None:
    assert level_count(24, 10.0, 60.0) == 24  # 2.4 s of arrivals
    assert level_count(24, 0.2, 60.0) == 12  # 24 would take 120 s
    assert level_count(24, 0.01, 60.0) == 4  # at least a few requests
    assert level_count(3, 0.01, 60.0) == 3  # ...but never more than asked
    assert level_count(24, 0.0, 60.0) == 24


async def test_paced_follows_given_offsets() -> None:
    clock = FakeClock()
    sent: list[float] = []
    async for _ in paced(3, None, offsets=[0.0, 0.25, 0.3], clock=clock, sleep=clock.sleep):
        sent.append(clock.now - 100.0)
    assert sent == pytest.approx([0.0, 0.25, 0.3])
    with pytest.raises(ValueError):
        async for _ in paced(2, None, offsets=[0.0]):
            pass


def test_load_level_options() -> None:
    assert BenchOptions().load_level_list() == [0.25, 0.5, 0.9]
    assert BenchOptions(load_levels="0.9, 0.5,0.5").load_level_list() == [0.5, 0.9]
    for off in ("", "none", " off "):
        assert BenchOptions(load_levels=off).load_level_list() == []
    for bad in (
        BenchOptions(load_levels="0.5,x"),
        BenchOptions(load_levels="0"),
        BenchOptions(load_levels="1.5"),
        BenchOptions(load_requests=0),
        BenchOptions(lone_requests=0),
        BenchOptions(load_level_max_s=0.0),
    ):
        with pytest.raises(BenchError):
            bad.validate(Settings())


def _e2e_run(e2e_ms: list[float], wall_s: float, rate: float | None = None) -> dict:
    samples = [
        Sample(i, "OK", 5, 4, 2, {"inference": 1.0, "total": 2.0, "e2e": v})
        for i, v in enumerate(e2e_ms)
    ]
    summary = summarize(samples, wall_s, label="x", engine="torch")
    summary["target_rate"] = rate
    return summary


def _load() -> dict:
    lone = _e2e_run([100.0, 200.0, 300.0], 1.0)
    levels = [
        (0.25, _e2e_run([150.0, 250.0, 350.0], 3.0, 0.5)),
        (0.5, _e2e_run([300.0, 400.0, 500.0], 2.0, 1.0)),
    ]
    return load_figures(2.0, lone, levels)


def test_load_figures_and_target() -> None:
    load = _load()
    assert load["saturation_requests_per_s"] == 2.0
    assert load["lone"]["p50"] == 200.0 and load["lone"]["requests"] == 3
    quarter, half = load["levels"]
    assert (quarter["fraction"], quarter["target_rate"]) == (0.25, 0.5)
    assert quarter["p50"] == 250.0 and quarter["p50_vs_lone"] == pytest.approx(1.25)
    assert half["p50_vs_lone"] == pytest.approx(2.0)
    assert half["p99_vs_lone"] == pytest.approx(half["p99"] / 200.0)
    assert half["achieved_requests_per_s"] == pytest.approx(1.5)
    t = load_targets(load)["half_load_p50_vs_lone"]
    assert t["value"] == pytest.approx(2.0) and t["rate"] == 1.0
    assert t["target"] == 1.5 and t["met"] is False
    load["levels"][1]["p50_vs_lone"] = 1.4
    assert load_targets(load)["half_load_p50_vs_lone"]["met"] is True
    assert load_targets({"levels": load["levels"][:1]}) == {}  # no 50 % level, no target
    assert load_targets({}) == {}


def test_report_prints_the_load_table(tmp_path: Path) -> None:
    from rich.console import Console

    report = _fake_report(tmp_path)
    report["load"] = _load()
    report["targets"] |= load_targets(report["load"])
    json.dumps(jsonable(report))
    console = Console(record=True, width=200)
    print_report(report, console)
    out = console.export_text()
    assert "publish -> result at partial load (saturation 2.00 req/s" in out
    lone = next(line for line in out.splitlines() if line.strip("│ ").startswith("lone"))
    assert "3/3" in lone and "200" in lone and "1.00" in lone
    half = next(line for line in out.splitlines() if line.strip("│ ").startswith("50 %"))
    assert "1.00" in half and "2.00" in half  # target rate, p50 x lone
    assert "p50 publish -> result at 50 % load (1.00 req/s) / lone" in out
    row = next(line for line in out.splitlines() if "at 50 % load" in line)
    assert "2.00" in row and "<= 1.5" in row and "missed" in row
