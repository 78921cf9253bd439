"""The one interface the codec needs from wherever schemas come from.

:class:`~schemas.catalog.SchemaCatalog` (ids derived from the schema text, no network) and
:class:`~schemas.registry.SchemaRegistryResolver` (ids from a Confluent Schema Registry) both
satisfy it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

ParsedSchema = dict[str, Any]
"""A schema as returned by ``fastavro.parse_schema``."""


@runtime_checkable
class SchemaResolver(Protocol):
    """Maps record names to schema ids and parsed schemas, and ids back to schemas."""

    def id_for(self, name: str) -> int:
        """The id that frames records written with the current schema of ``name``.

        ``name`` is a short ("InferenceRequest") or full ("dev.sluice.InferenceRequest")
        record name. Raises :class:`~schemas.errors.UnknownSchemaError` for a name it does
        not know.
        """
        ...

    def schema_for_id(self, schema_id: int) -> tuple[str, ParsedSchema]:
        """``(full record name, parsed writer schema)`` for a framed id.

        Raises :class:`~schemas.errors.UnknownSchemaError` for an id it does not know.
        """
        ...

    def parsed(self, name: str) -> ParsedSchema:
        """The current parsed schema of ``name`` (short or full record name)."""
        ...
