"""The anchor: the same prompts through llama.cpp, the fp32 torch engine and the configured
engine in the same run, one at a time and concurrent."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

from rich.progress import Progress

from connectors.bench.direct import describe_engine, direct_run, outputs_in_order
from connectors.bench.options import BenchOptions
from connectors.bench.stats import ANCHOR_ENGINE, REFERENCE_ENGINE, anchor_figures, compare_outputs
from streams.settings import Settings


def anchor_engine_settings(settings: Settings) -> dict[str, Settings]:
    """The engines of the anchor run, by label: llama.cpp (when installed), the fp32 torch
    reference and the configured engine (when it is neither)."""
    engines: dict[str, Settings] = {}
    if importlib.util.find_spec("llama_cpp") is not None:
        # the same cores as the torch engines get (torch's default: every usable core),
        # not the llama_cpp backend's cautious default of half of them
        threads = settings.llama_threads or settings.torch_threads or len(os.sched_getaffinity(0))
        engines[ANCHOR_ENGINE] = settings.model_copy(
            update={"backend": "llama_cpp", "llama_threads": threads}
        )
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


async def anchor_phase(
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
                run = await direct_run(
                    engine,
                    engine_settings,
                    prompts,
                    max_new_tokens=options.max_new_tokens,
                    rate=None,
                    concurrency=concurrency,
                    label=f"anchor-{name}",
                    engine_label=describe_engine(engine),
                    on_done=lambda task=task: progress.advance(task),
                )
                pair[name] = run.summary
                if name == "one":
                    texts[label] = outputs_in_order(run.samples)
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
