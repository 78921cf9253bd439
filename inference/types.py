"""Value objects passed between the stream layer, the batcher and the engines."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Sampling:
    """Per-request decoding settings. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(slots=True)
class GenerationRequest:
    """One admitted request as the engine sees it.

    ``prompt_ids`` is filled by the engine's tokenizer at admission, so the batcher can
    budget tokens and the engine does not tokenize twice. Times are ``time.monotonic()``.
    """

    request_id: str
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None
    raw: bool = False
    priority: int = 0
    prompt_ids: list[int] = field(default_factory=list)
    deadline: float | None = None
    admitted_at: float = 0.0

    @property
    def token_cost(self) -> int:
        """Tokens this request can occupy in a batch: prompt plus its output budget."""
        return len(self.prompt_ids) + self.sampling.max_new_tokens


@dataclass(frozen=True, slots=True)
class Completion:
    """What the engine produced for one request."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """How one request ended in the batcher: a completion or the error that stayed with it."""

    completion: Completion | None
    error: BaseException | None
    batch_size: int
    batch_wait_s: float
    inference_s: float
    expired: bool = False

    @property
    def ok(self) -> bool:
        return self.completion is not None
