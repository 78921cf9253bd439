"""The report: JSON-safe values and the printed tables, rendered from the result dict (pure)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from connectors.bench.stats import (
    TARGET_CEILING_RPS,
    TARGET_HALF_LOAD_P50_RATIO,
    TARGET_HALF_RATE_ADDED_P99_MS,
    TARGET_PIPELINE_RATIO,
)

REPORT_SCHEMA = "sluice-bench/1"
STAGE_HELP = {
    "queue": "created_at -> read by the worker",
    "batch_wait": "queued in the batcher until its batch started",
    "inference": "the batch in the engine",
    "added": "total - inference (what the pipeline adds)",
    "total": "created_at -> result built (worker clock)",
    "e2e": "client: publish -> result seen",
}


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def busy_warning(load: list[float] | None, cpus: int | None) -> str | None:
    """A note when other work competes for the CPUs (the figures are then lower bounds)."""
    if not load or not cpus or load[0] <= cpus:
        return None
    return (
        f"load average {load[0]:.1f} on {cpus} CPUs: other work competes for the CPUs, "
        "so these figures are lower bounds"
    )


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
    load = report.get("load")
    if load:
        console.print(_load_table(load))
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
        goal = f">= {TARGET_PIPELINE_RATIO:.2f}"
        table.add_row("pipeline / direct req/s", _num(p["requests_ratio"], 3), goal, "")
        table.add_row(
            "pipeline / direct out tok/s", _num(p["tokens_ratio"], 3), goal, _mark(p["met"])
        )
    if "half_load_p50_vs_lone" in t:
        h = t["half_load_p50_vs_lone"]
        table.add_row(
            f"p50 publish -> result at 50 % load ({_num(h['rate'], 2)} req/s) / lone",
            _num(h["value"], 2),
            f"<= {TARGET_HALF_LOAD_P50_RATIO:.1f}",
            _mark(h["met"]),
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


def _load_table(load: dict[str, Any]) -> Table:
    lone = load["lone"]
    table = Table(
        title="pipeline: publish -> result at partial load "
        f"(saturation {_num(load['saturation_requests_per_s'], 2)} req/s, "
        f"{load.get('arrivals', 'open loop')})",
        caption="load: fraction of saturation · lone: one request at a time · "
        "x lone: the level's percentile over the lone p50",
    )
    for col in ("load", "req/s", "got", "ok", "p50 ms", "p95 ms", "p99 ms", "p50 x", "p99 x"):
        table.add_column(col, justify="left" if col == "load" else "right")
    table.add_row(
        "lone",
        "-",
        "-",
        f"{lone['ok']}/{lone['requests']}",
        _ms(lone["p50"]),
        _ms(lone["p95"]),
        _ms(lone["p99"]),
        "1.00" if lone["p50"] else "-",
        "-",
    )
    for row in load["levels"]:
        table.add_row(
            f"{100 * row['fraction']:g} %",
            _num(row["target_rate"], 2),
            _num(row["achieved_requests_per_s"], 2),
            f"{row['ok']}/{row['requests']}",
            _ms(row["p50"]),
            _ms(row["p95"]),
            _ms(row["p99"]),
            _num(row["p50_vs_lone"], 2),
            _num(row["p99_vs_lone"], 2),
        )
    return table
