"""``sluice bench``: how fast is the model, how much does the pipeline cost, where is the ceiling.

One run measures up to three things on the same prompt set (a fixed, seeded mix of prompt
lengths) and writes every figure to ``<out_dir>/bench-<timestamp>.json`` plus PNG plots:

``direct``
    The prompts straight into the engine (no Kafka) through a :class:`MicroBatcher` with
    the worker's batching settings, at the chosen concurrency / arrival rate; then a sweep
    of exact batch sizes through ``engine.generate`` (throughput vs batch size); with
    ``quantize_compare`` the same direct run on ``TorchEngine(quantize="int8")``, reported
    as speed-up and agreement with fp32 (identical greedy outputs, token overlap).
``anchor`` (with direct, ``anchor=True``)
    The same prompts through llama.cpp (``SLUICE_BACKEND=llama_cpp``, when
    ``llama-cpp-python`` is installed), the fp32 torch engine and the configured engine,
    one request at a time and with ``anchor_concurrency`` requests outstanding, in the same
    run: output tokens/s of each engine as a ratio of llama.cpp's (one at a time and at the
    same concurrency), and each engine's greedy agreement with the fp32 torch outputs.
``pipeline``
    The same prompts through the whole pipeline: fresh topics and consumer group, real
    ``sluice worker`` processes, :class:`SluiceClient` publishing and reading results.
    Per-stage latencies come from each result's timings; the client adds end to end
    (publish -> result seen). ``pipeline / direct`` is the pipeline's efficiency.
``ceiling``
    The pipeline with ``SLUICE_BACKEND=benchmark`` (the *benchmark engine*: zero-cost fixed
    completion, not a model) and ``pipeline_requests`` requests published as fast as
    possible, to find the pipeline's own ceiling in requests/s for one worker; then a
    rate-limited pass at half that rate, where ``added latency = total - inference`` is the
    pipeline's own latency (target p99 <= 15 ms).

Nothing is hard-coded: every number printed or written was measured in this run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from schemas.errors import SluiceError
from streams.settings import Settings

MODES = ("direct", "pipeline", "ceiling")
STAGES = ("queue", "batch_wait", "inference", "added", "total", "e2e")
STAGE_HELP = {
    "queue": "created_at -> read by the worker",
    "batch_wait": "queued in the batcher until its batch started",
    "inference": "the batch in the engine",
    "added": "total - inference (what the pipeline adds)",
    "total": "created_at -> result built (worker clock)",
    "e2e": "client: publish -> result seen",
}
TARGET_PIPELINE_RATIO = 0.95
TARGET_CEILING_RPS = 10_000.0
TARGET_HALF_RATE_ADDED_P99_MS = 15.0
# The default CPU engine against llama.cpp one request at a time (same run, same prompts).
TARGET_ANCHOR_BATCH1 = 1.0
TARGET_ANCHOR_CONCURRENT = 3.0
ANCHOR_ENGINE = "llama.cpp"
REFERENCE_ENGINE = "torch fp32"
BENCHMARK_ENGINE = "benchmark engine (zero-cost fixed completion, not a model)"
REPORT_SCHEMA = "sluice-bench/1"

_WORDS = (
    "river stone light window garden market signal paper winter engine silver forest "
    "harbor letter morning shadow copper valley station bridge candle orbit meadow "
    "lantern thunder ocean pencil marble rocket violet canyon island blanket crystal "
    "falcon ladder mirror planet saddle timber velvet wagon anchor basket cactus dragon "
    "feather glacier hammer jungle kettle lemon magnet needle olive pepper quartz ribbon "
    "spiral tunnel umbrella vessel whistle yellow zebra almond breeze cotton desert "
    "ember fabric granite horizon ivory jacket kernel lagoon meteor nectar oyster prism"
).split()


class BenchError(SluiceError):
    """The bench could not run to the end (bad options, a worker died, results missing)."""

    reason_code = "bench"


# ------------------------------------------------------------------------------ options


@dataclass
class BenchOptions:
    """What ``sluice bench`` runs. Lists are comma-separated strings (typer-friendly)."""

    requests: int = 64
    """Requests for the model modes (direct, pipeline, int8 compare)."""
    pipeline_requests: int = 20_000
    """Requests for the ceiling (benchmark engine) saturation pass."""
    concurrency: int | None = None
    """Most requests outstanding at once (closed loop); None: no client-side limit (the
    worker's own ``max_inflight`` still applies)."""
    rate: float | None = None
    """Open-loop arrival rate in requests/s for direct and pipeline; None: as fast as
    possible. With the ceiling mode, also one extra benchmark-engine pass at this rate."""
    prompt_words: str = "8,32,128"
    """Prompt lengths in words, cycled over the prompt set."""
    max_new_tokens: int = 16
    partitions: int = 4
    workers: int = 1
    """Worker processes for the pipeline mode (the ceiling always uses one)."""
    batch_sizes: str = "1,4,8,16"
    """Exact batch sizes of the direct sweep."""
    sweep_requests: int | None = None
    """Requests per sweep point; None: max(2 x size, 6), rounded up to whole batches."""
    modes: str = "direct,pipeline,ceiling"
    quantize_compare: bool = True
    anchor: bool = True
    """With direct: the anchor run (llama.cpp, fp32 torch and the configured engine)."""
    anchor_requests: int = 16
    """Prompts of the anchor run (the first of the prompt set)."""
    anchor_concurrency: int = 16
    """Requests outstanding in the anchor's concurrent pass (the other pass runs one)."""
    out_dir: Path = Path("bench-results")
    seed: int = 7
    stall_timeout_s: float = 180.0
    """Give up when no result arrived for this long."""
    keep_topics: bool = False
    """Keep the per-run topics (deleted after the run by default)."""
    plots: bool = True

    # -- parsed views --------------------------------------------------------------
    def mode_list(self) -> list[str]:
        modes = _csv(self.modes, str)
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise BenchError(f"modes must be a subset of {','.join(MODES)}, got {self.modes!r}")
        return [m for m in MODES if m in modes]

    def prompt_word_list(self) -> list[int]:
        return _positive_ints(self.prompt_words, "prompt_words")

    def batch_size_list(self) -> list[int]:
        return sorted(set(_positive_ints(self.batch_sizes, "batch_sizes")))

    def validate(self, settings: Settings) -> None:
        self.mode_list()
        self.prompt_word_list()
        self.batch_size_list()
        for name in (
            "requests",
            "pipeline_requests",
            "partitions",
            "workers",
            "max_new_tokens",
            "anchor_requests",
            "anchor_concurrency",
        ):
            if getattr(self, name) < 1:
                raise BenchError(f"{name} must be >= 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise BenchError("concurrency must be >= 1 (or unset)")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise BenchError("rate must be > 0 requests/s (or unset)")
        if self.max_new_tokens > settings.max_new_tokens_limit:
            raise BenchError(
                f"max_new_tokens={self.max_new_tokens} is above the worker's limit "
                f"{settings.max_new_tokens_limit}; its requests would be dead-lettered"
            )
        longest = max(self.prompt_word_list())
        if longest * 8 > settings.max_prompt_chars:
            raise BenchError(f"prompts of {longest} words may exceed max_prompt_chars")


def _csv(text: str, kind: Callable[[str], Any]) -> list[Any]:
    return [kind(part.strip()) for part in str(text).split(",") if part.strip()]


def _positive_ints(text: str, name: str) -> list[int]:
    try:
        values = _csv(text, int)
    except ValueError as exc:
        raise BenchError(f"{name} must be comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise BenchError(f"{name} must list integers >= 1, got {text!r}")
    return values


# ------------------------------------------------------------------------ pure helpers


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


def schedule_offsets(n: int, rate: float | None) -> list[float]:
    """Intended send time of each request, in seconds after the start (open loop)."""
    if rate is None:
        return [0.0] * n
    return [i / rate for i in range(n)]


async def paced(
    n: int,
    rate: float | None,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    yield_every: int = 64,
) -> AsyncIterator[int]:
    """Yield 0..n-1, each no earlier than its scheduled time (``i / rate`` after the
    start; all at once without a rate). Requests that are overdue go out at once (open
    loop: a slow consumer does not slow the arrivals down), and every ``yield_every``
    requests the loop gets a turn so readers are not starved."""
    start = clock()
    for i in range(n):
        if rate is not None:
            delay = start + i / rate - clock()
            if delay > 0:
                await sleep(delay)
            elif i % yield_every == yield_every - 1:
                await sleep(0)
        elif i % yield_every == yield_every - 1:
            await sleep(0)
        yield i


def make_prompts(n: int, words: Sequence[int], seed: int = 7) -> list[str]:
    """``n`` deterministic prompts; lengths cycle through ``words`` (in words)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        length = words[i % len(words)]
        body = " ".join(rng.choice(_WORDS) for _ in range(max(length - 4, 1)))
        prompts.append(f"Summarize in one sentence: {body}" if length > 4 else body)
    return prompts


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


def sweep_plan(sizes: Sequence[int], requests: int | None) -> list[tuple[int, int]]:
    """(batch size, requests) per sweep point: whole batches only."""
    plan = []
    for size in sizes:
        want = requests if requests else max(2 * size, 6)
        plan.append((size, max(1, math.ceil(want / size)) * size))
    return plan


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a worker process exactly these settings."""
    from connectors.processes import settings_env

    return settings_env(settings)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a live process has used; Linux only."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


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


def run_settings(settings: Settings, bootstrap: str, tag: str, **overrides: Any) -> Settings:
    """Settings on their own topics (every ``*_topic`` setting gets a ``bench-<tag>.``
    prefix) and consumer group, so runs never mix."""
    fields: dict[str, Any] = {
        "home": Path(settings.home).resolve(),
        "kafka_bootstrap": bootstrap,
        "app_id": f"sluice-bench-{tag}",
        "metrics_port": 0,
    }
    for name in type(settings).model_fields:
        if name.endswith("_topic"):
            fields[name] = f"bench-{tag}.{getattr(settings, name)}"
    fields.update(overrides)
    return settings.model_copy(update=fields)


def run_topics(settings: Settings) -> list[str]:
    """Every topic the settings name (the per-run ones, after :func:`run_settings`)."""
    return [getattr(settings, n) for n in type(settings).model_fields if n.endswith("_topic")]


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


def anchor_engine_settings(settings: Settings) -> dict[str, Settings]:
    """The engines of the anchor run, by label: llama.cpp (when installed), the fp32 torch
    reference and the configured engine (when it is neither)."""
    import importlib.util

    engines: dict[str, Settings] = {}
    if importlib.util.find_spec("llama_cpp") is not None:
        engines[ANCHOR_ENGINE] = settings.model_copy(update={"backend": "llama_cpp"})
    engines[REFERENCE_ENGINE] = settings.model_copy(
        update={"backend": "torch", "torch_quantize": "none", "device": "cpu"}
        | ({"torch_dtype": "float32"} if "torch_dtype" in type(settings).model_fields else {})
    )
    label = configured_label(settings)
    if label not in engines:
        engines[label] = settings
    return engines


def configured_label(settings: Settings) -> str:
    """How the anchor names the configured engine."""
    if settings.backend == "llama_cpp":
        return ANCHOR_ENGINE
    if settings.backend != "torch":
        return settings.backend
    dtype = getattr(settings, "torch_dtype", "auto")
    quantize = settings.torch_quantize
    if quantize == "none" and dtype in ("auto", "float32") and settings.device != "cuda":
        if not getattr(settings, "torch_compile", False):
            return REFERENCE_ENGINE
    parts = ["torch", settings.device, dtype]
    if quantize != "none":
        parts.append(quantize)
    if getattr(settings, "torch_compile", False):
        parts.append("compiled")
    return " ".join(parts)


# ------------------------------------------------------------------------- direct mode


@dataclass
class DirectRun:
    summary: dict[str, Any]
    samples: list[Sample]


async def _direct_run(
    engine: Any,
    settings: Settings,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    rate: float | None,
    concurrency: int | None,
    label: str,
    engine_label: str,
    on_done: Callable[[], None],
) -> DirectRun:
    """The prompts into the engine through the worker's batching policy (no Kafka)."""
    from inference.batcher import MicroBatcher
    from inference.inflight import InflightDispatcher
    from inference.types import GenerationRequest, Sampling

    batcher: Any
    if getattr(engine, "inflight_batching", False):
        batcher = InflightDispatcher(
            engine.generate_one,
            max_inflight=max(1, int(engine.max_batch_size * settings.trt_inflight_factor)),
        )
    else:
        batcher = MicroBatcher(
            engine.generate,
            max_batch_size=settings.batch_max_size,
            max_batch_tokens=settings.batch_max_tokens,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
            max_queue=settings.max_inflight,
        )
    await batcher.start()
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    samples: list[Sample | None] = [None] * len(prompts)
    done_at: list[float] = [0.0] * len(prompts)

    async def one(i: int) -> None:
        try:
            submitted = time.perf_counter()
            ids = engine.encode_prompt(prompts[i], system=None, raw=False)
            request = GenerationRequest(
                request_id=f"direct-{i}",
                prompt=prompts[i],
                sampling=Sampling(max_new_tokens=max_new_tokens),
                prompt_ids=ids,
                admitted_at=time.monotonic(),
            )
            outcome = await (await batcher.submit(request))
            done_at[i] = time.perf_counter()
        finally:
            if slots is not None:
                slots.release()
        total = (done_at[i] - submitted) * 1000.0
        inference = outcome.inference_s * 1000.0
        completion = outcome.completion
        samples[i] = Sample(
            index=i,
            status="OK" if completion else ("EXPIRED" if outcome.expired else "ERROR"),
            prompt_tokens=completion.prompt_tokens if completion else len(ids),
            completion_tokens=completion.completion_tokens if completion else 0,
            batch_size=outcome.batch_size,
            stages={
                "batch_wait": outcome.batch_wait_s * 1000.0,
                "inference": inference,
                "added": total - inference,
                "total": total,
            },
            text=completion.text if completion else repr(outcome.error),
        )
        on_done()

    tasks = []
    started = time.perf_counter()
    try:
        async for i in paced(len(prompts), rate):
            if slots is not None:
                await slots.acquire()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(batcher.stop(), 10.0)
    wall = max(done_at) - started
    finished = [s for s in samples if s is not None]
    summary = summarize(finished, wall, label=label, engine=engine_label)
    summary.update(rate=rate, concurrency=concurrency)
    return DirectRun(summary, finished)


async def _sweep(
    engine: Any,
    prompts: Sequence[str],
    plan: Sequence[tuple[int, int]],
    *,
    max_new_tokens: int,
    on_done: Callable[[int], None],
) -> list[dict[str, Any]]:
    """Exact batches of each size straight into ``engine.generate``."""
    from inference.types import GenerationRequest, Sampling

    encoded = [engine.encode_prompt(p, system=None, raw=False) for p in prompts]
    points = []
    for size, count in plan:
        picks = list(itertools.islice(itertools.cycle(range(len(prompts))), count))
        batches = [picks[i : i + size] for i in range(0, count, size)]
        tokens = ok = 0
        batch_ms = []
        started = time.perf_counter()
        for batch in batches:
            requests = [
                GenerationRequest(
                    request_id=f"sweep-{size}-{j}",
                    prompt=prompts[k],
                    sampling=Sampling(max_new_tokens=max_new_tokens),
                    prompt_ids=encoded[k],
                )
                for j, k in enumerate(batch)
            ]
            t = time.perf_counter()
            outcomes = await engine.generate(requests)
            batch_ms.append((time.perf_counter() - t) * 1000.0)
            for outcome in outcomes:
                if not isinstance(outcome, BaseException):
                    ok += 1
                    tokens += outcome.completion_tokens
            on_done(len(batch))
        wall = time.perf_counter() - started
        points.append(
            {
                "batch_size": size,
                "requests": count,
                "ok": ok,
                "wall_s": wall,
                "requests_per_s": ok / wall,
                "output_tokens": tokens,
                "output_tokens_per_s": tokens / wall,
                "batch_ms": latency_summary(batch_ms),
            }
        )
    return points


def _engine_label(engine: Any) -> str:
    name = type(engine).__name__
    device = getattr(engine, "device", None)
    dtype = getattr(engine, "dtype", None)
    return f"{name} {device}/{dtype}" if device else name


async def _direct_phase(
    settings: Settings,
    options: BenchOptions,
    prompts: Sequence[str],
    progress: Progress,
    console: Console,
) -> dict[str, Any]:
    from streams.engines import build_engine

    result: dict[str, Any] = {}
    _quiet_model_loading()
    engine = build_engine(settings)
    loading = progress.add_task("direct: loading the model", total=None)
    t = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - t
    progress.update(loading, total=1, completed=1)
    try:
        label = _engine_label(engine)
        task = progress.add_task(f"direct: {label}", total=len(prompts))
        run = await _direct_run(
            engine,
            settings,
            prompts,
            max_new_tokens=options.max_new_tokens,
            rate=options.rate,
            concurrency=options.concurrency,
            label="direct",
            engine_label=label,
            on_done=lambda: progress.advance(task),
        )
        run.summary["engine_load_s"] = load_s
        result["run"] = run
        result["engine"] = {
            "name": type(engine).__name__,
            "device": getattr(engine, "device", None),
            "dtype": getattr(engine, "dtype", None),
            "model_version": engine.model_version,
            "quantize": getattr(engine, "quantize", None),
        }
        plan = sweep_plan(options.batch_size_list(), options.sweep_requests)
        sweep_task = progress.add_task(
            "direct: batch-size sweep " + options.batch_sizes, total=sum(n for _, n in plan)
        )
        result["sweep"] = await _sweep(
            engine,
            prompts,
            plan,
            max_new_tokens=options.max_new_tokens,
            on_done=lambda k: progress.advance(sweep_task, k),
        )
    finally:
        await engine.stop()
    if options.quantize_compare:
        result["quantize"] = await _quantize_phase(
            settings, options, prompts, progress, console, result
        )
    return result


async def _quantize_phase(
    settings: Settings,
    options: BenchOptions,
    prompts: Sequence[str],
    progress: Progress,
    console: Console,
    direct: dict[str, Any],
) -> dict[str, Any]:
    """The direct run again on int8 (and on fp32 when the configured engine is int8)."""
    from streams.engines import build_engine

    if settings.backend != "torch":
        return {"skipped": f"int8 compare needs the torch backend, not {settings.backend}"}
    if direct["engine"]["device"] != "cpu":
        return {"skipped": "int8 dynamic quantization runs on CPU only"}
    runs: dict[str, DirectRun] = {}
    configured = settings.torch_quantize
    runs[configured] = direct["run"]
    other = "int8" if configured == "none" else "none"
    engine = build_engine(settings.model_copy(update={"torch_quantize": other}))
    loading = progress.add_task(f"direct: loading the model ({other})", total=None)
    t = time.perf_counter()
    with warnings.catch_warnings():  # torch deprecates the quantized tensor constructors
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        await engine.start()
    load_s = time.perf_counter() - t
    progress.update(loading, total=1, completed=1)
    try:
        label = _engine_label(engine)
        task = progress.add_task(f"direct: {label}", total=len(prompts))
        runs[other] = await _direct_run(
            engine,
            settings,
            prompts,
            max_new_tokens=options.max_new_tokens,
            rate=options.rate,
            concurrency=options.concurrency,
            label=f"direct-{other}",
            engine_label=label,
            on_done=lambda: progress.advance(task),
        )
        runs[other].summary["engine_load_s"] = load_s
        tokenize = _tokenizer(engine)
    finally:
        await engine.stop()
    fp32, int8 = runs["none"], runs["int8"]
    agreement = compare_outputs(_texts(fp32.samples), _texts(int8.samples), tokenize)
    return {
        "outputs": {
            "fp32": _texts(fp32.samples),
            "int8": _texts(int8.samples),
        },
        "fp32": fp32.summary,
        "int8": int8.summary,
        "speedup_requests": ratio(int8.summary["requests_per_s"], fp32.summary["requests_per_s"]),
        "speedup_tokens": ratio(
            int8.summary["output_tokens_per_s"], fp32.summary["output_tokens_per_s"]
        ),
        "agreement": agreement,
        "extra_run": other,
    }


async def _anchor_phase(
    settings: Settings,
    options: BenchOptions,
    prompts: Sequence[str],
    progress: Progress,
) -> dict[str, Any]:
    """The anchor prompts through every anchor engine, one at a time and concurrent."""
    from streams.engines import build_engine

    engines = anchor_engine_settings(settings)
    prompts = list(prompts[: options.anchor_requests])
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    texts: dict[str, list[str]] = {}
    for label, engine_settings in engines.items():
        engine = build_engine(engine_settings)
        loading = progress.add_task(f"anchor: loading {label}", total=None)
        await engine.start()
        progress.update(loading, total=1, completed=1)
        try:
            pair: dict[str, dict[str, Any]] = {}
            for name, concurrency in (("one", 1), ("concurrent", options.anchor_concurrency)):
                task = progress.add_task(
                    f"anchor: {label}, {concurrency} at a time", total=len(prompts)
                )
                run = await _direct_run(
                    engine,
                    engine_settings,
                    prompts,
                    max_new_tokens=options.max_new_tokens,
                    rate=None,
                    concurrency=concurrency,
                    label=f"anchor-{name}",
                    engine_label=_engine_label(engine),
                    on_done=lambda task=task: progress.advance(task),
                )
                pair[name] = run.summary
                if name == "one":
                    texts[label] = _texts(run.samples)
            runs[label] = pair
        finally:
            await engine.stop()
    reference = texts[REFERENCE_ENGINE]
    agreement = {
        label: compare_outputs(reference, other, str.split) for label, other in texts.items()
    }
    out: dict[str, Any] = {
        "anchor": ANCHOR_ENGINE,
        "reference": REFERENCE_ENGINE,
        "configured": configured_label(settings),
        "prompts": len(prompts),
        "max_new_tokens": options.max_new_tokens,
        "agreement_tokens": "words (str.split)",
        "engines": anchor_figures(runs, agreement),
        "runs": runs,
        "outputs": texts,
    }
    if ANCHOR_ENGINE not in runs:
        out["skipped_anchor"] = (
            'llama-cpp-python is not installed (pip install "sluice[llamacpp]"): no ratios'
        )
    return out


def _texts(samples: Sequence[Sample]) -> list[str]:
    """Outputs in prompt order."""
    return [s.text for s in sorted(samples, key=lambda s: s.index)]


def _quiet_model_loading() -> None:
    """No transformers progress bars in the middle of ours."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _tokenizer(engine: Any) -> Callable[[str], list[Any]]:
    tok = getattr(engine, "_tokenizer", None)
    if tok is None:
        return str.split
    return lambda text: list(tok(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------- pipeline modes


@dataclass
class PipelineRun:
    summary: dict[str, Any]
    samples: list[Sample]


class Broker:
    """The Kafka cluster of the run: the configured one, the running local broker, or a
    local broker started here (and stopped by :meth:`close`)."""

    def __init__(self, settings: Settings, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.started: Any = None
        self.bootstrap = ""
        self.kafka_version = "unknown (external cluster)"
        self.pid: int | None = None

    def open(self, progress: Progress) -> str:
        if self.settings.kafka_bootstrap:
            self.bootstrap = self.settings.kafka_bootstrap
            return self.bootstrap
        from streams.bootstrap import local_kafka

        kafka = local_kafka(self.settings)
        info = kafka.status()
        if info is None:
            task = progress.add_task("kafka: starting the local broker", total=None)
            info = kafka.up(progress=lambda msg: progress.update(task, description=f"kafka: {msg}"))
            progress.update(task, total=1, completed=1, description="kafka: local broker up")
            self.started = kafka
            self.console.print(f"Started Kafka {info.kafka_version} on {info.bootstrap}")
        self.bootstrap = info.bootstrap
        self.kafka_version = f"{info.kafka_version} (local broker)"
        self.pid = info.pid
        return self.bootstrap

    def close(self) -> None:
        if self.started is not None:
            with self.console.status("Stopping the local broker…"):
                self.started.down()
            self.started = None


class Workers:
    """``sluice worker`` processes for one run, stopped with SIGTERM by :meth:`stop`."""

    def __init__(self, settings: Settings, count: int, tag: str) -> None:
        self.settings = settings
        self.count = count
        self.tag = tag
        self.procs: list[Any] = []
        self.log_dir = Path(settings.home) / "logs"
        self.exit_codes: list[int | None] = []
        self.stop_s = 0.0

    def start(self, timeout: float = 300.0) -> None:
        from connectors.processes import WORKER_READY, WorkerProcess

        env = worker_env(self.settings)
        for i in range(self.count):
            log = self.log_dir / f"bench-{self.tag}-worker{i}.log"
            self.procs.append(WorkerProcess(log, env=env).start())
        for proc in self.procs:
            if not proc.wait_for_log(WORKER_READY, timeout=timeout):
                tail = proc.log_tail(40)
                self.stop()
                raise BenchError(f"a bench worker did not become ready:\n{tail}")
        if not asyncio.run(_wait_group(self.settings, self.count, timeout=120.0)):
            self.stop()
            raise BenchError(f"the group {self.settings.app_id} never had {self.count} members")

    def dead(self) -> str | None:
        for proc in self.procs:
            if not proc.alive():
                return f"worker pid {proc.pid} exited:\n{proc.log_tail(40)}"
        return None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    @property
    def logs(self) -> list[str]:
        return [str(p.log_file) for p in self.procs]

    def stop(self) -> None:
        started = time.perf_counter()
        self.exit_codes = [proc.stop(timeout=60.0) for proc in self.procs]
        self.stop_s = time.perf_counter() - started


async def _wait_group(settings: Settings, members: int, timeout: float) -> bool:
    """Wait until the workers' consumer group is Stable with ``members`` members."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_options()
    )
    await admin.start()
    try:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            with contextlib.suppress(Exception):
                for response in await admin.describe_consumer_groups([settings.app_id]):
                    for group in response.groups:
                        # (error_code, group_id, state, protocol_type, protocol, members, ...)
                        if group[1] == settings.app_id and group[2] == "Stable":
                            if len(group[5]) == members:
                                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await admin.close()


async def _create_topics(settings: Settings) -> None:
    from streams.topics import ensure_topics

    assert settings.kafka_bootstrap
    await ensure_topics(settings, settings.kafka_bootstrap)


async def _delete_topics(settings: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_options()
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        ours = set(run_topics(settings))
        # ...and what Faust created for this run's app id (table changelogs).
        names = [t for t in existing if t in ours or t.startswith(f"{settings.app_id}-")]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def _pipeline_run(
    client: Any,
    prompts: Sequence[str],
    *,
    tag: str,
    max_new_tokens: int,
    rate: float | None,
    concurrency: int | None,
    label: str,
    engine_label: str,
    workers: Workers,
    stall_timeout_s: float,
    on_progress: Callable[[int], None],
    broker_pid: int | None = None,
) -> PipelineRun:
    """Publish the prompts, collect every result, measure."""
    n = len(prompts)
    records = [
        client.build_request(p, request_id=f"{tag}-{i:07d}", max_new_tokens=max_new_tokens)
        for i, p in enumerate(prompts)
    ]
    index = {r["request_id"]: i for i, r in enumerate(records)}
    results: list[dict[str, Any] | None] = [None] * n
    publish_at = [0.0] * n
    seen_at = [0.0] * n
    received = 0
    all_in = asyncio.Event()
    slots = asyncio.Semaphore(concurrency) if concurrency else None

    async def read() -> None:
        nonlocal received
        async for result in client.results():
            i = index.get(result["request_id"])
            if i is None or results[i] is not None:
                continue
            seen_at[i] = time.perf_counter()
            results[i] = result
            received += 1
            if slots is not None:
                slots.release()
            if received == n:
                all_in.set()

    deliveries: list[asyncio.Future[Any]] = []

    async def publish() -> float:
        async for i in paced(n, rate):
            if slots is not None:
                await slots.acquire()
            record = records[i]
            record["created_at"] = int(time.time() * 1000)
            publish_at[i] = time.perf_counter()
            deliveries.append(await client.publish_record(record, wait=False))
        await client.flush()
        return time.perf_counter()

    def cpu_probe() -> dict[str, float | None]:
        times = os.times()
        worker_cpu = [process_cpu_s(pid) for pid in workers.pids]
        return {
            "workers": None if None in worker_cpu else sum(c for c in worker_cpu if c),
            "client": times.user + times.system,
            "broker": process_cpu_s(broker_pid) if broker_pid else None,
        }

    reader = asyncio.create_task(read(), name="bench-reader")
    await asyncio.sleep(0)  # the reader subscribes before anything is published
    cpu_before = cpu_probe()
    started = time.perf_counter()
    publisher = asyncio.create_task(publish(), name="bench-publisher")
    last_count, last_change = 0, time.monotonic()
    try:
        while not all_in.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 0.5)
            if publisher.done() and publisher.exception() is not None:
                raise BenchError(f"publishing failed: {publisher.exception()!r}")
            on_progress(received)
            if received != last_count:
                last_count, last_change = received, time.monotonic()
            elif time.monotonic() - last_change > stall_timeout_s:
                raise BenchError(
                    f"{label}: no result for {stall_timeout_s:.0f} s; {received}/{n} arrived"
                )
            problem = workers.dead()
            if problem:
                raise BenchError(f"{label}: {problem}")
        published = await publisher
        cpu_after = cpu_probe()
        on_progress(received)
    finally:
        for task in (publisher, reader):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    failed_sends = sum(
        1 for d in deliveries if d.done() and not d.cancelled() and d.exception() is not None
    )
    samples: list[Sample] = []
    read_ms: list[float] = []
    finished_ms: list[float] = []
    for i, result in enumerate(results):
        assert result is not None
        t = result["timings"]
        samples.append(
            Sample(
                index=i,
                status=result["status"],
                prompt_tokens=result["prompt_tokens"],
                completion_tokens=result["completion_tokens"],
                batch_size=result["batch_size"],
                stages={
                    "queue": t["queue_ms"],
                    "batch_wait": t["batch_wait_ms"],
                    "inference": t["inference_ms"],
                    "added": t["total_ms"] - t["inference_ms"],
                    "total": t["total_ms"],
                    "e2e": (seen_at[i] - publish_at[i]) * 1000.0,
                },
                text=result.get("text") or "",
            )
        )
        read_ms.append(records[i]["created_at"] + t["queue_ms"])
        finished_ms.append(result["created_at"])
    wall = max(seen_at) - started
    summary = summarize(samples, wall, label=label, engine=engine_label)
    worker_span_s = (max(finished_ms) - min(read_ms)) / 1000.0
    lags = [
        (publish_at[i] - started - offset) * 1000.0
        for i, offset in enumerate(schedule_offsets(n, rate))
    ]
    summary.update(
        target_rate=rate,
        concurrency=concurrency,
        publish={
            "wall_s": published - started,
            "requests_per_s": n / (published - started) if published > started else None,
            "failed_sends": failed_sends,
            "behind_schedule_ms": latency_summary(lags) if rate else None,
        },
        worker_requests_per_s=(n / worker_span_s) if worker_span_s > 0 else None,
        cpu=cpu_usage(cpu_before, cpu_after, wall, n),
        model_versions=sorted({r["model_version"] for r in results if r}),
        worker_names=sorted({r["worker"] for r in results if r}),
    )
    return PipelineRun(summary, samples)


async def _with_client(settings: Settings, body: Callable[[Any], Awaitable[Any]]) -> Any:
    from connectors.client import SluiceClient

    async with SluiceClient(settings, bootstrap=settings.kafka_bootstrap) as client:
        return await body(client)


def _tear_down(
    progress: Progress, label: str, workers: Workers, settings: Settings, options: BenchOptions
) -> None:
    """Stop a phase's workers (shown as a progress step) and delete its topics."""
    stopping = progress.add_task(label, total=None)
    workers.stop()
    progress.update(stopping, total=1, completed=1)
    if not options.keep_topics:
        with contextlib.suppress(Exception):
            asyncio.run(_delete_topics(settings))


def _pipeline_phase(
    base: Settings,
    options: BenchOptions,
    prompts: Sequence[str],
    broker: Broker,
    progress: Progress,
    console: Console,
) -> dict[str, Any]:
    """The model behind real worker processes: same prompts as direct."""
    tag = uuid.uuid4().hex[:8]
    settings = run_settings(base, broker.bootstrap, tag, partitions=options.partitions)
    asyncio.run(_create_topics(settings))
    workers = Workers(settings, options.workers, tag)
    starting = progress.add_task(f"pipeline: starting {options.workers} worker(s)", total=None)
    try:
        t = time.perf_counter()
        workers.start()
        ready_s = time.perf_counter() - t
        progress.update(starting, total=1, completed=1)
        task = progress.add_task("pipeline: results", total=len(prompts))
        run: PipelineRun = asyncio.run(
            _with_client(
                settings,
                lambda client: _pipeline_run(
                    client,
                    prompts,
                    tag=tag,
                    max_new_tokens=options.max_new_tokens,
                    rate=options.rate,
                    concurrency=options.concurrency,
                    label="pipeline",
                    engine_label=f"{settings.backend} in {options.workers} worker(s)",
                    workers=workers,
                    stall_timeout_s=options.stall_timeout_s,
                    on_progress=lambda k: progress.update(task, completed=k),
                    broker_pid=broker.pid,
                ),
            )
        )
    finally:
        _tear_down(progress, "pipeline: stopping the worker(s)", workers, settings, options)
    run.summary.update(
        workers=options.workers,
        worker_ready_s=ready_s,
        worker_stop_s=workers.stop_s,
        worker_exit_codes=workers.exit_codes,
        worker_logs=workers.logs,
        topics_prefix=f"bench-{tag}",
    )
    return {"run": run}


def _ceiling_phase(
    base: Settings,
    options: BenchOptions,
    prompt_words: Sequence[int],
    broker: Broker,
    progress: Progress,
    console: Console,
) -> dict[str, Any]:
    """The pipeline on the benchmark engine: saturation, then half of it, then (with
    ``rate``) the given rate. One worker, one set of topics, one client."""
    tag = uuid.uuid4().hex[:8]
    settings = run_settings(
        base,
        broker.bootstrap,
        tag,
        partitions=options.partitions,
        backend="benchmark",
        benchmark_completion_tokens=options.max_new_tokens,
    )
    asyncio.run(_create_topics(settings))
    workers = Workers(settings, 1, tag)
    out: dict[str, Any] = {"engine": BENCHMARK_ENGINE}
    runs: dict[str, PipelineRun] = {}
    starting = progress.add_task("ceiling: starting 1 worker (benchmark engine)", total=None)
    try:
        t = time.perf_counter()
        workers.start()
        ready_s = time.perf_counter() - t
        progress.update(starting, total=1, completed=1)

        async def passes(client: Any) -> None:
            async def one(name: str, n: int, rate: float | None) -> PipelineRun:
                what = "as fast as possible" if rate is None else f"at {rate:,.0f} req/s"
                task = progress.add_task(f"ceiling: {name} ({what})", total=n)
                prompts = make_prompts(n, prompt_words, options.seed)
                run = await _pipeline_run(
                    client,
                    prompts,
                    tag=f"{tag}-{name}",
                    max_new_tokens=options.max_new_tokens,
                    rate=rate,
                    concurrency=None,
                    label=f"ceiling-{name}",
                    engine_label=BENCHMARK_ENGINE,
                    workers=workers,
                    stall_timeout_s=options.stall_timeout_s,
                    on_progress=lambda k: progress.update(task, completed=k),
                    broker_pid=broker.pid,
                )
                runs[name] = run
                return run

            saturation = await one("saturation", options.pipeline_requests, None)
            half = 0.5 * saturation.summary["requests_per_s"]
            if half > 0:
                await one("half_rate", _rated_count(options.pipeline_requests, half), half)
            if options.rate:
                await one(
                    "fixed_rate",
                    _rated_count(options.pipeline_requests, options.rate),
                    options.rate,
                )

        asyncio.run(_with_client(settings, passes))
    finally:
        _tear_down(progress, "ceiling: stopping the worker", workers, settings, options)
    for name, run in runs.items():
        out[name] = run.summary
    out["_samples"] = {name: run.samples for name, run in runs.items()}
    out.update(
        worker_ready_s=ready_s,
        worker_stop_s=workers.stop_s,
        worker_exit_codes=workers.exit_codes,
        worker_logs=workers.logs,
        topics_prefix=f"bench-{tag}",
    )
    return out


def _rated_count(limit: int, rate: float, seconds: float = 20.0) -> int:
    """Requests for a rate-limited pass: at most ``limit``, at most ~``seconds`` long."""
    return max(1, min(limit, max(500, int(rate * seconds))))


# ----------------------------------------------------------------------------- the run


def run_bench(settings: Settings, options: BenchOptions, console: Console) -> dict[str, Any]:
    """Run the selected modes, print the tables, write JSON + plots; return the report."""
    options.validate(settings)
    modes = options.mode_list()
    model_settings = settings
    if settings.backend == "benchmark":  # the model modes need a model
        model_settings = settings.model_copy(update={"backend": "torch"})
    started_at = datetime.now(UTC)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(options.requests, options.prompt_word_list(), options.seed)
    env = environment()
    busy = _busy_warning(env.get("load_average_at_start"), env.get("cpus_usable"))
    if busy:
        console.print(f"[yellow]warning[/]: {busy}")
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "started_at": started_at.isoformat(),
        "options": _jsonable(asdict(options)),
        "settings": _settings_view(model_settings),
        "environment": env,
        "modes": {},
    }
    samples: dict[str, list[Sample]] = {}
    sweep: list[dict[str, Any]] = []
    broker = Broker(settings, console)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    t0 = time.perf_counter()
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            if "direct" in modes:
                direct = asyncio.run(
                    _direct_phase(model_settings, options, prompts, progress, console)
                )
                report["modes"]["direct"] = direct["run"].summary | {"sweep": direct["sweep"]}
                report["environment"]["engine"] = direct["engine"]
                samples["direct"] = direct["run"].samples
                sweep = direct["sweep"]
                if "quantize" in direct:
                    report["quantize"] = direct["quantize"]
                    for name, texts in direct["quantize"].pop("outputs", {}).items():
                        report.setdefault("outputs", {})[f"direct-{name}"] = texts
                if options.anchor:
                    anchor = asyncio.run(_anchor_phase(model_settings, options, prompts, progress))
                    for label, texts in anchor.pop("outputs").items():
                        report.setdefault("outputs", {})[f"anchor {label}"] = texts
                    report["anchor"] = anchor
            if "pipeline" in modes or "ceiling" in modes:
                broker.open(progress)
                env["kafka_version"] = broker.kafka_version
                env["kafka_bootstrap"] = broker.bootstrap
            if "pipeline" in modes:
                pipeline = _pipeline_phase(
                    model_settings, options, prompts, broker, progress, console
                )
                report["modes"]["pipeline"] = pipeline["run"].summary
                samples["pipeline"] = pipeline["run"].samples
            if "ceiling" in modes:
                ceiling = _ceiling_phase(
                    settings, options, options.prompt_word_list(), broker, progress, console
                )
                for name, run_samples in ceiling.pop("_samples").items():
                    samples[f"ceiling-{name}"] = run_samples
                report["modes"]["ceiling"] = ceiling
    finally:
        broker.close()
    outputs = report.setdefault("outputs", {})
    outputs["prompts"] = prompts
    for name in ("direct", "pipeline"):
        if name in samples:
            outputs[name] = _texts(samples[name])
    if "direct" in samples and "pipeline" in samples:
        agreement = compare_outputs(outputs["direct"], outputs["pipeline"], str.split)
        report["modes"]["pipeline"]["agreement_with_direct_words"] = agreement
    report["targets"] = targets(report["modes"]) | anchor_targets(report.get("anchor", {}))
    if hasattr(os, "getloadavg"):
        env["load_average_at_end"] = list(os.getloadavg())
    env["busy_warning"] = busy or _busy_warning(
        env.get("load_average_at_end"), env.get("cpus_usable")
    )
    report["wall_s"] = time.perf_counter() - t0
    report["finished_at"] = datetime.now(UTC).isoformat()
    report["latencies_ms"] = {
        name: [s.stages.get("total") for s in sorted(samples[name], key=lambda s: s.index)]
        for name in ("direct", "pipeline")
        if name in samples
    }
    json_path = out_dir / f"bench-{stamp}.json"
    report["files"] = {"json": str(json_path), "plots": {}}
    if options.plots:
        report["files"]["plots"] = _write_plots(out_dir, stamp, sweep, samples, console)
    json_path.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    print_report(report, console)
    return report


def _write_plots(
    out_dir: Path,
    stamp: str,
    sweep: list[dict[str, Any]],
    samples: dict[str, list[Sample]],
    console: Console,
) -> dict[str, str]:
    try:
        from connectors import bench_plots
    except ImportError as exc:  # matplotlib missing
        console.print(f"[yellow]no plots[/]: {exc} (pip install matplotlib)")
        return {}
    plots: dict[str, str] = {}
    if sweep:
        path = out_dir / f"bench-{stamp}-batch-sweep.png"
        bench_plots.plot_batch_sweep(sweep, path)
        plots["batch_sweep"] = str(path)
    series = {
        f"{name} total": [s.stages["total"] for s in samples[name] if s.status == "OK"]
        for name in ("direct", "pipeline")
        if name in samples
    }
    if "pipeline" in samples:
        series["pipeline e2e (client)"] = [
            s.stages["e2e"] for s in samples["pipeline"] if s.status == "OK"
        ]
    if series:
        path = out_dir / f"bench-{stamp}-latency-cdf.png"
        bench_plots.plot_latency_cdf(series, path, title="Latency CDF: direct vs pipeline")
        plots["latency_cdf"] = str(path)
    added = {
        f"{name.removeprefix('ceiling-')} added": [
            s.stages["added"] for s in runs if s.status == "OK"
        ]
        for name, runs in samples.items()
        if name.startswith("ceiling-")
    }
    if added:
        path = out_dir / f"bench-{stamp}-ceiling-added-cdf.png"
        bench_plots.plot_latency_cdf(
            added, path, title="Added latency (total - inference), benchmark engine"
        )
        plots["ceiling_added_cdf"] = str(path)
    return plots


def _busy_warning(load: list[float] | None, cpus: int | None) -> str | None:
    """A note when other work competes for the CPUs (the figures are then lower bounds)."""
    if not load or not cpus or load[0] <= cpus:
        return None
    return (
        f"load average {load[0]:.1f} on {cpus} CPUs: other work competes for the CPUs, "
        "so these figures are lower bounds"
    )


def _settings_view(settings: Settings) -> dict[str, Any]:
    keys = (
        "backend",
        "model_name",
        "model_path",
        "device",
        "torch_threads",
        "torch_quantize",
        "batch_max_size",
        "batch_max_tokens",
        "batch_max_wait_ms",
        "max_inflight",
        "commit_interval_ms",
        "partitions",
        "replication_factor",
        "kafka_bootstrap",
        "schema_registry_url",
    )
    return {k: _jsonable(getattr(settings, k)) for k in keys}


def environment() -> dict[str, Any]:
    """Where the figures were measured."""
    from importlib import metadata

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "kafka_version": None,
    }
    for package in ("torch", "transformers", "faust-streaming", "aiokafka", "fastavro"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[package] = metadata.version(package)
    with contextlib.suppress(Exception):
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        env["git_commit"] = head or None
        env["git_dirty"] = bool(dirty)
    return env


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------ output


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _stage_table(title: str, summary: dict[str, Any]) -> Table:
    caption = (
        f"{summary['ok']}/{summary['requests']} ok in {summary['wall_s']:.2f} s · "
        f"[bold]{summary['requests_per_s']:,.1f} req/s[/] · "
        f"[bold]{summary['output_tokens_per_s']:,.1f} out tok/s[/] · "
        f"mean batch {summary['mean_batch_size']:.1f}"
    )
    extra = []
    if summary.get("target_rate"):
        extra.append(f"target rate {summary['target_rate']:,.0f} req/s")
    publish = summary.get("publish")
    if publish and publish.get("requests_per_s"):
        extra.append(f"published at {publish['requests_per_s']:,.0f} req/s")
    if summary.get("worker_requests_per_s"):
        extra.append(f"worker-side {_num(summary['worker_requests_per_s'])} req/s")
    cpu = summary.get("cpu") or {}
    if cpu:
        extra.append(
            "CPU cores busy: " + ", ".join(f"{k} {_num(v['cores'], 2)}" for k, v in cpu.items())
        )
        if "workers" in cpu:
            extra.append(f"worker {_num(cpu['workers']['us_per_request'], 0)} CPU us/request")
    if extra:
        caption += " · " + " · ".join(extra)
    table = Table(title=f"{title}: {summary['engine']}", caption=caption)
    table.add_column("stage (ms)")
    for col in ("p50", "p95", "p99", "mean", "max"):
        table.add_column(col, justify="right")
    table.add_column("what", style="dim")
    for stage, stats in summary["latency_ms"].items():
        table.add_row(
            stage,
            *(_ms(stats[c]) for c in ("p50", "p95", "p99", "mean", "max")),
            STAGE_HELP.get(stage, ""),
        )
    return table


def _mark(met: bool | None) -> str:
    return "[green]met[/]" if met else "[red]missed[/]"


def print_report(report: dict[str, Any], console: Console) -> None:
    modes = report["modes"]
    if "direct" in modes:
        console.print(_stage_table("direct", modes["direct"]))
        sweep = modes["direct"].get("sweep") or []
        if sweep:
            table = Table(title="direct: engine throughput vs batch size (engine.generate)")
            for col in ("batch", "requests", "req/s", "out tok/s", "batch p50 ms"):
                table.add_column(col, justify="right")
            for p in sweep:
                table.add_row(
                    str(p["batch_size"]),
                    str(p["requests"]),
                    _num(p["requests_per_s"], 2),
                    _num(p["output_tokens_per_s"]),
                    _ms(p["batch_ms"]["p50"]),
                )
            console.print(table)
    if "pipeline" in modes:
        console.print(_stage_table("pipeline", modes["pipeline"]))
    ceiling = modes.get("ceiling")
    if ceiling:
        for name in ("saturation", "half_rate", "fixed_rate"):
            if name in ceiling:
                console.print(_stage_table(f"ceiling {name}", ceiling[name]))
    quantize = report.get("quantize")
    if quantize and "skipped" not in quantize:
        table = Table(title="int8 dynamic quantization vs fp32 (direct, same prompts)")
        for col in ("engine", "req/s", "out tok/s", "total p50 ms", "total p99 ms"):
            table.add_column(col, justify="right" if col != "engine" else "left")
        for key in ("fp32", "int8"):
            s = quantize[key]
            lat = s["latency_ms"]["total"]
            table.add_row(
                s["engine"],
                _num(s["requests_per_s"], 2),
                _num(s["output_tokens_per_s"]),
                _ms(lat["p50"]),
                _ms(lat["p99"]),
            )
        a = quantize["agreement"]
        table.caption = (
            f"speed-up x{_num(quantize['speedup_requests'], 2)} req/s, "
            f"x{_num(quantize['speedup_tokens'], 2)} tok/s · identical greedy outputs "
            f"{_pct(a['identical'])} · token overlap {_pct(a['token_overlap'])} · "
            f"common prefix {_pct(a['prefix_overlap'])}"
        )
        console.print(table)
    elif quantize:
        console.print(f"[yellow]int8 compare skipped[/]: {quantize['skipped']}")
    anchor = report.get("anchor")
    if anchor:
        console.print(_anchor_table(anchor))
    table = Table(title="Targets")
    for col in ("figure", "value", "target", ""):
        table.add_column(col, justify="right" if col in ("value", "target") else "left")
    t = report["targets"]
    if "pipeline_vs_direct" in t:
        p = t["pipeline_vs_direct"]
        table.add_row("pipeline / direct req/s", _num(p["requests_ratio"], 3), ">= 0.95", "")
        table.add_row(
            "pipeline / direct out tok/s", _num(p["tokens_ratio"], 3), ">= 0.95", _mark(p["met"])
        )
    if "ceiling_requests_per_s" in t:
        c = t["ceiling_requests_per_s"]
        table.add_row(
            "ceiling req/s (1 worker, benchmark engine)",
            _num(c["value"], 0),
            f">= {TARGET_CEILING_RPS:,.0f}",
            _mark(c["met"]),
        )
    if "half_rate_added_p99_ms" in t:
        h = t["half_rate_added_p99_ms"]
        table.add_row(
            f"added p99 ms at half rate ({_num(h['rate'], 0)} req/s)",
            _ms(h["value"]),
            f"<= {TARGET_HALF_RATE_ADDED_P99_MS:.0f}",
            _mark(h["met"]),
        )
    for key, what in (("anchor_batch1", "one at a time"), ("anchor_concurrent", "concurrent")):
        if key in t:
            a = t[key]
            table.add_row(
                f"{a['engine']} / llama.cpp one at a time, {what} tok/s",
                _num(a["value"], 2),
                f">= {a['target']:.1f}",
                _mark(a["met"]),
            )
    if t:
        console.print(table)
    busy = report.get("environment", {}).get("busy_warning")
    if busy:
        console.print(f"[yellow]warning[/]: {busy}")
    files = report["files"]
    console.print(f"Wrote {files['json']}")
    for path in files.get("plots", {}).values():
        console.print(f"Wrote {path}")


def _anchor_table(anchor: dict[str, Any]) -> Table:
    conc = anchor["engines"][0]["concurrency"] if anchor["engines"] else "-"
    table = Table(
        title=f"anchor: output tokens/s against {anchor['anchor']} "
        f"({anchor['prompts']} prompts, {anchor['max_new_tokens']} new tokens, greedy)"
    )
    for col in (
        "engine",
        "1 at a time",
        f"{conc} concurrent",
        "x llama.cpp (1)",
        f"{conc} conc. x llama.cpp (1)",
        f"x llama.cpp ({conc})",
        "identical to fp32",
        "word overlap",
    ):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for row in anchor["engines"]:
        a = row["agreement_with_fp32"] or {}
        table.add_row(
            row["engine"],
            _num(row["one_tokens_per_s"]),
            _num(row["concurrent_tokens_per_s"]),
            _num(row["one_vs_anchor_one"], 2),
            _num(row["concurrent_vs_anchor_one"], 2),
            _num(row["concurrent_vs_anchor_concurrent"], 2),
            _pct(a.get("identical")),
            _pct(a.get("token_overlap")),
        )
    if anchor.get("skipped_anchor"):
        table.caption = anchor["skipped_anchor"]
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def main(argv: Iterable[str] | None = None) -> None:  # pragma: no cover - manual use
    """``python -m connectors.bench`` until ``sluice bench`` is wired."""
    del argv
    run_bench(Settings(), BenchOptions(), Console())


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
