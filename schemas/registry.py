"""Schema ids from a Confluent Schema Registry.

Our schemas are registered under the record-name subject strategy: the subject is the full
record name (``dev.sluice.InferenceRequest``), so one subject holds the versions of one record
whatever topic carries it.

Errors say whose fault a failure is:

* the record's: an id the registry does not have (a real "schema not found", HTTP 404 with
  Schema Registry code 40403) is :class:`~schemas.errors.UnknownSchemaError`, a schema we
  cannot use is :class:`~schemas.errors.WrongSchemaError` / ``SchemaError``: dead letters;
* an outage (connection refused or reset, timeout, HTTP 5xx, 408, 429):
  :class:`~schemas.errors.RegistryUnavailableError`, ``retriable = True``: retry later, the
  record is fine;
* a configuration problem (401, 403, other 4xx, a 404 that is not the registry's own
  "not found", a failed TLS handshake: wrong CA, missing or refused client certificate, bad
  settings, the extra not installed): :class:`~schemas.errors.RegistryError`,
  ``retriable = False``, never a dead letter either: a worker stops and says what to fix.
  A plain ``http://`` URL to an HTTPS registry looks like a dropped connection (retriable);
  its message says to use ``https://``.

TLS and basic auth come from the settings (``streams.security.registry_client_conf``, passed
as ``client_conf`` by ``streams.codecs.codec_from_settings``).

Caches: name -> id and id -> schema, both filled by either direction (registering our schema
gives its id's schema; fetching an id that holds our current schema gives our id). Unknown
ids are remembered for ``negative_ttl_s`` (a flood of bad ids asks the registry once per id
and TTL), at most ``max_negative`` of them. Failures are never cached.

Blocking: ``confluent_kafka``'s client is synchronous (HTTP with retries and sleeps). On the
event loop use the async side: :meth:`SchemaRegistryResolver.aschema_for_id`,
:meth:`SchemaRegistryResolver.aid_for`, or :func:`adecode` (fetch the frame's schema in a
thread if it is not cached, then decode; one fetch per id however many records wait for it).
A cache miss of the sync methods on an event-loop thread logs a warning.

Needs ``confluent-kafka[schemaregistry]`` (authlib, httpx, ...); it is imported only when a
resolver is built from a URL, so the rest of Sluice works without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import fastavro

from schemas.catalog import SchemaCatalog
from schemas.errors import (
    RegistryError,
    RegistryUnavailableError,
    SchemaError,
    UnknownSchemaError,
    WrongSchemaError,
)
from schemas.resolver import ParsedSchema, SchemaResolver

if TYPE_CHECKING:
    from schemas.codec import AvroCodec, Buffer

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'confluent-kafka[schemaregistry]'"
_SCHEMA_NOT_FOUND = 40403  # Schema Registry error code of GET /schemas/ids/{id} -> 404
_TRANSIENT_STATUS = frozenset({408, 429})
_FRAME = struct.Struct(">BI")


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` (httpx wraps it), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError) and not isinstance(
            current,
            ssl.SSLEOFError | ssl.SSLZeroReturnError,  # a connection cut: an outage
        ):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _registry_error(exc: Exception, action: str, url: str | None = None) -> RegistryError:
    """Wrap a client error: an outage, or (4xx bar timeouts and throttling, TLS failures)
    a configuration problem that retrying does not heal."""
    message = f"schema registry failed while {action}: {exc}"
    status = getattr(exc, "http_status_code", None)
    if status in (401, 403):
        return RegistryError(
            f"{message}; the registry refused our credentials: check "
            "SLUICE_SCHEMA_REGISTRY_USERNAME / _PASSWORD (and the user's permissions)"
        )
    if isinstance(status, int) and 400 <= status < 500 and status not in _TRANSIENT_STATUS:
        return RegistryError(message)
    if _tls_error(exc) is not None:
        return RegistryError(
            f"{message}; the TLS handshake with the registry failed: check "
            "SLUICE_SCHEMA_REGISTRY_CA_FILE (the CA that signed the registry's certificate) "
            "and SLUICE_SCHEMA_REGISTRY_CERTFILE / _KEYFILE (the client certificate it expects)"
        )
    if url and url.startswith("http://") and status is None:
        message += f" (the URL {url} is plain http: if the registry serves HTTPS, use https://)"
    return RegistryUnavailableError(message)


def _permanent(message: str) -> RegistryError:
    return RegistryError(message)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SchemaRegistryResolver:
    """A :class:`~schemas.resolver.SchemaResolver` backed by a Confluent Schema Registry.

    Names resolve against ``catalog`` (default: the shipped schemas); :meth:`id_for` registers
    the catalog's current schema (or only looks it up when ``auto_register`` is false).
    :meth:`schema_for_id` fetches any Avro schema by id, including versions written by other
    producers. ``client`` replaces the ``SchemaRegistryClient`` built from ``url`` and
    ``client_conf`` (extra client settings such as ``basic.auth.user.info``, ``timeout``,
    ``max.retries``). ``negative_ttl_s``: how long an unknown id stays unknown without asking
    again; ``clock``: a monotonic clock in seconds.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        catalog: SchemaCatalog | None = None,
        auto_register: bool = True,
        client_conf: Mapping[str, Any] | None = None,
        client: Any = None,
        negative_ttl_s: float = 60.0,
        max_negative: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if client is None:
            if not url:
                raise ValueError("SchemaRegistryResolver needs a url or a client")
            client = self._make_client({**(client_conf or {}), "url": url})
        self._url = url
        self._client = client
        self._catalog = catalog if catalog is not None else SchemaCatalog.default()
        self._auto_register = auto_register
        self._negative_ttl_s = negative_ttl_s
        self._max_negative = max_negative
        self._clock = clock
        self._ids: dict[str, int] = {}  # full record name -> registry id
        self._schemas: dict[int, tuple[str, ParsedSchema]] = {}
        self._unknown: dict[int, tuple[float, str]] = {}  # id -> (expires at, message)
        self._unknown_lock = threading.Lock()  # the sync methods also run in threads
        self._fetching: dict[int, asyncio.Future[tuple[str, ParsedSchema]]] = {}
        self._registering: dict[str, asyncio.Future[int]] = {}

    @staticmethod
    def _make_client(conf: dict[str, Any]) -> Any:
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient
        except ImportError as exc:
            raise _permanent(f"schema registry support is not installed ({_INSTALL_HINT})") from exc
        try:
            return SchemaRegistryClient(conf)
        except (TypeError, ValueError) as exc:  # how the client rejects its configuration
            raise _permanent(f"invalid schema registry settings: {exc}") from exc

    @staticmethod
    def _make_schema(schema_str: str) -> Any:
        """A ``confluent_kafka.schema_registry.Schema`` for an Avro schema text."""
        try:
            from confluent_kafka.schema_registry import Schema
        except ImportError as exc:
            raise _permanent(f"schema registry support is not installed ({_INSTALL_HINT})") from exc
        return Schema(schema_str, "AVRO")

    @property
    def catalog(self) -> SchemaCatalog:
        return self._catalog

    def subject_for(self, name: str) -> str:
        """The subject ``name``'s schema is registered under: its full record name."""
        return self._catalog.full_name(name)

    def parsed(self, name: str) -> ParsedSchema:
        """The catalog's current parsed schema of ``name``."""
        return self._catalog.parsed(name)

    # -- cache look-ups (never any I/O) ---------------------------------------------------

    def cached_id(self, name: str) -> int | None:
        """The id of ``name``'s current schema if known without asking the registry."""
        return self._ids.get(self._catalog.full_name(name))

    def cached_schema(self, schema_id: int) -> tuple[str, ParsedSchema] | None:
        """``schema_for_id(schema_id)`` if it needs no registry call; raises
        :class:`UnknownSchemaError` while the id is remembered as unknown."""
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        if not self._unknown:
            return None
        with self._unknown_lock:
            unknown = self._unknown.get(schema_id)
            if unknown is None:
                return None
            expires, message = unknown
            if self._clock() >= expires:
                del self._unknown[schema_id]
                return None
        raise UnknownSchemaError(message)

    # -- sync API (blocking on a cache miss) ------------------------------------------------

    def id_for(self, name: str) -> int:
        """The registry id of the catalog's current schema of ``name`` (registered if needed)."""
        full_name = self._catalog.full_name(name)
        schema_id = self._ids.get(full_name)
        if schema_id is not None:
            return schema_id
        self._warn_blocking(f"the id of {full_name}")
        schema = self._make_schema(json.dumps(self._catalog.raw(full_name)))
        subject = full_name
        try:
            if self._auto_register:
                schema_id = int(self._client.register_schema(subject, schema))
                action = "registered"
            else:
                schema_id = int(self._client.lookup_schema(subject, schema).schema_id)
                action = "found"
        except Exception as exc:  # SchemaRegistryError, httpx errors, ...
            verb = "registering" if self._auto_register else "looking up"
            raise _registry_error(
                exc, f"{verb} {full_name} under subject {subject}", self._url
            ) from exc
        logger.info("schema registry: %s %s as id %d", action, full_name, schema_id)
        self._ids[full_name] = schema_id
        # The registry gives an equal schema the same id, so ours is that id's writer schema.
        self._schemas.setdefault(schema_id, (full_name, self._catalog.parsed(full_name)))
        with self._unknown_lock:
            self._unknown.pop(schema_id, None)
        return schema_id

    def schema_for_id(self, schema_id: int) -> tuple[str, ParsedSchema]:
        """``(full record name, parsed schema)`` of a registry id."""
        cached = self.cached_schema(schema_id)
        if cached is not None:
            return cached
        self._warn_blocking(f"schema id {schema_id}")
        try:
            schema = self._client.get_schema(schema_id)
        except Exception as exc:
            if getattr(exc, "http_status_code", None) == 404:
                code = getattr(exc, "error_code", _SCHEMA_NOT_FOUND)
                if code == _SCHEMA_NOT_FOUND:
                    raise self._remember_unknown(schema_id) from exc
                raise _permanent(
                    f"schema registry answered 404 (code {code}) for schema id {schema_id}: "
                    "not the registry's 'schema not found'; is the URL right?"
                ) from exc
            raise _registry_error(exc, f"fetching schema id {schema_id}", self._url) from exc
        entry = self._usable(schema_id, schema)
        self._schemas[schema_id] = entry
        full_name = entry[0]
        try:
            ours = self._catalog.raw(full_name)
        except SchemaError:
            ours = None  # a record we have no schema of our own for
        if ours is not None and json.loads(schema.schema_str) == ours:
            self._ids.setdefault(full_name, schema_id)  # the reverse direction, for free
        return entry

    def _remember_unknown(self, schema_id: int) -> UnknownSchemaError:
        message = f"schema id {schema_id} is not in the schema registry"
        if self._max_negative > 0:
            with self._unknown_lock:
                while len(self._unknown) >= self._max_negative:
                    del self._unknown[next(iter(self._unknown))]  # the oldest entry
                self._unknown[schema_id] = (self._clock() + self._negative_ttl_s, message)
        return UnknownSchemaError(message)

    @staticmethod
    def _usable(schema_id: int, schema: Any) -> tuple[str, ParsedSchema]:
        schema_type = getattr(schema, "schema_type", None) or "AVRO"
        if schema_type != "AVRO":
            raise WrongSchemaError(f"schema id {schema_id} is a {schema_type} schema, not Avro")
        if getattr(schema, "references", None):
            raise SchemaError(
                f"schema id {schema_id} uses schema references, which Sluice does not resolve"
            )
        try:
            parsed = fastavro.parse_schema(json.loads(schema.schema_str))
        except Exception as exc:
            raise SchemaError(f"schema id {schema_id} is not a valid Avro schema: {exc}") from exc
        if not isinstance(parsed, dict) or parsed.get("type") not in ("record", "error"):
            raise WrongSchemaError(f"schema id {schema_id} is not an Avro record schema")
        return str(parsed["name"]), parsed

    def _warn_blocking(self, what: str) -> None:
        if _on_event_loop():
            logger.warning(
                "schema registry: a blocking HTTP call for %s on the event loop; "
                "use the async methods (aschema_for_id, aid_for, adecode)",
                what,
            )

    # -- async API: the blocking calls run in a thread, once per id ---------------------------

    async def aschema_for_id(self, schema_id: int) -> tuple[str, ParsedSchema]:
        """:meth:`schema_for_id` without blocking the event loop."""
        cached = self.cached_schema(schema_id)
        if cached is not None:
            return cached
        pending = self._fetching.get(schema_id)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self.schema_for_id, schema_id))
            self._fetching[schema_id] = pending
            pending.add_done_callback(lambda _: self._fetching.pop(schema_id, None))
        return await asyncio.shield(pending)

    async def aid_for(self, name: str) -> int:
        """:meth:`id_for` without blocking the event loop (registers at most once at a time)."""
        full_name = self._catalog.full_name(name)
        cached = self._ids.get(full_name)
        if cached is not None:
            return cached
        pending = self._registering.get(full_name)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self.id_for, full_name))
            self._registering[full_name] = pending
            pending.add_done_callback(lambda _: self._registering.pop(full_name, None))
        return await asyncio.shield(pending)


