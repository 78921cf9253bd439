"""Canary analysis that decides: candidate vs base on live ``MetricsWindow`` records.

Pure: windows in, a :class:`CanaryDecision` with its evidence out; no clock, no I/O. The
CLI (``sluice model canary 20 --auto``) reads the windows from ``llm.metrics`` and
publishes what this decides.

What is compared (each as candidate minus base, from the windows of both versions since
the canary started):

* **bad answers**: ERROR and EXPIRED results plus OK answers that are empty (the windows'
  ``empty_rate``), as a share of all results;
* **latency**: the share of requests slower than ``T = base p99 x (1 + latency_margin)``,
  counted in the merged latency sketches (stage ``total``) of each side;
* **feedback**: the mean score (-1..+1), when both sides have ``min_feedback`` events.

Each difference gets an **always-valid confidence sequence** (the normal-mixture boundary
of the mixture sequential probability ratio test, Robbins 1970; Johari, Pekelis & Walsh,
"Always valid inference", 2017) at level ``alpha / 3``: the chance that any of the three
ever leaves its sequence, however often the controller looks, is at most ``alpha`` (the
variance is the plug-in estimate, so the guarantee is asymptotic). Then:

* **ROLLBACK at once** when one difference is surely bad: the bad-answer share's lower
  bound is above 0, the slow share's lower bound is above 0.01 (the candidate's p99 is past
  ``T``), or the feedback difference's upper bound is below 0; needs at least
  ``min_rollback_requests`` candidate results;
* **PROMOTE** when the candidate has at least ``min_requests`` results and every tested
  difference is surely within its margin: bad answers' upper bound below
  ``error_margin``, slow share's upper bound below ``latency_share_margin``, feedback's lower
  bound above ``-feedback_margin``, and the candidate's prompts have not drifted while the
  base's have not (``prompt_drift_p_value`` below ``drift_alpha`` on the candidate only:
  the split is by request hash, so the two must see the same prompts);
* **ROLLBACK as inconclusive** after ``max_requests`` candidate results without a proof;
* **CONTINUE** otherwise (more traffic needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from streams.metrics_windows.sketch import QuantileSketch

Verdict = Literal["PROMOTE", "ROLLBACK", "CONTINUE"]
BAD_STATUSES = ("ERROR", "EXPIRED")


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    """Margins and the false-decision rate. Rates are shares (0.02 = 2 points)."""

    alpha: float = 0.05
    error_margin: float = 0.02
    latency_margin: float = 0.25
    latency_share_margin: float = 0.02
    feedback_margin: float = 0.2
    min_requests: int = 200
    min_rollback_requests: int = 20
    min_feedback: int = 30
    max_requests: int = 20_000
    drift_alpha: float = 0.01
    mixture_variance: float = 1e-3

    @classmethod
    def from_settings(cls, settings: Any) -> CanaryPolicy:
        """The policy the ``SLUICE_CANARY_*`` settings describe."""
        return cls(
            alpha=settings.canary_alpha,
            error_margin=settings.canary_error_margin,
            latency_margin=settings.canary_latency_margin,
            latency_share_margin=settings.canary_latency_share_margin,
            feedback_margin=settings.canary_feedback_margin,
            min_requests=settings.canary_min_requests,
            min_rollback_requests=settings.canary_min_rollback_requests,
            min_feedback=settings.canary_min_feedback,
            max_requests=settings.canary_max_requests,
            drift_alpha=settings.canary_drift_alpha,
        )

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1 or not 0 < self.drift_alpha < 1:
            raise ValueError("alpha and drift_alpha must be in (0, 1)")
        if min(self.error_margin, self.latency_margin, self.feedback_margin) < 0:
            raise ValueError("margins must not be negative")
        if not 1 <= self.min_rollback_requests <= self.min_requests <= self.max_requests:
            raise ValueError("need 1 <= min_rollback_requests <= min_requests <= max_requests")
        if self.mixture_variance <= 0:
            raise ValueError("mixture_variance must be positive")


@dataclass(slots=True)
class ArmStats:
    """One version's totals over its windows."""

    version: str
    windows: int = 0
    requests: int = 0
    bad: int = 0
    empty: int = 0
    latency: QuantileSketch = field(default_factory=QuantileSketch)
    feedback_count: int = 0
    feedback_score_sum: int = 0
    min_drift_p_value: float | None = None

    @property
    def bad_rate(self) -> float:
        return self.bad / self.requests if self.requests else 0.0

    @property
    def feedback_mean(self) -> float | None:
        return self.feedback_score_sum / self.feedback_count if self.feedback_count else None

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "windows": self.windows,
            "requests": self.requests,
            "bad": self.bad,
            "empty": self.empty,
            "bad_rate": round(self.bad_rate, 6),
            "p99_ms": self.latency.quantile(0.99),
            "feedback_count": self.feedback_count,
            "feedback_mean": self.feedback_mean,
            "min_prompt_drift_p_value": self.min_drift_p_value,
        }


