"""Admission: a decoded ``InferenceRequest`` becomes a ``GenerationRequest`` or a reason.

Every check that can fail for a request as written lives here, so each failure has one
``reason_code`` on its dead-letter record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from inference.errors import InvalidRequestError
from inference.types import GenerationRequest, Sampling

DEFAULT_MODEL = "default"


@dataclass(frozen=True)
class AdmissionLimits:
    max_prompt_chars: int = 16_000
    max_prompt_tokens: int = 1_024
    max_new_tokens_limit: int = 512


def _reject(code: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, reason_code=code)


class Admission:
    """Validates requests for the models this worker serves and tokenizes their prompts."""

    def __init__(
        self,
        limits: AdmissionLimits,
        served_models: Callable[[], set[str]],
        encode: Callable[[str, str | None, bool], list[int]],
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._limits = limits
        self._served_models = served_models
        self._encode = encode
        self._clock = clock
        self._wall_ms = wall_clock_ms

    def admit(self, record: Mapping[str, Any], record_timestamp_ms: int) -> GenerationRequest:
        """Raise :class:`InvalidRequestError` with a reason code, or return the request."""
        request_id = record.get("request_id") or ""
        if not request_id.strip():
            raise _reject("invalid_request", "request_id is empty")
        model = record.get("model") or DEFAULT_MODEL
        served = self._served_models()
        if model != DEFAULT_MODEL and model not in served:
            raise _reject(
                "unknown_model",
                f"model {model!r} is not served here (served: {', '.join(sorted(served))})",
            )
        prompt = record.get("prompt") or ""
        if not prompt.strip():
            raise _reject("invalid_request", "prompt is empty")
        if len(prompt) > self._limits.max_prompt_chars:
            raise _reject(
                "prompt_too_long",
                f"prompt has {len(prompt)} characters; the limit is "
                f"{self._limits.max_prompt_chars}",
            )
        sampling = self._sampling(record.get("sampling") or {})
        system = record.get("system")
        raw = bool(record.get("raw", False))
        prompt_ids = self._encode(prompt, system, raw)
        if len(prompt_ids) > self._limits.max_prompt_tokens:
            raise _reject(
                "prompt_too_long",
                f"prompt has {len(prompt_ids)} tokens; the limit is "
                f"{self._limits.max_prompt_tokens}",
            )
        return GenerationRequest(
            request_id=request_id,
            prompt=prompt,
            sampling=sampling,
            system=system,
            raw=raw,
            priority=int(record.get("priority") or 0),
            prompt_ids=prompt_ids,
            deadline=self._deadline(record, record_timestamp_ms),
            admitted_at=self._clock(),
        )

    def _sampling(self, raw: Mapping[str, Any]) -> Sampling:
        max_new = raw.get("max_new_tokens", 64)
        temperature = raw.get("temperature", 0.0)
        top_p = raw.get("top_p", 1.0)
        stop = tuple(raw.get("stop") or ())
        limit = self._limits.max_new_tokens_limit
        if not 1 <= max_new <= limit:
            raise _reject("bad_sampling", f"max_new_tokens={max_new} is outside 1..{limit}")
        if not math.isfinite(temperature) or not 0.0 <= temperature <= 5.0:
            raise _reject("bad_sampling", f"temperature={temperature} is outside 0..5")
        if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
            raise _reject("bad_sampling", f"top_p={top_p} is outside (0, 1]")
        if any(not s for s in stop) or len(stop) > 16:
            raise _reject("bad_sampling", "stop strings must be non-empty, at most 16 of them")
        return Sampling(max_new, float(temperature), float(top_p), stop, raw.get("seed"))

    def _deadline(self, record: Mapping[str, Any], record_timestamp_ms: int) -> float | None:
        """Monotonic deadline from ``created_at + deadline_ms`` (wall clock)."""
        budget = record.get("deadline_ms")
        if budget is None:
            return None
        if budget <= 0:
            raise _reject("invalid_request", f"deadline_ms={budget} must be positive")
        created = record.get("created_at") or record_timestamp_ms or self._wall_ms()
        remaining_s = (created + budget - self._wall_ms()) / 1000.0
        return self._clock() + remaining_s
