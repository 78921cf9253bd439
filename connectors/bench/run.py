"""``run_bench``: the selected modes in order, then the JSON file, the plots and the tables."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from connectors.bench.anchor import anchor_phase
from connectors.bench.direct import direct_phase, outputs_in_order
from connectors.bench.options import BenchOptions
from connectors.bench.pipeline import Broker, ceiling_phase, pipeline_phase
from connectors.bench.report import REPORT_SCHEMA, busy_warning, jsonable, print_report
from connectors.bench.stats import (
    Sample,
    anchor_targets,
    compare_outputs,
    load_targets,
    targets,
)
from connectors.bench.workload import make_prompts
from streams.settings import Settings


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
    busy = busy_warning(env.get("load_average_at_start"), env.get("cpus_usable"))
    if busy:
        console.print(f"[yellow]warning[/]: {busy}")
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "started_at": started_at.isoformat(),
        "options": jsonable(asdict(options)),
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
                    direct_phase(model_settings, options, prompts, progress, console)
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
                    anchor = asyncio.run(anchor_phase(model_settings, options, prompts, progress))
                    for label, texts in anchor.pop("outputs").items():
                        report.setdefault("outputs", {})[f"anchor {label}"] = texts
                    report["anchor"] = anchor
            if "pipeline" in modes or "ceiling" in modes:
                broker.open(progress)
                env["kafka_version"] = broker.kafka_version
                env["kafka_bootstrap"] = broker.bootstrap
            if "pipeline" in modes:
                pipeline = pipeline_phase(
                    model_settings, options, prompts, broker, progress, console
                )
                report["modes"]["pipeline"] = pipeline["run"].summary
                samples["pipeline"] = pipeline["run"].samples
                if "load" in pipeline:
                    for name, run_samples in pipeline["load"].pop("_samples").items():
                        samples[f"load-{name}"] = run_samples
                    report["load"] = pipeline["load"]
            if "ceiling" in modes:
                ceiling = ceiling_phase(
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
            outputs[name] = outputs_in_order(samples[name])
    if "direct" in samples and "pipeline" in samples:
        agreement = compare_outputs(outputs["direct"], outputs["pipeline"], str.split)
        report["modes"]["pipeline"]["agreement_with_direct_words"] = agreement
    report["targets"] = (
        targets(report["modes"])
        | load_targets(report.get("load", {}))
        | anchor_targets(report.get("anchor", {}))
    )
    if hasattr(os, "getloadavg"):
        env["load_average_at_end"] = list(os.getloadavg())
    env["busy_warning"] = busy or busy_warning(
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
    json_path.write_text(json.dumps(jsonable(report), indent=2) + "\n")
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
        from connectors.bench import plots as bench_plots
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
    load = {
        f"{name.removeprefix('load-')} e2e": [s.stages["e2e"] for s in runs if s.status == "OK"]
        for name, runs in samples.items()
        if name.startswith("load-")
    }
    if load:
        path = out_dir / f"bench-{stamp}-load-latency-cdf.png"
        bench_plots.plot_latency_cdf(
            load, path, title="Publish -> result at partial load (Poisson arrivals)"
        )
        plots["load_latency_cdf"] = str(path)
    return plots


def _settings_view(settings: Settings) -> dict[str, Any]:
    keys = (
        "backend",
        "model_name",
        "model_path",
        "device",
        "torch_threads",
        "llama_threads",
        "inflight_factor",
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
    return {k: jsonable(getattr(settings, k)) for k in keys}


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
        root = Path(__file__).resolve().parents[2]
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        env["git_commit"] = head or None
        env["git_dirty"] = bool(dirty)
    return env
