"""A zero-cost engine for measuring the pipeline itself (Kafka + Faust + Avro + batching).

It is **not** a model: it answers every request with the same fixed completion at once.
``sluice bench`` runs the pipeline with it to find the pipeline's own ceiling; the worker
only uses it when ``SLUICE_BACKEND=benchmark``. Results say ``model_version="benchmark"``.
``delay_s`` (``SLUICE_BENCHMARK_DELAY_MS``) makes every batch take that long, to stand in
for a model's latency without spending its compute (tests of in-flight behaviour use it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from inference.backends.base import Engine
from inference.types import Completion, GenerationRequest


class BenchmarkEngine(Engine):
    """Returns a fixed completion of ``completion_tokens`` words; tokenizes by spaces."""

    def __init__(
        self,
        *,
        model_name: str = "benchmark",
        completion_tokens: int = 16,
        max_batch_size: int = 256,
        delay_s: float = 0.0,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        self.model_name = model_name
        self.model_version = "benchmark"
        self.max_batch_size = max_batch_size
        self._completion_tokens = completion_tokens
        self._delay_s = delay_s
        self._text = " ".join(["ok"] * completion_tokens)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def encode_prompt(self, prompt: str, *, system: str | None, raw: bool) -> list[int]:
        words = len(prompt.split()) + (len(system.split()) if system else 0)
        return [0] * max(words, 1)

    async def generate(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        return [
            Completion(
                text=self._text,
                finish_reason="length",
                prompt_tokens=len(r.prompt_ids),
                completion_tokens=min(self._completion_tokens, r.sampling.max_new_tokens),
            )
            for r in batch
        ]
