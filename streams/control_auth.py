"""Signed control commands: who may change what every worker serves.

The broker's ACLs let only the operator principal write ``llm.control``. This module is the
second line of defence: operators sign each ``ControlCommand`` with HMAC-SHA256 over the
exact record value bytes, under a shared secret (``SLUICE_CONTROL_SIGNING_KEY``, its id
``SLUICE_CONTROL_SIGNING_KEY_ID``), and put the signature in Kafka record headers
(``sluice-signature``: hex digest, ``sluice-key-id``). Workers (and the CLI when it folds the
topic) verify it against the keys they trust and ignore any command that is unsigned,
signed with a key id they do not know, or whose signature does not match.

Keys rotate by id: workers trust their own signing key plus
``SLUICE_CONTROL_TRUSTED_KEYS`` (``id:secret,id:secret``); add the new key there, move the
operators to it, then drop the old one. Verification is required as soon as any key is
configured; with none, every command is accepted (as before) and the worker says so once
at start.

HMAC is symmetric: whoever can verify can also sign, so the secret must be kept from
everyone but operators and workers (never in ``producer.env``). A captured signed command
can be replayed by a principal that may write the topic; the ACLs are what stops that.

Pure functions, no I/O; :func:`control_keys` reads the settings object.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import SecretStr

from schemas.errors import SluiceError

if TYPE_CHECKING:
    from streams.settings import Settings

__all__ = [
    "HEADER_KEY_ID",
    "HEADER_SIGNATURE",
    "MIN_KEY_BYTES",
    "REASONS",
    "ControlAuthError",
    "ControlKeys",
    "Verdict",
    "control_keys",
    "parse_trusted_keys",
    "sign",
    "verify",
]

HEADER_SIGNATURE = "sluice-signature"
HEADER_KEY_ID = "sluice-key-id"
#: Shortest secret accepted (bytes of its UTF-8 text).
MIN_KEY_BYTES = 16
#: Why a command was rejected (the ``reason`` label of ``sluice_control_rejected_total``).
REASONS = ("unsigned", "unknown_key", "bad_signature")

Headers = Iterable[tuple[str, bytes | None]]


class ControlAuthError(SluiceError):
    """The control signing settings are unusable (a configuration problem)."""

    reason_code = "control_auth_config"
    retriable = False


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`verify`: ``ok``, else ``reason`` (one of :data:`REASONS`);
    ``key_id`` as the record's header named it (None when absent)."""

    ok: bool
    reason: str | None = None
    key_id: str | None = None


@dataclass(frozen=True)
class ControlKeys:
    """The key this process signs with (``signing``: id and secret, or None) and the keys
    it trusts when verifying (``trusted``: id -> secret, the signing key included)."""

    signing: tuple[str, SecretStr] | None = None
    trusted: Mapping[str, SecretStr] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        """Whether unsigned commands are ignored: as soon as any key is configured."""
        return bool(self.trusted)

    def sign(self, value: bytes) -> list[tuple[str, bytes]]:
        """Headers for ``value`` under the signing key ([] when there is none)."""
        if self.signing is None:
            return []
        key_id, secret = self.signing
        return sign(value, key_id, secret)

    def verify(self, value: bytes | None, headers: Headers) -> Verdict:
        """:func:`verify` against the trusted keys; always ok when none is configured."""
        if not self.required:
            return Verdict(True)
        return verify(value, headers, self.trusted)

    def __repr__(self) -> str:
        signing = self.signing[0] if self.signing else None
        return f"ControlKeys(signing={signing!r}, trusted={sorted(self.trusted)!r})"


def _digest(value: bytes, secret: SecretStr) -> str:
    return hmac.new(secret.get_secret_value().encode(), value, hashlib.sha256).hexdigest()


def sign(value: bytes, key_id: str, secret: SecretStr) -> list[tuple[str, bytes]]:
    """The record headers that sign ``value`` (the exact bytes sent) under ``secret``."""
    return [
        (HEADER_SIGNATURE, _digest(value, secret).encode()),
        (HEADER_KEY_ID, key_id.encode()),
    ]


def verify(value: bytes | None, headers: Headers, trusted: Mapping[str, SecretStr]) -> Verdict:
    """Whether ``headers`` carry a valid signature of ``value`` by one of ``trusted``."""
    found: dict[str, bytes | None] = {}
    for name, raw in headers or ():
        found.setdefault(name, raw)  # the first of a repeated header counts
    signature = found.get(HEADER_SIGNATURE)
    raw_id = found.get(HEADER_KEY_ID)
    key_id = raw_id.decode("utf-8", "replace") if raw_id is not None else None
    if not signature:
        return Verdict(False, "unsigned", key_id)
    secret = trusted.get(key_id) if key_id is not None else None
    if secret is None:
        return Verdict(False, "unknown_key", key_id)
    expected = _digest(value or b"", secret).encode()
    if not hmac.compare_digest(expected, signature):
        return Verdict(False, "bad_signature", key_id)
    return Verdict(True, None, key_id)


def parse_trusted_keys(text: str) -> dict[str, SecretStr]:
    """``id:secret,id:secret`` (whitespace around entries ignored) as id -> secret."""
    keys: dict[str, SecretStr] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        key_id, sep, secret = entry.partition(":")
        if not sep or not key_id.strip() or not secret:
            raise ControlAuthError(
                "control_trusted_keys must be id:secret[,id:secret...] "
                f"(an entry has no id or no secret: {key_id.strip() or '?'!r})"
            )
        keys[key_id.strip()] = SecretStr(secret)
    return keys


def _check_secret(key_id: str, secret: SecretStr, what: str) -> None:
    if len(secret.get_secret_value().encode()) < MIN_KEY_BYTES:
        raise ControlAuthError(
            f"{what} (key id {key_id!r}) is shorter than {MIN_KEY_BYTES} bytes: "
            "use a random one, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )


def control_keys(settings: Settings) -> ControlKeys:
    """The signing and trusted keys of ``settings``; raises :class:`ControlAuthError` for
    a key that is too short, a malformed trusted list, or one id with two secrets."""
    trusted: dict[str, SecretStr] = {}
    if settings.control_trusted_keys is not None:
        trusted = parse_trusted_keys(settings.control_trusted_keys.get_secret_value())
    for key_id, secret in trusted.items():
        _check_secret(key_id, secret, "a control_trusted_keys secret")
    signing: tuple[str, SecretStr] | None = None
    if settings.control_signing_key is not None:
        key_id = settings.control_signing_key_id
        secret = settings.control_signing_key
        _check_secret(key_id, secret, "control_signing_key")
        other = trusted.get(key_id)
        if other is not None and other.get_secret_value() != secret.get_secret_value():
            raise ControlAuthError(
                f"key id {key_id!r} has one secret in control_signing_key and another in "
                "control_trusted_keys"
            )
        trusted[key_id] = secret
        signing = (key_id, secret)
    return ControlKeys(signing=signing, trusted=trusted)
