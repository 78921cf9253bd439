"""Engine-direct runs: the prompts into the engine through the worker's batching policy
(no Kafka), the batch-size sweep and the int8 comparison."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import Progress

from connectors.bench.options import BenchOptions
from connectors.bench.stats import Sample, compare_outputs, latency_summary, ratio, summarize
from connectors.bench.workload import paced, sweep_plan
from streams.settings import Settings


@dataclass
class DirectRun:
    summary: dict[str, Any]
    samples: list[Sample]


async def direct_run(
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
            max_inflight=max(1, int(engine.max_batch_size * settings.inflight_factor)),
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


async def sweep_run(
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


def describe_engine(engine: Any) -> str:
    name = type(engine).__name__
    device = getattr(engine, "device", None)
    dtype = getattr(engine, "dtype", None)
    return f"{name} {device}/{dtype}" if device else name


async def direct_phase(
    settings: Settings,
    options: BenchOptions,
    prompts: Sequence[str],
    progress: Progress,
    console: Console,
) -> dict[str, Any]:
    from streams.engines import build_engine

    result: dict[str, Any] = {}
    quiet_model_loading()
    engine = build_engine(settings)
    loading = progress.add_task("direct: loading the model", total=None)
    t = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - t
    progress.update(loading, total=1, completed=1)
    try:
        label = describe_engine(engine)
        task = progress.add_task(f"direct: {label}", total=len(prompts))
        run = await direct_run(
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
        result["sweep"] = await sweep_run(
            engine,
            prompts,
            plan,
            max_new_tokens=options.max_new_tokens,
            on_done=lambda k: progress.advance(sweep_task, k),
        )
    finally:
        await engine.stop()
    if options.quantize_compare:
        result["quantize"] = await quantize_phase(
            settings, options, prompts, progress, console, result
        )
    return result


async def quantize_phase(
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
        label = describe_engine(engine)
        task = progress.add_task(f"direct: {label}", total=len(prompts))
        runs[other] = await direct_run(
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
        fp32, int8 = runs["none"], runs["int8"]
        agreement = compare_outputs(
            outputs_in_order(fp32.samples), outputs_in_order(int8.samples), engine.tokenize_text
        )
    finally:
        await engine.stop()
    return {
        "outputs": {
            "fp32": outputs_in_order(fp32.samples),
            "int8": outputs_in_order(int8.samples),
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


def outputs_in_order(samples: Sequence[Sample]) -> list[str]:
    """Outputs in prompt order."""
    return [s.text for s in sorted(samples, key=lambda s: s.index)]


def quiet_model_loading() -> None:
    """No transformers progress bars in the middle of ours."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
