"""The project's error tree.

Every error Sluice raises on purpose descends from :class:`SluiceError`, which lives here
because ``schemas`` is the bottom layer that every other package imports. Each error says
whether retrying can help (``retriable``); a non-retriable error about a record becomes a
dead-letter record carrying ``reason_code`` and the message.
"""

from __future__ import annotations


class SluiceError(Exception):
    """Root of every error Sluice raises on purpose."""

    retriable: bool = False
    reason_code: str = "error"

    def __init__(self, message: str, *, reason_code: str | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code

    @property
    def reason(self) -> str:
        return str(self)


class SchemaError(SluiceError):
    """A record could not be encoded or decoded with our schemas."""

    reason_code = "undecodable"


class NotFramedError(SchemaError):
    """The bytes do not start with the Confluent magic byte and a schema id."""

    reason_code = "undecodable"


class UnknownSchemaError(SchemaError):
    """The schema id in the frame is not in the catalog or the registry."""

    reason_code = "unknown_schema"


class WrongSchemaError(SchemaError):
    """The record was written with a schema other than the one this topic carries."""

    reason_code = "wrong_schema"


class RegistryError(SluiceError):
    """The schema registry failed us; the record is not at fault, so this is never a dead
    letter.

    Not a :class:`SchemaError` on purpose: code that dead-letters ``SchemaError`` must not
    dead-letter valid traffic because the registry is down or misconfigured. A plain
    ``RegistryError`` (``retriable = False``) is a configuration problem that retrying will
    not heal (bad settings, missing extra, 401/403, a schema the registry refuses); the worker
    should stop and say so. Its subclass :class:`RegistryUnavailableError` is an outage.
    """

    reason_code = "registry_error"


class RegistryUnavailableError(RegistryError):
    """The schema registry cannot be reached or answers 5xx/408/429: retry with backoff and
    keep the record's offset unfinished."""

    reason_code = "registry_unavailable"
    retriable = True
