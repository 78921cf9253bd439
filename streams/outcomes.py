"""What an engine's answer to one request means for the stream (pure, tested with values).

* ``ANSWER``: publish it as the request's result (OK, or an ERROR that belongs to this
  request alone: it would fail the same way again).
* ``RETRY``: the engine could not take it now (overloaded, a transient device or executor
  error: the error says ``retriable``). Run it again after a backoff; its offset stays
  unfinished meanwhile, so nothing is committed past it.
* ``FATAL``: the engine is dead. No result is published (an ERROR result would be committed
  and the request lost for good); the worker stops taking requests and exits non-zero, so
  the orchestrator restarts it and the uncommitted requests are read again.
"""

from __future__ import annotations

import enum

from inference.types import BatchOutcome


class Verdict(enum.Enum):
    ANSWER = "answer"
    RETRY = "retry"
    FATAL = "fatal"


def judge(outcome: BatchOutcome, engine_dead: BaseException | None) -> Verdict:
    """The verdict on ``outcome``, given the engine's ``dead_error`` right after it."""
    if outcome.completion is not None or outcome.expired:
        return Verdict.ANSWER
    error = outcome.error
    if engine_dead is not None or getattr(error, "fatal", False):
        return Verdict.FATAL
    if getattr(error, "retriable", False):
        return Verdict.RETRY
    return Verdict.ANSWER


def retry_delay(attempt: int, *, base_s: float = 0.2, max_s: float = 10.0) -> float:
    """Capped exponential backoff: 0.2, 0.4, 0.8, ... up to ``max_s`` seconds."""
    return min(base_s * 2 ** min(max(attempt - 1, 0), 16), max_s)
