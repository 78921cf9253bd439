"""Figures from samples: percentiles, summaries, ratios, agreement, targets (pure)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

STAGES = ("queue", "batch_wait", "inference", "added", "total", "e2e")
TARGET_PIPELINE_RATIO = 0.95
TARGET_CEILING_RPS = 10_000.0
TARGET_HALF_RATE_ADDED_P99_MS = 15.0
# The default CPU engine against llama.cpp one request at a time (same run, same prompts).
TARGET_ANCHOR_BATCH1 = 1.0
TARGET_ANCHOR_CONCURRENT = 3.0
# Median publish -> result at half the pipeline's saturation rate, over a lone request's.
TARGET_HALF_LOAD_P50_RATIO = 1.5
HALF_LOAD = 0.5
ANCHOR_ENGINE = "llama.cpp"
REFERENCE_ENGINE = "torch fp32"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/mean/max (ms) of one stage; None fields when there are no values."""
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values) if values else None,
        "max": max(values) if values else None,
    }


@dataclass
class Sample:
    """One finished request as the bench saw it (latencies in ms)."""

    index: int
    status: str
    prompt_tokens: int
    completion_tokens: int
    batch_size: int
    stages: dict[str, float]
    text: str = ""


def summarize(
    samples: Sequence[Sample], wall_s: float, *, label: str, engine: str
) -> dict[str, Any]:
    """Throughput and per-stage latency percentiles of one run."""
    ok = [s for s in samples if s.status == "OK"]
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    out_tokens = sum(s.completion_tokens for s in ok)
    stages = [name for name in STAGES if any(name in s.stages for s in samples)]
    return {
        "label": label,
        "engine": engine,
        "requests": len(samples),
        "ok": len(ok),
        "statuses": statuses,
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "prompt_tokens": sum(s.prompt_tokens for s in ok),
        "mean_batch_size": statistics.fmean(s.batch_size for s in ok) if ok else 0.0,
        "batch_size_histogram": batch_histogram(ok),
        "latency_ms": {
            name: latency_summary([s.stages[name] for s in ok if name in s.stages])
            for name in stages
        },
    }