def frame_schema_id(data: Buffer | None) -> int | None:
    """The schema id of a Confluent-framed value, or None when it is not framed (the codec
    then says why)."""
    if not data or len(data) < _FRAME.size:
        return None
    magic, schema_id = _FRAME.unpack_from(data)
    return schema_id if magic == 0 else None


async def prefetch(resolver: SchemaResolver, data: Buffer | None) -> None:
    """Make sure decoding ``data`` needs no registry call: fetch its schema in a thread if
    the resolver is a registry and the id is not cached. Raises what decoding would:
    :class:`UnknownSchemaError` (the record's fault), :class:`RegistryUnavailableError`
    (retriable) or :class:`RegistryError`. A no-op for the local catalog."""
    schema_id = frame_schema_id(data)
    if schema_id is not None and isinstance(resolver, SchemaRegistryResolver):
        await resolver.aschema_for_id(schema_id)


async def adecode(
    codec: AvroCodec, data: Buffer | None, expected: str | None = None
) -> tuple[str, dict[str, Any]]:
    """``codec.decode(data, expected)`` that never blocks the event loop on the registry."""
    await prefetch(codec.resolver, data)
    return codec.decode(data, expected)


async def awarm_up(codec: AvroCodec, names: tuple[str, ...]) -> None:
    """Register (or look up) the ids of the records this process writes, off the loop, so
    that ``codec.encode`` never calls the registry. Call at start, before the first encode."""
    resolver = codec.resolver
    if isinstance(resolver, SchemaRegistryResolver):
        for name in names:
            await resolver.aid_for(name)
