"""Admission: a decoded ``InferenceRequest`` becomes a ``GenerationRequest`` or a reason.

Every check that can fail for a request as written lives here, so each failure has one
``reason_code`` on its dead-letter record (the codes are in :mod:`inference.errors`; the
table of what is rejected and what is normalised is docs/admission.md).

Admission is the one place hostile values are stopped before they reach a batch: a value
that could make the engine fail (a temperature whose reciprocal overflows, a seed torch
cannot take, a stop string the decode loop would scan on every token) is rejected or
normalised here, so it can never fail the batch it would have joined. The cheap checks
(sizes, types, numbers) all run before the prompt is tokenized: tokenizing runs on the
event loop, so a multi-megabyte ``system`` must never reach the tokenizer.

Records normally come from the Avro codec, whose schema already fixes the types; admission
still checks them (a record built by other code, a future schema, a fuzzer) so a wrong type
is a dead letter, never a ``TypeError`` in the worker.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inference.errors import (
    BAD_DEADLINE,
    BAD_METADATA,
    BAD_SAMPLING,
    BAD_SEED,
    BAD_STOP,
    BAD_TEXT,
    EMPTY_PROMPT,
    FIELD_TOO_LONG,
    INVALID_REQUEST,
    PROMPT_TOO_LONG,
    SPECIAL_TOKENS,
    SYSTEM_TOO_LONG,
    UNKNOWN_MODEL,
    InvalidRequestError,
)
from inference.types import GenerationRequest, Sampling

if TYPE_CHECKING:
    from streams.settings import Settings

DEFAULT_MODEL = "default"
MAX_TEMPERATURE = 5.0
SEED_LIMIT = 2**63  # torch takes 0 <= seed < 2**63 as a distinct stream
# Chat-control tokens of the ChatML / Llama-3 style (<|im_start|>, <|eot_id|>, ...): always
# treated as special, whatever the tokenizer says.
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,64}\|>")


@dataclass(frozen=True)
class AdmissionLimits:
    """What admission accepts. Build from the settings with :meth:`from_settings`."""

    max_prompt_chars: int = 16_000
    max_prompt_tokens: int = 1_024
    max_new_tokens_limit: int = 512
    max_system_chars: int = 16_000
    max_stop_strings: int = 16
    max_stop_chars: int = 64
    max_metadata_entries: int = 64
    max_metadata_chars: int = 8_192  # keys and values together
    max_id_chars: int = 256  # request_id, tenant, model
    max_priority: int = 9  # priorities are clamped to 0..max_priority
    min_temperature: float = 1e-3  # 0 < temperature < this: greedy

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionLimits:
        return cls(
            max_prompt_chars=settings.max_prompt_chars,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_new_tokens_limit=settings.max_new_tokens_limit,
            max_system_chars=settings.max_system_chars,
            max_stop_strings=settings.max_stop_strings,
            max_stop_chars=settings.max_stop_chars,
            max_metadata_entries=settings.max_metadata_entries,
            max_metadata_chars=settings.max_metadata_chars,
            max_id_chars=settings.max_id_chars,
            max_priority=settings.max_priority,
            min_temperature=settings.min_temperature,
        )


def special_tokens_of(tokenizer: Any) -> list[str]:
    """Every special-token string of a Hugging Face tokenizer: ``all_special_tokens`` plus
    the added tokens marked special (SmolLM2's ``<repo_name>``, ``<filename>``, ... are only
    there). The tokenizer turns each of these strings into its control id."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found.update(t.content for t in added.values() if getattr(t, "special", False))
    return sorted(found)


def _reject(code: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, reason_code=code)