def batch_histogram(samples: Sequence[Sample]) -> dict[str, int]:
    """Requests per batch size ("16": 32 means 32 requests ran in batches of 16)."""
    counts: dict[int, int] = {}
    for s in samples:
        counts[s.batch_size] = counts.get(s.batch_size, 0) + 1
    return {str(size): counts[size] for size in sorted(counts)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def compare_outputs(
    reference: Sequence[str], other: Sequence[str], tokenize: Callable[[str], list[Any]]
) -> dict[str, Any]:
    """Agreement of two runs over the same prompts: the fraction of identical outputs, the
    mean position-wise token overlap (matching positions / longer length) and the mean
    common-prefix fraction."""
    if len(reference) != len(other):
        raise ValueError("both runs must cover the same prompts")
    if not reference:
        return {"pairs": 0, "identical": None, "token_overlap": None, "prefix_overlap": None}
    identical = overlap = prefix = 0.0
    for a_text, b_text in zip(reference, other, strict=True):
        a, b = tokenize(a_text), tokenize(b_text)
        longest = max(len(a), len(b))
        identical += a == b
        if longest == 0:
            overlap += 1.0
            prefix += 1.0
            continue
        overlap += sum(x == y for x, y in zip(a, b, strict=False)) / longest
        common = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            common += 1
        prefix += common / longest
    n = len(reference)
    return {
        "pairs": n,
        "identical": identical / n,
        "token_overlap": overlap / n,
        "prefix_overlap": prefix / n,
    }


def cpu_usage(
    before: dict[str, float | None], after: dict[str, float | None], wall_s: float, requests: int
) -> dict[str, Any]:
    """CPU seconds per process group between two probes, as cores busy and us/request."""
    out: dict[str, Any] = {}
    for name, start in before.items():
        end = after.get(name)
        if start is None or end is None:
            continue
        used = end - start
        out[name] = {
            "cpu_s": used,
            "cores": used / wall_s if wall_s > 0 else None,
            "us_per_request": used / requests * 1e6 if requests else None,
        }
    return out


def targets(modes: dict[str, Any]) -> dict[str, Any]:
    """The figures the bench is judged by, with their targets and whether they were met."""
    out: dict[str, Any] = {}
    direct, pipeline = modes.get("direct"), modes.get("pipeline")
    if direct and pipeline:
        req = ratio(pipeline["requests_per_s"], direct["requests_per_s"])
        tok = ratio(pipeline["output_tokens_per_s"], direct["output_tokens_per_s"])
        out["pipeline_vs_direct"] = {
            "requests_ratio": req,
            "tokens_ratio": tok,
            "target": TARGET_PIPELINE_RATIO,
            "met": req is not None and tok is not None and min(req, tok) >= TARGET_PIPELINE_RATIO,
        }
    ceiling = modes.get("ceiling")
    if ceiling:
        rps = ceiling["saturation"]["requests_per_s"]
        out["ceiling_requests_per_s"] = {
            "value": rps,
            "target": TARGET_CEILING_RPS,
            "met": rps >= TARGET_CEILING_RPS,
        }
        half = ceiling.get("half_rate")
        if half:
            p99 = half["latency_ms"].get("added", {}).get("p99")
            out["half_rate_added_p99_ms"] = {
                "value": p99,
                "rate": half.get("target_rate"),
                "target": TARGET_HALF_RATE_ADDED_P99_MS,
                "met": p99 is not None and p99 <= TARGET_HALF_RATE_ADDED_P99_MS,
            }
    return out


def anchor_figures(
    runs: dict[str, dict[str, dict[str, Any]]],
    agreement: dict[str, dict[str, Any]],
    *,
    anchor: str = ANCHOR_ENGINE,
) -> list[dict[str, Any]]:
    """One row per engine: output tokens/s one at a time and concurrent, as ratios of the
    anchor's one-at-a-time figure and of its figure at the same concurrency, next to the
    engine's greedy agreement with the fp32 reference. ``runs[label]`` holds the summaries
    ``"one"`` and ``"concurrent"``."""
    base = runs.get(anchor)
    one_ref = base["one"]["output_tokens_per_s"] if base else None
    conc_ref = base["concurrent"]["output_tokens_per_s"] if base else None
    rows = []
    for label, pair in runs.items():
        one = pair["one"]["output_tokens_per_s"]
        conc = pair["concurrent"]["output_tokens_per_s"]
        rows.append(
            {
                "engine": label,
                "engine_detail": pair["one"].get("engine"),
                "one_tokens_per_s": one,
                "concurrent_tokens_per_s": conc,
                "concurrency": pair["concurrent"].get("concurrency"),
                "one_vs_anchor_one": ratio(one, one_ref),
                "concurrent_vs_anchor_one": ratio(conc, one_ref),
                "concurrent_vs_anchor_concurrent": ratio(conc, conc_ref),
                "agreement_with_fp32": agreement.get(label),
            }
        )
    return rows


def anchor_targets(anchor: dict[str, Any]) -> dict[str, Any]:
    """The issue's CPU targets: the configured engine against llama.cpp one at a time."""
    rows = {r["engine"]: r for r in anchor.get("engines", [])}
    if ANCHOR_ENGINE not in rows or anchor.get("configured") not in rows:
        return {}
    row = rows[anchor["configured"]]
    one, conc = row["one_vs_anchor_one"], row["concurrent_vs_anchor_one"]
    return {
        "anchor_batch1": {
            "engine": row["engine"],
            "value": one,
            "target": TARGET_ANCHOR_BATCH1,
            "met": one is not None and one >= TARGET_ANCHOR_BATCH1,
        },
        "anchor_concurrent": {
            "engine": row["engine"],
            "value": conc,
            "concurrency": row["concurrency"],
            "target": TARGET_ANCHOR_CONCURRENT,
            "met": conc is not None and conc >= TARGET_ANCHOR_CONCURRENT,
        },
    }


def load_figures(
    saturation_rps: float,
    lone: dict[str, Any],
    levels: Sequence[tuple[float, dict[str, Any]]],
    *,
    stage: str = "e2e",
) -> dict[str, Any]:
    """Latency at partial load: per level (fraction of saturation, the pipeline summary
    of its run) the target and achieved rate and ``stage``'s p50/p95/p99, next to the
    lone requests' and as ratios of the lone p50 (the cost of waiting for others)."""
    lone_lat = lone["latency_ms"].get(stage, {})
    lone_p50 = lone_lat.get("p50")
    rows = []
    for fraction, summary in levels:
        lat = summary["latency_ms"].get(stage, {})
        rows.append(
            {
                "fraction": fraction,
                "target_rate": summary.get("target_rate"),
                "requests": summary["requests"],
                "ok": summary["ok"],
                "achieved_requests_per_s": summary["requests_per_s"],
                "p50": lat.get("p50"),
                "p95": lat.get("p95"),
                "p99": lat.get("p99"),
                "p50_vs_lone": ratio(lat.get("p50"), lone_p50),
                "p99_vs_lone": ratio(lat.get("p99"), lone_p50),
                "mean_batch_size": summary["mean_batch_size"],
            }
        )
    return {
        "stage": stage,
        "saturation_requests_per_s": saturation_rps,
        "lone": {
            "requests": lone["requests"],
            "ok": lone["ok"],
            "p50": lone_p50,
            "p95": lone_lat.get("p95"),
            "p99": lone_lat.get("p99"),
        },
        "levels": rows,
    }


def load_targets(load: dict[str, Any]) -> dict[str, Any]:
    """The partial-load target: median at half of saturation within 1.5x a lone one's."""
    for row in load.get("levels", []):
        if math.isclose(row["fraction"], HALF_LOAD):
            value = row["p50_vs_lone"]
            return {
                "half_load_p50_vs_lone": {
                    "value": value,
                    "rate": row["target_rate"],
                    "target": TARGET_HALF_LOAD_P50_RATIO,
                    "met": value is not None and value <= TARGET_HALF_LOAD_P50_RATIO,
                }
            }
    return {}
