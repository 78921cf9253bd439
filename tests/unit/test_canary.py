"""The auto canary's decision on synthetic MetricsWindow records (streams/canary.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from streams.canary import (
    ArmStats,
    CanaryPolicy,
    arm_stats,
    count_above,
    decide,
    mixture_radius,
)
from streams.metrics_windows.sketch import QuantileSketch

BASE, CANDIDATE = "v1", "v2"


def window_factory(
    version: str,
    start_ms: int,
    *,
    ok: int,
    error: int = 0,
    empty_rate: float | None = 0.0,
    latencies: list[float] | None = None,
    feedback: list[int] | None = None,
    length_s: int = 10,
    correction: bool = False,
    drift_p: float | None = None,
) -> dict[str, Any]:
    sketch = QuantileSketch()
    sketch.extend(latencies if latencies is not None else [100.0] * (ok + error))
    feedback = feedback or []
    window_id = f"{length_s}s:{start_ms}:m:{version}:"
    return {
        "window_id": window_id + (f":correction@{start_ms}" if correction else ""),
        "length_s": length_s,
        "model": "m",
        "model_version": version,
        "correction": correction,
        "requests": {"OK": ok, "ERROR": error},
        "empty_rate": empty_rate,
        "latency": {"total": {"sketch": sketch.to_dict()}},
        "feedback_count": len(feedback),
        "feedback_score_sum": sum(feedback),
        "prompt_drift_p_value": drift_p,
    }


def live(
    candidate: dict[str, float],
    base: dict[str, float],
    *,
    per_window: int = 50,
    canary_share: float = 0.2,
    seed: int = 0,
) -> Iterator[list[dict[str, Any]]]:
    """Windows as they arrive: each step adds one window per version; yields all so far."""
    rng = np.random.default_rng(seed)
    windows: list[dict[str, Any]] = []
    for i in range(10_000):
        for version, spec, n in (
            (CANDIDATE, candidate, round(per_window * canary_share)),
            (BASE, base, round(per_window * (1 - canary_share))),
        ):
            error = int(rng.binomial(n, spec.get("error", 0.0)))
            ok = n - error
            empty = int(rng.binomial(ok, spec.get("empty", 0.0)))
            latencies = list(rng.lognormal(np.log(spec.get("latency_ms", 100.0)), 0.2, n))
            scores = list(
                rng.choice([-1, 0, 1], size=n // 2, p=spec.get("scores", (0.1, 0.3, 0.6)))
            )
            windows.append(
                window_factory(
                    version,
                    i * 10_000,
                    ok=ok,
                    error=error,
                    empty_rate=empty / ok if ok else None,
                    latencies=latencies,
                    feedback=[int(s) for s in scores],
                )
            )
        yield windows


def run_until_decided(windows: Iterator[list[dict[str, Any]]], policy: CanaryPolicy):  # type: ignore[no-untyped-def]
    for seen in windows:
        decision = decide(arm_stats(CANDIDATE, seen), arm_stats(BASE, seen), policy)
        if decision.verdict != "CONTINUE":
            return decision
    raise AssertionError("never decided")


def test_a_good_candidate_is_promoted_after_enough_traffic() -> None:
    policy = CanaryPolicy()
    same = {"error": 0.005, "latency_ms": 100.0}
    decision = run_until_decided(live(same, same), policy)
    assert decision.verdict == "PROMOTE", decision.reason
    assert decision.command == "PROMOTE"
    assert decision.candidate["requests"] >= policy.min_requests
    assert decision.candidate["requests"] <= 2_000  # the traffic it needed, bounded
    checks = decision.evidence()["checks"]
    assert checks["bad_answers"]["upper"] < policy.error_margin
    assert checks["feedback"]["lower"] > -policy.feedback_margin


def test_a_candidate_that_answers_empty_is_rolled_back_at_once() -> None:
    policy = CanaryPolicy()
    decision = run_until_decided(live({"empty": 1.0}, {"error": 0.005}), policy)
    assert decision.verdict == "ROLLBACK"
    assert "bad answers" in decision.reason
    assert decision.candidate["empty"] == decision.candidate["requests"]
    # at once: the first look with enough candidate results
    assert decision.candidate["requests"] <= policy.min_rollback_requests + 10


def test_a_slow_candidate_is_rolled_back() -> None:
    decision = run_until_decided(live({"latency_ms": 300.0}, {"latency_ms": 100.0}), CanaryPolicy())
    assert decision.verdict == "ROLLBACK"
    assert "latency" in decision.reason
    assert (
        decision.checks["latency"]["candidate_p99_ms"] > decision.checks["latency"]["threshold_ms"]
    )


def test_a_candidate_users_dislike_is_rolled_back() -> None:
    decision = run_until_decided(
        live({"scores": (0.7, 0.2, 0.1)}, {"scores": (0.1, 0.3, 0.6)}), CanaryPolicy()
    )
    assert decision.verdict == "ROLLBACK"
    assert "feedback" in decision.reason


def test_a_slightly_worse_candidate_is_not_promoted() -> None:
    # 4 points more errors: more than the 2-point margin, so never promoted
    decision = run_until_decided(
        live({"error": 0.05}, {"error": 0.01}), CanaryPolicy(max_requests=5_000)
    )
    assert decision.verdict == "ROLLBACK"


def test_too_little_traffic_continues() -> None:
    windows = [
        window_factory(CANDIDATE, 0, ok=10),
        window_factory(BASE, 0, ok=40),
    ]
    decision = decide(arm_stats(CANDIDATE, windows), arm_stats(BASE, windows))
    assert decision.verdict == "CONTINUE"
    assert decision.command is None


def test_drift_on_the_candidate_only_holds_the_promotion() -> None:
    stats = {"error": 0.0}
    seen = None
    for seen in live(stats, stats):
        if sum(w["requests"]["OK"] for w in seen if w["model_version"] == CANDIDATE) > 1000:
            break
    assert seen is not None
    seen.append(window_factory(CANDIDATE, 99_000_000, ok=1, drift_p=0.001))
    decision = decide(arm_stats(CANDIDATE, seen), arm_stats(BASE, seen))
    assert decision.verdict == "CONTINUE"
    assert decision.checks["drift"]["candidate_only"] is True


def test_equal_versions_are_rarely_rolled_back() -> None:
    """The false-decision rate: equal versions, 40 canaries, each looked at every window."""
    policy = CanaryPolicy(alpha=0.05)
    same = {"error": 0.02}
    wrong = sum(
        run_until_decided(live(same, same, seed=seed), policy).verdict == "ROLLBACK"
        for seed in range(40)
    )
    assert wrong <= 5  # alpha 5 %: 2 expected at most; 5 leaves room for chance


def test_arm_stats_counts_base_windows_once_with_corrections() -> None:
    windows = [
        window_factory(CANDIDATE, 0, ok=10, error=2),
        window_factory(CANDIDATE, 0, ok=10, error=2),  # published twice: same window_id
        window_factory(CANDIDATE, 0, ok=3, correction=True),
        window_factory(CANDIDATE, 0, ok=99, length_s=60),  # a rollup
        window_factory(CANDIDATE, 10_000, ok=5, empty_rate=0.4),
        window_factory(BASE, 0, ok=1000),
    ]
    stats = arm_stats(CANDIDATE, windows)
    assert stats.windows == 3
    assert stats.requests == 12 + 3 + 5
    assert stats.empty == 2
    assert stats.bad == 2 + 2
    assert stats.latency.count == 20


def test_count_above_never_overcounts() -> None:
    sketch = QuantileSketch()
    sketch.extend([10.0] * 90 + [500.0] * 10)
    assert count_above(sketch, 400.0) == 10
    assert count_above(sketch, 10.5) == 10
    assert count_above(sketch, 600.0) == 0
    assert count_above(QuantileSketch(), 1.0) == 0


def test_the_radius_shrinks_with_traffic_and_grows_with_confidence() -> None:
    assert mixture_radius(1e-4, 1e-3, 0.05) > mixture_radius(1e-5, 1e-3, 0.05)
    assert mixture_radius(1e-4, 1e-3, 0.01) > mixture_radius(1e-4, 1e-3, 0.05)


def test_policy_validates() -> None:
    with pytest.raises(ValueError):
        CanaryPolicy(alpha=0)
    with pytest.raises(ValueError):
        CanaryPolicy(min_requests=10, min_rollback_requests=20)
    assert isinstance(arm_stats("x", []), ArmStats)


def test_the_base_is_the_other_version_with_most_traffic() -> None:
    from datetime import UTC, datetime

    from streams.canary import base_version, window_start_ms

    windows = [
        {"model": "m", "model_version": CANDIDATE, "requests_total": 500},
        {"model": "m", "model_version": BASE, "requests_total": 80},
        {"model": "m", "model_version": "old", "requests_total": 3},
        {"model": "", "model_version": "", "requests_total": 900},  # dead letters
    ]
    assert base_version(windows, CANDIDATE) == BASE
    assert base_version([], CANDIDATE) == ""
    assert window_start_ms({"window_start": 1_000}) == 1_000
    when = datetime(2027, 1, 1, tzinfo=UTC)
    assert window_start_ms({"window_start": when}) == int(when.timestamp() * 1000)


def test_policy_from_settings_takes_every_canary_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.settings import Settings

    for name, value in {
        "ALPHA": "0.1",
        "ERROR_MARGIN": "0.05",
        "LATENCY_MARGIN": "0.5",
        "LATENCY_SHARE_MARGIN": "0.04",
        "FEEDBACK_MARGIN": "0.3",
        "MIN_REQUESTS": "300",
        "MIN_ROLLBACK_REQUESTS": "7",
        "MIN_FEEDBACK": "5",
        "MAX_REQUESTS": "900",
        "DRIFT_ALPHA": "0.002",
    }.items():
        monkeypatch.setenv(f"SLUICE_CANARY_{name}", value)
    policy = CanaryPolicy.from_settings(Settings())
    assert policy == CanaryPolicy(
        alpha=0.1,
        error_margin=0.05,
        latency_margin=0.5,
        latency_share_margin=0.04,
        feedback_margin=0.3,
        min_requests=300,
        min_rollback_requests=7,
        min_feedback=5,
        max_requests=900,
        drift_alpha=0.002,
    )
