"""The engine interface every backend implements."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from inference.types import Completion, GenerationRequest


class Engine(abc.ABC):
    """An inference engine.

    ``generate`` takes a batch and returns exactly one outcome per request, in order: a
    :class:`Completion`, or the exception that belongs to that request alone. Raising from
    ``generate`` means the whole batch failed; the batcher then retries the requests one by
    one so a single bad request cannot fail its batch-mates.
    """

    #: Name requests ask for (``InferenceRequest.model``).
    model_name: str
    #: Version recorded on every result.
    model_version: str
    #: Largest batch the engine runs at once (its capacity).
    max_batch_size: int = 16
    #: True for engines that re-form their batch every iteration (TensorRT-LLM in-flight
    #: batching): the pipeline then submits each request at once with ``generate_one``
    #: (bounded in number) instead of forming micro-batches that wait for their slowest.
    inflight_batching: bool = False

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights and warm up. Called once before the first batch."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release the model and any threads or devices."""

    @abc.abstractmethod
    def encode_prompt(self, prompt: str, *, system: str | None, raw: bool) -> list[int]:
        """Token ids the model will see for this prompt (chat template applied unless raw)."""

    def tokenize_text(self, text: str) -> list[int]:
        """Token ids of plain text: no chat template and, where the engine can leave them
        out, no special tokens (for comparing outputs token by token)."""
        return self.encode_prompt(text, system=None, raw=True)

    @abc.abstractmethod
    async def generate(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        """Run one batch; one outcome per request, in order."""

    async def generate_one(self, request: GenerationRequest) -> Completion:
        """Run one request (engines with ``inflight_batching``); raise on its failure."""
        outcome = (await self.generate([request]))[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special tokens (admission refuses prompts made of them)."""
        return ()

    @property
    def is_healthy(self) -> bool:
        """False once the engine hit an error it cannot recover from."""
        return self.dead_error is None

    @property
    def dead_error(self) -> BaseException | None:
        return None