def arm_stats(version: str, windows: Iterable[Mapping[str, Any]]) -> ArmStats:
    """Totals of ``version`` over ``MetricsWindow`` records: base windows only (the
    shortest ``length_s`` present, no rollups), corrections added, each ``window_id``
    once (a window published twice counts once)."""
    chosen = [w for w in windows if (w.get("model_version") or "") == version]
    stats = ArmStats(version)
    if not chosen:
        return stats
    length = min(int(w.get("length_s") or 0) for w in chosen)
    seen: set[str] = set()
    for window in chosen:
        if int(window.get("length_s") or 0) != length or window["window_id"] in seen:
            continue
        seen.add(window["window_id"])
        stats.windows += 1
        requests = window.get("requests") or {}
        total = sum(int(n) for n in requests.values())
        ok = int(requests.get("OK", 0))
        empty = round((window.get("empty_rate") or 0.0) * ok)
        stats.requests += total
        stats.empty += empty
        stats.bad += sum(int(requests.get(s, 0)) for s in BAD_STATUSES) + empty
        sketch = ((window.get("latency") or {}).get("total") or {}).get("sketch")
        if sketch and sketch.get("count"):
            stats.latency.merge(QuantileSketch.from_dict(sketch))
        stats.feedback_count += int(window.get("feedback_count") or 0)
        stats.feedback_score_sum += int(window.get("feedback_score_sum") or 0)
        p_value = window.get("prompt_drift_p_value")
        if p_value is not None:
            current = stats.min_drift_p_value
            stats.min_drift_p_value = p_value if current is None else min(current, p_value)
    return stats


def count_above(sketch: QuantileSketch, threshold: float) -> int:
    """Values in ``sketch`` above ``threshold`` (buckets whose lower edge is at or above
    it, so never more than the true count)."""
    if sketch.count == 0 or sketch.max <= threshold:
        return 0
    gamma = (1 + sketch.relative_accuracy) / (1 - sketch.relative_accuracy)
    return sum(n for key, n in sketch.buckets.items() if gamma ** (key - 1) >= threshold)


@dataclass(frozen=True, slots=True)
class Interval:
    """An always-valid confidence interval for a difference (candidate - base)."""

    estimate: float
    lower: float
    upper: float


def mixture_radius(variance: float, mixture_variance: float, alpha: float) -> float:
    """Half-width of the normal-mixture confidence sequence for an estimate of this
    variance: ``sqrt(2 V (V + t) / t * log(sqrt((V + t) / V) / alpha))``."""
    v = max(variance, 1e-12)
    t = mixture_variance
    return math.sqrt(2 * v * (v + t) / t * math.log(math.sqrt((v + t) / v) / alpha))


def _rate_variance(count: int, n: int) -> float:
    p = (count + 0.5) / (n + 1)  # smoothed: a side with no event still has a variance
    return p * (1 - p) / max(n, 1)


def difference_of_rates(
    x_c: int, n_c: int, x_b: int, n_b: int, policy: CanaryPolicy, alpha: float
) -> Interval:
    estimate = (x_c / n_c if n_c else 0.0) - (x_b / n_b if n_b else 0.0)
    radius = mixture_radius(
        _rate_variance(x_c, n_c) + _rate_variance(x_b, n_b), policy.mixture_variance, alpha
    )
    return Interval(estimate, estimate - radius, estimate + radius)


def difference_of_scores(c: ArmStats, b: ArmStats, policy: CanaryPolicy, alpha: float) -> Interval:
    """Mean feedback score difference; scores in {-1, 0, 1} have variance <= 1 - mean²."""
    mc, mb = c.feedback_mean or 0.0, b.feedback_mean or 0.0
    variance = max(1 - mc * mc, 0.05) / c.feedback_count + max(1 - mb * mb, 0.05) / b.feedback_count
    radius = mixture_radius(variance, policy.mixture_variance * 10, alpha)
    return Interval(mc - mb, mc - mb - radius, mc - mb + radius)


