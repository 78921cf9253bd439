"""What ``sluice bench`` runs: :class:`BenchOptions`, parsed and validated."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.errors import SluiceError
from streams.settings import Settings

MODES = ("direct", "pipeline", "ceiling")


class BenchError(SluiceError):
    """The bench could not run to the end (bad options, a worker died, results missing)."""

    reason_code = "bench"


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
    load_levels: str = "0.25,0.5,0.9"
    """With pipeline: open-loop Poisson arrivals at these fractions of the pipeline's
    saturation rate (requests/s), next to a lone request's latency; "" or "none": off."""
    load_requests: int = 24
    """Requests per load level (fewer when they would arrive over more than
    ``load_level_max_s``)."""
    load_level_max_s: float = 60.0
    """Longest arrival span of one load level, in seconds (bounds the bench's time)."""
    lone_requests: int = 6
    """Requests sent one at a time (each after the previous result) for the lone
    latency."""
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

    def load_level_list(self) -> list[float]:
        """The load levels as fractions of saturation, in increasing order."""
        text = str(self.load_levels).strip()
        if text.lower() in ("", "none", "off"):
            return []
        try:
            levels = _csv(text, float)
        except ValueError as exc:
            raise BenchError(f"load_levels must be comma-separated numbers, got {text!r}") from exc
        if any(not (0 < level <= 1) for level in levels):
            raise BenchError(f"load_levels must lie in (0, 1] (fractions of saturation): {text!r}")
        return sorted(set(levels))

    def validate(self, settings: Settings) -> None:
        self.mode_list()
        self.load_level_list()
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
            "load_requests",
            "lone_requests",
        ):
            if getattr(self, name) < 1:
                raise BenchError(f"{name} must be >= 1")
        if not (self.load_level_max_s > 0 and math.isfinite(self.load_level_max_s)):
            raise BenchError("load_level_max_s must be > 0 s")
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
