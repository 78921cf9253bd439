"""A zero-cost engine for measuring the pipeline itself (Kafka + Faust + Avro + batching).

It is **not** a model: it answers every request at once with a fixed number of words that
are derived from the request's prompt (a digest of it), so a result handed to the wrong
request is visible in tests, and duplicates of one request are identical.
``sluice bench`` runs the pipeline with it to find the pipeline's own ceiling; the worker
only uses it when ``SLUICE_BACKEND=benchmark``. Results say ``model_version="benchmark"``.
``delay_s`` (``SLUICE_BENCHMARK_DELAY_MS``) makes every batch take that long, to stand in
for a model's latency without spending its compute (tests of in-flight behaviour use it).

Two fault drills stand in for a real engine's bad days (tests and operators' drills):
``dead_after=N`` (``SLUICE_BENCHMARK_DEAD_AFTER``) makes the engine die after N requests
(``dead_error`` set, every later call raises :class:`EngineDeadError`), and
``overloaded_s=S`` (``SLUICE_BENCHMARK_OVERLOADED_S``) makes it refuse work with the retriable
:class:`EngineOverloadedError` for S seconds after start. A third stands in for a bad model
version in a canary: ``broken="empty"`` answers every request OK with no text and
``broken="error"`` fails every request on its own (an ERROR result, the engine stays alive);
``SLUICE_BENCHMARK_BROKEN_VERSIONS`` names the versions built that way.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from typing import Literal

from inference.backends.base import Engine
from inference.errors import EngineDeadError, EngineError, EngineOverloadedError
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
        dead_after: int | None = None,
        overloaded_s: float = 0.0,
        broken: Literal["empty", "error"] | None = None,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        self.model_name = model_name
        self.model_version = "benchmark"
        self.max_batch_size = max_batch_size
        self._completion_tokens = completion_tokens
        self._delay_s = delay_s
        self._dead_after = dead_after
        self._overloaded_until = 0.0
        self._overloaded_s = overloaded_s
        self._broken = broken
        self._served = 0
        self._dead: BaseException | None = None

    async def start(self) -> None:
        self._overloaded_until = time.monotonic() + self._overloaded_s

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def text_for(self, request: GenerationRequest) -> str:
        """The completion this engine gives ``request``: words from a digest of its prompt."""
        digest = hashlib.blake2b(request.prompt.encode("utf-8", "replace"), digest_size=8)
        word = digest.hexdigest()
        return " ".join([word] * min(self._completion_tokens, request.sampling.max_new_tokens))

    async def stop(self) -> None:
        return None

    def encode_prompt(self, prompt: str, *, system: str | None, raw: bool) -> list[int]:
        words = len(prompt.split()) + (len(system.split()) if system else 0)
        return [0] * max(words, 1)

    async def generate(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        if self._dead is not None:
            raise EngineDeadError(f"benchmark engine is dead: {self._dead}")
        if time.monotonic() < self._overloaded_until:
            raise EngineOverloadedError("benchmark engine is overloaded (fault drill)")
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        if self._dead_after is not None and self._served + len(batch) > self._dead_after:
            self._dead = EngineDeadError(f"died after {self._served} requests (fault drill)")
            raise self._dead
        self._served += len(batch)
        if self._broken == "error":
            return [EngineError("broken benchmark version (fault drill)") for _ in batch]
        if self._broken == "empty":
            return [
                Completion(
                    text="",
                    finish_reason="stop",
                    prompt_tokens=len(r.prompt_ids),
                    completion_tokens=0,
                )
                for r in batch
            ]
        return [
            Completion(
                text=self.text_for(r),
                finish_reason="length",
                prompt_tokens=len(r.prompt_ids),
                completion_tokens=min(self._completion_tokens, r.sampling.max_new_tokens),
            )
            for r in batch
        ]