@dataclass(frozen=True)
class CanaryDecision:
    """What to do, why, and the numbers it rests on."""

    verdict: Verdict
    reason: str
    candidate: dict[str, Any]
    base: dict[str, Any]
    checks: dict[str, dict[str, Any]]

    @property
    def command(self) -> str | None:
        """The ControlCommand verb to publish, or None to keep waiting."""
        return None if self.verdict == "CONTINUE" else self.verdict

    def evidence(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    candidate: ArmStats, base: ArmStats, policy: CanaryPolicy | None = None
) -> CanaryDecision:
    """The decision for the traffic so far; see the module docstring for the rules."""
    policy = policy or CanaryPolicy()
    alpha_each = policy.alpha / 3
    checks: dict[str, dict[str, Any]] = {}
    regressions: list[str] = []
    unproven: list[str] = []

    bad = difference_of_rates(
        candidate.bad, candidate.requests, base.bad, base.requests, policy, alpha_each
    )
    checks["bad_answers"] = {**asdict(bad), "margin": policy.error_margin}
    if bad.lower > 0:
        regressions.append(f"bad answers +{bad.estimate:.1%} (lower bound {bad.lower:.1%})")
    elif bad.upper >= policy.error_margin:
        unproven.append("bad answers")

    base_p99 = base.latency.quantile(0.99)
    if base_p99 is not None and candidate.latency.count and base.latency.count:
        threshold = base_p99 * (1 + policy.latency_margin)
        slow = difference_of_rates(
            count_above(candidate.latency, threshold),
            candidate.latency.count,
            count_above(base.latency, threshold),
            base.latency.count,
            policy,
            alpha_each,
        )
        checks["latency"] = {
            **asdict(slow),
            "threshold_ms": threshold,
            "candidate_p99_ms": candidate.latency.quantile(0.99),
            "base_p99_ms": base_p99,
            "margin": policy.latency_share_margin,
        }
        if slow.lower > 0.01:
            regressions.append(
                f"latency: {slow.estimate:.1%} more requests over {threshold:.0f} ms"
            )
        elif slow.upper >= policy.latency_share_margin:
            unproven.append("latency")
    else:
        checks["latency"] = {"tested": False}
        unproven.append("latency")

    if min(candidate.feedback_count, base.feedback_count) >= policy.min_feedback:
        score = difference_of_scores(candidate, base, policy, alpha_each)
        checks["feedback"] = {**asdict(score), "margin": policy.feedback_margin}
        if score.upper < 0:
            regressions.append(f"feedback {score.estimate:+.2f} (upper bound {score.upper:+.2f})")
        elif score.lower <= -policy.feedback_margin:
            unproven.append("feedback")
    else:
        checks["feedback"] = {"tested": False, "min_feedback": policy.min_feedback}

    drifted = (
        candidate.min_drift_p_value is not None
        and candidate.min_drift_p_value < policy.drift_alpha
        and not (base.min_drift_p_value is not None and base.min_drift_p_value < policy.drift_alpha)
    )
    checks["drift"] = {
        "candidate_min_p_value": candidate.min_drift_p_value,
        "base_min_p_value": base.min_drift_p_value,
        "candidate_only": drifted,
    }
    if drifted:
        unproven.append("prompt drift on the candidate only")

    def verdict(kind: Verdict, reason: str) -> CanaryDecision:
        return CanaryDecision(kind, reason, candidate.summary(), base.summary(), checks)

    n = candidate.requests
    if regressions and n >= policy.min_rollback_requests:
        return verdict("ROLLBACK", "regression: " + "; ".join(regressions))
    if not regressions and not unproven and n >= policy.min_requests:
        return verdict("PROMOTE", f"not worse by the margins after {n} candidate results")
    if n >= policy.max_requests:
        return verdict("ROLLBACK", f"inconclusive after {n} candidate results: {unproven}")
    waiting = regressions or unproven or [f"{n}/{policy.min_requests} candidate results"]
    return verdict("CONTINUE", "needs more traffic: " + "; ".join(waiting))


def evidence_json(decision: CanaryDecision, policy: CanaryPolicy) -> str:
    """What ``decision`` rests on as compact JSON, for the ``evidence`` field of the
    ControlCommand it publishes: the verdict and reason, per arm (``candidate``, ``base``)
    the traffic (results, windows), bad-answer rate, p99, feedback mean and a ``drifted``
    flag (prompt drift p-value below ``drift_alpha``), each check's estimate and
    always-valid bounds with its margin, and the policy."""

    def arm(summary: dict[str, Any]) -> dict[str, Any]:
        p_value = summary.get("min_prompt_drift_p_value")
        return {**summary, "drifted": p_value is not None and p_value < policy.drift_alpha}

    body = {
        "verdict": decision.verdict,
        "reason": decision.reason,
        "candidate": arm(decision.candidate),
        "base": arm(decision.base),
        "checks": decision.checks,
        "policy": asdict(policy),
    }
    return json.dumps(_finite(body), separators=(",", ":"), default=str, allow_nan=False)


def _finite(node: Any) -> Any:
    """``node`` with NaN and infinities as ``None`` (JSON has neither)."""
    if isinstance(node, float):
        return node if math.isfinite(node) else None
    if isinstance(node, dict):
        return {str(k): _finite(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_finite(v) for v in node]
    return node


def window_start_ms(window: Mapping[str, Any]) -> int:
    """A window's start in epoch ms (Avro readers may give a datetime)."""
    start = window["window_start"]
    return start if isinstance(start, int) else int(start.timestamp() * 1000)


def base_version(windows: Iterable[Mapping[str, Any]], candidate: str) -> str:
    """The version served beside the candidate: the other one with the most requests."""
    totals: dict[str, int] = {}
    for w in windows:
        version = w.get("model_version") or ""
        if w.get("model") and version != candidate:
            totals[version] = totals.get(version, 0) + int(w.get("requests_total") or 0)
    return max(totals, key=lambda v: totals[v]) if totals else ""