def _show(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: reasons never carry a hostile payload."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _utf8_ok(text: str) -> bool:
    """False for a string with lone surrogates (it has no UTF-8 form)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _reject(INVALID_REQUEST, f"{name} must be a string, not {type(value).__name__}")
    if not _utf8_ok(value):
        raise _reject(BAD_TEXT, f"{name} holds lone surrogates (not valid UTF-8)")
    return value


class Admission:
    """Validates requests for the models this worker serves and tokenizes their prompts.

    ``special_tokens``: the tokenizer's special-token strings (:func:`special_tokens_of`);
    ``<|...|>`` control tokens count as special in any case. A templated (non-``raw``)
    prompt or system message holding one is rejected (``special_tokens``): it could forge
    turns of the chat template. A prompt that is nothing but special tokens is rejected
    (``empty_prompt``) raw or not.
    """

    def __init__(
        self,
        limits: AdmissionLimits,
        served_models: Callable[[], set[str]],
        encode: Callable[[str, str | None, bool], list[int]],
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        special_tokens: Iterable[str] = (),
    ) -> None:
        self._limits = limits
        self._served_models = served_models
        self._encode = encode
        self._clock = clock
        self._wall_ms = wall_clock_ms
        words = sorted({t for t in special_tokens if t}, key=len, reverse=True)
        pattern = "|".join([_CONTROL_TOKEN.pattern, *map(re.escape, words)])
        self._special = re.compile(pattern)

    def admit(self, record: Mapping[str, Any], record_timestamp_ms: int) -> GenerationRequest:
        """Raise :class:`InvalidRequestError` with a reason code, or return the request."""
        limits = self._limits
        request_id = _text(record.get("request_id") or "", "request_id") or ""
        if not request_id.strip():
            raise _reject(INVALID_REQUEST, "request_id is empty")
        self._check_id_length("request_id", request_id)
        model = _text(record.get("model") or DEFAULT_MODEL, "model") or DEFAULT_MODEL
        self._check_id_length("model", model)
        served = self._served_models()
        if model != DEFAULT_MODEL and model not in served:
            raise _reject(
                UNKNOWN_MODEL,
                f"model {_show(model)} is not served here (served: {', '.join(sorted(served))})",
            )
        tenant = _text(record.get("tenant"), "tenant", optional=True)
        if tenant is not None:
            self._check_id_length("tenant", tenant)
        prompt = _text(record.get("prompt") or "", "prompt") or ""
        if not prompt.strip():
            raise _reject(INVALID_REQUEST, "prompt is empty")
        if len(prompt) > limits.max_prompt_chars:
            raise _reject(
                PROMPT_TOO_LONG,
                f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
            )
        system = _text(record.get("system"), "system", optional=True)
        if system is not None and len(system) > limits.max_system_chars:
            raise _reject(
                SYSTEM_TOO_LONG,
                f"system has {len(system)} characters; the limit is {limits.max_system_chars}",
            )
        raw = record.get("raw", False)
        if not isinstance(raw, bool):
            raise _reject(INVALID_REQUEST, f"raw must be a boolean, not {type(raw).__name__}")
        self._check_special(prompt, system, raw)
        sampling_record = record.get("sampling") or {}
        if not isinstance(sampling_record, Mapping):
            raise _reject(INVALID_REQUEST, "sampling must be a record")
        sampling = self._sampling(sampling_record)
        self._check_metadata(record.get("metadata"))
        priority = self._priority(record.get("priority"))
        deadline = self._deadline(record, record_timestamp_ms)
        # Everything cheap has passed: only now is the prompt tokenized.
        prompt_ids = self._encode(prompt, system, raw)
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise _reject(
                PROMPT_TOO_LONG,
                f"prompt has {len(prompt_ids)} tokens; the limit is {limits.max_prompt_tokens}",
            )
        return GenerationRequest(
            request_id=request_id,
            prompt=prompt,
            sampling=sampling,
            system=system,
            raw=raw,
            priority=priority,
            prompt_ids=prompt_ids,
            deadline=deadline,
            admitted_at=self._clock(),
        )

    # -- the checks ----------------------------------------------------------------------

    def _check_id_length(self, name: str, value: str) -> None:
        if len(value) > self._limits.max_id_chars:
            raise _reject(
                FIELD_TOO_LONG,
                f"{name} has {len(value)} characters; the limit is {self._limits.max_id_chars}",
            )

    def _check_special(self, prompt: str, system: str | None, raw: bool) -> None:
        if not self._special.sub("", prompt).strip():
            raise _reject(EMPTY_PROMPT, "prompt holds nothing but special tokens")
        if raw:
            return  # a raw prompt is the producer's own template
        for name, text in (("prompt", prompt), ("system", system)):
            found = self._special.search(text) if text else None
            if found is not None:
                raise _reject(
                    SPECIAL_TOKENS,
                    f"{name} holds the special token {_show(found.group())}; it could forge "
                    "chat-template turns (send raw=true to write the template yourself)",
                )

    def _sampling(self, raw: Mapping[str, Any]) -> Sampling:
        limits = self._limits
        max_new = raw.get("max_new_tokens", 64)
        temperature = raw.get("temperature", 0.0)
        top_p = raw.get("top_p", 1.0)
        stop_raw = raw.get("stop") or ()
        seed = raw.get("seed")
        limit = limits.max_new_tokens_limit
        if not _is_int(max_new) or not 1 <= max_new <= limit:
            raise _reject(BAD_SAMPLING, f"max_new_tokens={_show(max_new)} is outside 1..{limit}")
        if (
            not _is_number(temperature)
            or not math.isfinite(temperature)
            or not 0.0 <= temperature <= MAX_TEMPERATURE
        ):
            raise _reject(
                BAD_SAMPLING, f"temperature={_show(temperature)} is outside 0..{MAX_TEMPERATURE}"
            )
        if temperature < limits.min_temperature:
            # 1/temperature would overflow the logits (inf, then NaN from softmax); this
            # close to zero sampling is greedy anyway.
            temperature = 0.0
        if not _is_number(top_p) or not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
            raise _reject(BAD_SAMPLING, f"top_p={_show(top_p)} is outside (0, 1]")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
            raise _reject(BAD_SEED, f"seed={_show(seed)} is outside 0..2**63-1")
        stop = self._stop(stop_raw)
        return Sampling(max_new, float(temperature), float(top_p), stop, seed)

    def _stop(self, raw: Any) -> tuple[str, ...]:
        limits = self._limits
        if isinstance(raw, str | bytes) or not isinstance(raw, Iterable):
            raise _reject(BAD_STOP, "stop must be a list of strings")
        stop = tuple(raw)
        if len(stop) > limits.max_stop_strings:
            raise _reject(
                BAD_STOP, f"{len(stop)} stop strings; the limit is {limits.max_stop_strings}"
            )
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _reject(BAD_STOP, "stop strings must be non-empty strings")
            if len(s) > limits.max_stop_chars:
                raise _reject(
                    BAD_STOP,
                    f"a stop string has {len(s)} characters; the limit is {limits.max_stop_chars}",
                )
            if not _utf8_ok(s):
                raise _reject(BAD_TEXT, "a stop string holds lone surrogates (not valid UTF-8)")
        return stop

    def _check_metadata(self, metadata: Any) -> None:
        """A flat map of strings, bounded in entries and characters (never walked deeper)."""
        if metadata is None:
            return
        limits = self._limits
        if not isinstance(metadata, Mapping):
            raise _reject(BAD_METADATA, "metadata must be a map of strings")
        if len(metadata) > limits.max_metadata_entries:
            raise _reject(
                BAD_METADATA,
                f"metadata has {len(metadata)} entries; the limit is {limits.max_metadata_entries}",
            )
        size = 0
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise _reject(
                    BAD_METADATA,
                    f"metadata {_show(key)} is a {type(value).__name__}: keys and values "
                    "must be strings (no nesting)",
                )
            size += len(key) + len(value)
            if size > limits.max_metadata_chars:
                raise _reject(
                    BAD_METADATA,
                    f"metadata is over {limits.max_metadata_chars} characters",
                )
            if not (_utf8_ok(key) and _utf8_ok(value)):
                raise _reject(BAD_TEXT, "metadata holds lone surrogates (not valid UTF-8)")

    def _priority(self, raw: Any) -> int:
        """Clamped to 0..max_priority: one producer cannot outrank every class."""
        if raw is None:
            return 0
        if not _is_int(raw):
            raise _reject(INVALID_REQUEST, f"priority={_show(raw)} is not an integer")
        return min(max(raw, 0), self._limits.max_priority)

    def _deadline(self, record: Mapping[str, Any], record_timestamp_ms: int) -> float | None:
        """Monotonic deadline from ``created_at + deadline_ms`` (wall clock).

        A ``created_at`` ahead of this worker's clock counts as now, so a producer cannot
        stretch its deadline by dating its request in the future. A deadline already past is
        admitted: it is answered ``EXPIRED`` without running.
        """
        budget = record.get("deadline_ms")
        if budget is None:
            return None
        if not _is_int(budget):
            raise _reject(BAD_DEADLINE, f"deadline_ms={_show(budget)} is not an integer")
        if budget <= 0:
            raise _reject(BAD_DEADLINE, f"deadline_ms={budget} must be positive")
        now_ms = self._wall_ms()
        created = record.get("created_at") or record_timestamp_ms or now_ms
        if not _is_int(created):
            raise _reject(INVALID_REQUEST, f"created_at={_show(created)} is not an integer")
        created = min(created, now_ms)
        remaining_s = (created + budget - now_ms) / 1000.0
        return self._clock() + remaining_s
