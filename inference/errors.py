"""Errors raised by engines, admission and the batcher."""

from __future__ import annotations

from schemas.errors import SluiceError


class InferenceError(SluiceError):
    """Base of inference errors."""

    reason_code = "inference_error"


class InvalidRequestError(InferenceError):
    """The request can never succeed as written: dead-letter it with the reason."""

    reason_code = "invalid_request"


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
