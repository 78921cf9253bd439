"""PNG plots for ``sluice bench`` (matplotlib, Agg backend: no display needed).

Importing this module raises ImportError when matplotlib is not installed; the bench then
writes its JSON without plots.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after choosing the backend


def plot_batch_sweep(points: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Output tokens/s and requests/s against batch size (the direct sweep)."""
    sizes = [p["batch_size"] for p in points]
    tokens = [p["output_tokens_per_s"] for p in points]
    requests = [p["requests_per_s"] for p in points]
    fig, left = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        left.plot(sizes, tokens, "o-", color="tab:blue", label="output tokens/s")
        left.set_xlabel("batch size")
        left.set_ylabel("output tokens/s", color="tab:blue")
        left.set_xscale("log", base=2)
        left.set_xticks(sizes, [str(s) for s in sizes])
        left.set_ylim(bottom=0)
        left.grid(True, alpha=0.3)
        right = left.twinx()
        right.plot(sizes, requests, "s--", color="tab:orange", label="requests/s")
        right.set_ylabel("requests/s", color="tab:orange")
        right.set_ylim(bottom=0)
        left.set_title("Engine throughput vs batch size (direct, engine.generate)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def plot_latency_cdf(
    series: Mapping[str, Sequence[float]], path: Path, *, title: str = "Latency CDF"
) -> Path:
    """Empirical CDF of each latency series (ms), log x axis when they span > 1 decade."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        lows, highs = [], []
        styles = itertools.cycle(["-", "--", ":", "-."])  # overlapping series stay visible
        for label, values in series.items():
            ordered = sorted(v for v in values if v is not None)
            if not ordered:
                continue
            n = len(ordered)
            ax.step(
                ordered,
                [(i + 1) / n for i in range(n)],
                next(styles),
                where="post",
                label=f"{label} ({n})",
            )
            lows.append(ordered[0])
            highs.append(ordered[-1])
        positive = [v for v in lows if v > 0]
        if positive and highs and max(highs) / min(positive) > 10:
            ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(title)
        if lows:
            ax.legend(loc="lower right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
