"""Schema ids from a Confluent Schema Registry.

Our schemas are registered under the record-name subject strategy: the subject is the full
record name (``dev.sluice.InferenceRequest``), so one subject holds the versions of one record
whatever topic carries it. Ids are cached both ways; the registry client caches too.

Needs ``confluent-kafka[schemaregistry]`` (authlib, httpx, ...); it is imported only when a
resolver is built from a URL, so the rest of Sluice works without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import fastavro

from schemas.catalog import SchemaCatalog
from schemas.errors import RegistryError, SchemaError, UnknownSchemaError, WrongSchemaError
from schemas.resolver import ParsedSchema

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'confluent-kafka[schemaregistry]'"


def _registry_error(exc: Exception, action: str) -> RegistryError:
    """Wrap a client error; 4xx answers (bar timeouts and throttling) will not heal on retry."""
    error = RegistryError(f"schema registry failed while {action}: {exc}")
    status = getattr(exc, "http_status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        error.retriable = False
    return error


class SchemaRegistryResolver:
    """A :class:`~schemas.resolver.SchemaResolver` backed by a Confluent Schema Registry.

    Names resolve against ``catalog`` (default: the shipped schemas); :meth:`id_for` registers
    the catalog's current schema (or only looks it up when ``auto_register`` is false).
    :meth:`schema_for_id` fetches any Avro schema by id, including versions written by other
    producers. ``client`` replaces the ``SchemaRegistryClient`` built from ``url`` and
    ``client_conf`` (extra client settings such as ``basic.auth.user.info``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        catalog: SchemaCatalog | None = None,
        auto_register: bool = True,
        client_conf: Mapping[str, Any] | None = None,
        client: Any = None,
    ) -> None:
        if client is None:
            if not url:
                raise ValueError("SchemaRegistryResolver needs a url or a client")
            client = self._make_client({**(client_conf or {}), "url": url})
        self._client = client
        self._catalog = catalog if catalog is not None else SchemaCatalog.default()
        self._auto_register = auto_register
        self._ids: dict[str, int] = {}  # full record name -> registry id
        self._schemas: dict[int, tuple[str, ParsedSchema]] = {}

    @staticmethod
    def _make_client(conf: dict[str, Any]) -> Any:
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient
        except ImportError as exc:
            error = RegistryError(f"schema registry support is not installed ({_INSTALL_HINT})")
            error.retriable = False
            raise error from exc
        try:
            return SchemaRegistryClient(conf)
        except (TypeError, ValueError) as exc:  # how the client rejects its configuration
            error = RegistryError(f"invalid schema registry settings: {exc}")
            error.retriable = False
            raise error from exc

    @staticmethod
    def _make_schema(schema_str: str) -> Any:
        """A ``confluent_kafka.schema_registry.Schema`` for an Avro schema text."""
        try:
            from confluent_kafka.schema_registry import Schema
        except ImportError as exc:
            error = RegistryError(f"schema registry support is not installed ({_INSTALL_HINT})")
            error.retriable = False
            raise error from exc
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

    def id_for(self, name: str) -> int:
        """The registry id of the catalog's current schema of ``name`` (registered if needed)."""
        full_name = self._catalog.full_name(name)
        schema_id = self._ids.get(full_name)
        if schema_id is not None:
            return schema_id
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
            raise _registry_error(exc, f"{verb} {full_name} under subject {subject}") from exc
        logger.info("schema registry: %s %s as id %d", action, full_name, schema_id)
        self._ids[full_name] = schema_id
        # The registry gives an equal schema the same id, so ours is that id's writer schema.
        self._schemas.setdefault(schema_id, (full_name, self._catalog.parsed(full_name)))
        return schema_id

    def schema_for_id(self, schema_id: int) -> tuple[str, ParsedSchema]:
        """``(full record name, parsed schema)`` of a registry id."""
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        try:
            schema = self._client.get_schema(schema_id)
        except Exception as exc:
            if getattr(exc, "http_status_code", None) == 404:
                raise UnknownSchemaError(
                    f"schema id {schema_id} is not in the schema registry"
                ) from exc
            raise _registry_error(exc, f"fetching schema id {schema_id}") from exc
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
        entry = (str(parsed["name"]), parsed)
        self._schemas[schema_id] = entry
        return entry
