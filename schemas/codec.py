"""Avro records in Confluent wire framing.

A framed value is ``0x00`` (magic byte), the schema id as 4 bytes big-endian, then the record
as schemaless Avro binary. This is what Confluent's serializers, Kafka Connect and ksqlDB read
and write, so Sluice topics interoperate with them when the ids come from a schema registry.

Values are plain Avro: logical types are not converted, so ``timestamp-millis`` fields are
``int`` epoch milliseconds in and out.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.validation import ValidationError, validate

from schemas._checks import Check, Invalid, compile_checks
from schemas.catalog import SchemaCatalog
from schemas.errors import (
    NotFramedError,
    SchemaError,
    UnknownSchemaError,
    WrongSchemaError,
)
from schemas.resolver import ParsedSchema, SchemaResolver

logger = logging.getLogger(__name__)

MAGIC_BYTE = 0
HEADER_SIZE = 5
_HEADER = struct.Struct(">BI")
_PRIVATE_KEYS = frozenset({"logicalType", "__fastavro_parsed", "__named_schemas"})

Buffer = bytes | bytearray | memoryview


def frame_header(schema_id: int) -> bytes:
    """The 5-byte Confluent header for ``schema_id``."""
    return _HEADER.pack(MAGIC_BYTE, schema_id)


def _plain_node(node: Any) -> Any:
    if isinstance(node, list):
        return [_plain_node(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: (value if key == "default" else _plain_node(value))
        for key, value in node.items()
        if key not in _PRIVATE_KEYS
    }


def plain_schema(parsed: ParsedSchema) -> ParsedSchema:
    """``parsed`` without logical types, parsed again: values are the underlying Avro types."""
    return fastavro.parse_schema(_plain_node(parsed))


def _short(full_name: str) -> str:
    return full_name.rsplit(".", 1)[-1]


class _Writer(NamedTuple):
    header: bytes
    schema: ParsedSchema
    short_name: str
    check: Check


class _Reader(NamedTuple):
    short_name: str
    full_name: str
    writer: ParsedSchema
    reader: ParsedSchema | None  # None: the writer schema is the current one


class AvroCodec:
    """Encodes and decodes Confluent-framed Avro with schemas from a :class:`SchemaResolver`.

    Per record name and per schema id, the header and the parsed schemas are worked out once
    and cached, so a catalog version made current after first use is not picked up: build a
    new codec then.

    ``validate`` (default on) checks each record before writing for what fastavro's writer lets
    through silently: a float or bool in an ``int`` field (truncated), an ``int`` outside 32
    bits, a non-bool in a ``boolean``, a string given for an array. It adds about half to a
    write (some 5 µs for a typical request; ``fastavro.validation`` would add 30 µs or more).
    Unknown field names and wrongly typed strings are rejected either way.
    """

    def __init__(self, resolver: SchemaResolver, *, validate: bool = True) -> None:
        self._resolver = resolver
        self._validate = validate
        self._writers: dict[str, _Writer] = {}
        self._readers: dict[int, _Reader] = {}
        self._current_plain: dict[str, ParsedSchema] = {}

    @classmethod
    def default(cls, *, validate: bool = True) -> AvroCodec:
        """A codec over the shipped schemas (:meth:`SchemaCatalog.default`)."""
        return cls(SchemaCatalog.default(), validate=validate)

    @property
    def resolver(self) -> SchemaResolver:
        return self._resolver

    # -- encode ---------------------------------------------------------------------------------

    def _writer(self, name: str) -> _Writer:
        writer = self._writers.get(name)
        if writer is None:
            parsed = self._resolver.parsed(name)
            full_name: str = parsed["name"]
            schema_id = self._resolver.id_for(name)
            plain = self._plain_current(full_name)
            writer = _Writer(
                frame_header(schema_id), plain, _short(full_name), compile_checks(plain)
            )
            self._writers[name] = writer
        return writer

    def header(self, name: str) -> bytes:
        """The 5-byte frame header that :meth:`encode` writes for ``name``."""
        return self._writer(name).header

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Frame and encode ``record`` with the current schema of ``name``.

        Raises :class:`SchemaError` naming the offending field when the record does not fit the
        schema, :class:`UnknownSchemaError` for an unknown name, and
        :class:`~schemas.errors.RegistryError` when a registry cannot give the id.
        """
        writer = self._writers.get(name) or self._writer(name)
        if self._validate:
            try:
                writer.check(record)
            except Invalid as exc:
                raise SchemaError(
                    f"cannot encode {writer.short_name}: {exc.describe(writer.short_name)}"
                ) from exc
        elif not isinstance(record, Mapping):
            raise SchemaError(
                f"cannot encode {writer.short_name}: expected a mapping, "
                f"got {type(record).__name__}"
            )
        out = io.BytesIO()
        out.write(writer.header)
        try:
            fastavro.schemaless_writer(out, writer.schema, record, strict_allow_default=True)
        except Exception as exc:  # fastavro raises TypeError, ValueError, OverflowError, ...
            raise SchemaError(
                f"cannot encode {writer.short_name}: {self._explain(writer, record, exc)}"
            ) from exc
        return out.getvalue()

    @staticmethod
    def _explain(writer: _Writer, record: Mapping[str, Any], exc: Exception) -> str:
        """The validator's message (it names the field) if it has one, else fastavro's."""
        try:
            validate(record, writer.schema, raise_errors=True)
        except ValidationError as verr:
            return _validation_message(verr)
        except Exception:  # the validator tripping on odd input must not hide the real error
            pass
        return str(exc) or type(exc).__name__

    # -- decode ---------------------------------------------------------------------------------

    def _plain_current(self, full_name: str) -> ParsedSchema:
        plain = self._current_plain.get(full_name)
        if plain is None:
            plain = plain_schema(self._resolver.parsed(full_name))
            self._current_plain[full_name] = plain
        return plain

    def _reader(self, schema_id: int) -> _Reader:
        full_name, parsed = self._resolver.schema_for_id(schema_id)
        writer = plain_schema(parsed)
        reader: ParsedSchema | None = None
        try:
            current = self._resolver.parsed(full_name)
        except UnknownSchemaError:
            current = None  # a record we have no schema of our own for: read it as written
        if current is not None and current is not parsed:
            current_plain = self._plain_current(full_name)
            if _plain_node(current_plain) != _plain_node(writer):
                reader = current_plain
                logger.debug("schema id %d: %s resolved to current", schema_id, full_name)
        entry = _Reader(_short(full_name), full_name, writer, reader)
        self._readers[schema_id] = entry
        return entry

    def decode(
        self, data: Buffer | None, expected: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``(short record name, record)`` from a framed value.

        When the value was written with another version of a record we have a current schema
        for, it is resolved to the current version (new fields get their defaults, removed
        ones are dropped). ``expected`` (short or full record name) makes any other record a
        :class:`WrongSchemaError`. Other failures: :class:`NotFramedError`,
        :class:`UnknownSchemaError`, :class:`SchemaError` ("malformed Avro body"), and
        :class:`~schemas.errors.RegistryError` when a registry cannot be asked.
        """
        if not data:
            what = "null" if data is None else "empty"
            raise NotFramedError(f"value is not Confluent-framed Avro: it is {what}")
        if len(data) < HEADER_SIZE:
            raise NotFramedError(
                f"value is not Confluent-framed Avro: {len(data)} bytes is shorter than the "
                f"{HEADER_SIZE}-byte header"
            )
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise NotFramedError(
                f"value is not Confluent-framed Avro: first byte is 0x{magic:02x}, not 0x00"
            )
        entry = self._readers.get(schema_id) or self._reader(schema_id)
        if expected is not None and expected != entry.short_name and expected != entry.full_name:
            raise WrongSchemaError(
                f"expected {expected} but the value was written as {entry.full_name} "
                f"(schema id {schema_id})"
            )
        body = io.BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            record = fastavro.schemaless_reader(body, entry.writer, entry.reader)
        except SchemaResolutionError as exc:
            raise SchemaError(
                f"cannot read {entry.full_name} schema id {schema_id} with the current schema: "
                f"{exc}"
            ) from exc
        except Exception as exc:  # EOFError, UnicodeDecodeError, IndexError, OverflowError, ...
            raise SchemaError(
                f"malformed Avro body for {entry.full_name} (schema id {schema_id}): "
                f"{type(exc).__name__}{f': {exc}' if str(exc) else ''}"
            ) from exc
        end = body.tell()
        if end != len(data):
            raise SchemaError(
                f"malformed Avro body for {entry.full_name} (schema id {schema_id}): "
                f"{len(data) - end} bytes left after the record"
            )
        return entry.short_name, record

    def decode_as(self, data: Buffer | None, name: str) -> dict[str, Any]:
        """The record from ``data``, which must have been written as ``name``."""
        return self.decode(data, expected=name)[1]


def _describe(schema: Any) -> str:
    """A short description of a schema node for error messages."""
    if isinstance(schema, dict):
        if schema.get("type") == "enum":
            return f"a symbol of {schema.get('name')}: {', '.join(schema.get('symbols', ()))}"
        if "logicalType" in schema:
            return f"{schema.get('type')} ({schema['logicalType']})"
        return str(schema.get("name") or schema.get("type"))
    if isinstance(schema, list):
        return " or ".join(_describe(branch) for branch in schema)
    return str(schema)


def _validation_message(exc: ValidationError) -> str:
    """One clause per bad field, naming it by its full path (union branches merged)."""
    expected: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for error in getattr(exc, "errors", None) or ():
        field = getattr(error, "field", "") or "record"
        expected.setdefault(field, []).append(_describe(getattr(error, "schema", "?")))
        got.setdefault(field, getattr(error, "datum", None))
    messages = []
    for field, schemas in expected.items():
        wanted = schemas[0] if len(schemas) == 1 else f"one of {', '.join(schemas)}"
        datum = got[field]
        if datum is None:
            messages.append(f"field {field} is missing or null (expected {wanted})")
        else:
            messages.append(
                f"field {field} is {datum!r:.80} of type {type(datum).__name__} (expected {wanted})"
            )
    return "; ".join(messages) if messages else str(exc)


def codec_from_registry_url(
    url: str | None,
    *,
    client_conf: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> AvroCodec:
    """A codec over a Confluent Schema Registry at ``url``, or over the shipped catalog if None.

    With a registry, ids are the registry's and the shipped schemas are registered (subject =
    full record name) on first use. ``client_conf``: extra ``SchemaRegistryClient`` settings
    (TLS files, basic auth: ``streams.security.registry_client_conf``); processes build their
    codec with ``streams.codecs.codec_from_settings``, which passes them.
    """
    if not url:
        return AvroCodec.default(validate=validate)
    from schemas.registry import SchemaRegistryResolver

    return AvroCodec(SchemaRegistryResolver(url, client_conf=client_conf), validate=validate)
