"""Errors raised by engines, admission and the batcher."""

from __future__ import annotations

from typing import Final

from schemas.errors import SluiceError

# Reason codes admission puts on dead letters (``InvalidRequestError.reason_code``). Each
# names one way a request can be wrong as written; docs/admission.md has the table.
INVALID_REQUEST: Final = "invalid_request"  # empty id or prompt, a field of the wrong type
UNKNOWN_MODEL: Final = "unknown_model"
PROMPT_TOO_LONG: Final = "prompt_too_long"
SYSTEM_TOO_LONG: Final = "system_too_long"
BAD_SAMPLING: Final = "bad_sampling"  # max_new_tokens, temperature, top_p
BAD_SEED: Final = "bad_seed"
BAD_STOP: Final = "bad_stop"
BAD_DEADLINE: Final = "bad_deadline"
BAD_METADATA: Final = "bad_metadata"
BAD_TEXT: Final = "bad_text"  # lone surrogates: not encodable as UTF-8
SPECIAL_TOKENS: Final = "special_tokens"  # chat-control tokens in a templated prompt
EMPTY_PROMPT: Final = "empty_prompt"  # nothing left once special tokens are removed
FIELD_TOO_LONG: Final = "field_too_long"  # request_id, tenant, model name

ADMISSION_REASON_CODES: Final = (
    INVALID_REQUEST,
    UNKNOWN_MODEL,
    PROMPT_TOO_LONG,
    SYSTEM_TOO_LONG,
    BAD_SAMPLING,
    BAD_SEED,
    BAD_STOP,
    BAD_DEADLINE,
    BAD_METADATA,
    BAD_TEXT,
    SPECIAL_TOKENS,
    EMPTY_PROMPT,
    FIELD_TOO_LONG,
)


class InferenceError(SluiceError):
    """Base of inference errors."""

    reason_code = "inference_error"


class InvalidRequestError(InferenceError):
    """The request can never succeed as written: dead-letter it with the reason.

    ``reason_code`` is one of :data:`ADMISSION_REASON_CODES`.
    """

    reason_code = INVALID_REQUEST


class EngineError(InferenceError):
    """The engine failed on a request or a batch."""

    reason_code = "engine_error"


class EngineOverloadedError(EngineError):
    """The engine cannot take more work now; try again later."""

    reason_code = "overloaded"
    retriable = True


class BatcherClosedError(InferenceError):
    """The batcher is stopping and takes no more requests."""

    reason_code = "shutting_down"
    retriable = True


class EngineDeadError(EngineError):
    """The engine cannot serve any request any more (a sticky device error, a dead executor).

    Not a per-request failure: the worker stops taking requests and exits non-zero instead
    of answering every later request with an ERROR (see :mod:`streams.outcomes`)."""

    reason_code = "engine_dead"
    fatal = True
