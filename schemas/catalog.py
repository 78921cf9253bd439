"""The schemas Sluice ships, each with a stable id that needs no registry.

An id is the first four bytes of the SHA-256 of the schema's *fingerprint form*, masked to a
positive 31-bit integer. The fingerprint form is the schema JSON with every ``doc`` removed,
keys sorted and no whitespace, so the id is the same on every run and machine, does not change
when only documentation, key order or formatting changes, and does change when anything that
affects encoding or schema resolution (a field, a type, a default, a logical type, an alias)
changes.

A catalog can hold several versions of one record (see :meth:`SchemaCatalog.add`): one is the
*current* version, used to write and as the reader schema; the others are known by id only, so
records written with them can still be read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import fastavro

from schemas.errors import SchemaError, UnknownSchemaError
from schemas.resolver import ParsedSchema

logger = logging.getLogger(__name__)

_ID_MASK = 0x7FFF_FFFF


def fingerprint_form(schema_json: Mapping[str, Any]) -> str:
    """The text the schema id is hashed from: the schema without docs, keys sorted, compact."""
    return json.dumps(
        _without_docs(schema_json), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )


def schema_id_of(schema_json: Mapping[str, Any]) -> int:
    """The stable 31-bit id of a schema (see the module docstring)."""
    digest = hashlib.sha256(fingerprint_form(schema_json).encode("ascii")).digest()
    return int.from_bytes(digest[:4], "big") & _ID_MASK


def _without_docs(node: Any) -> Any:
    """A copy of a schema node without ``doc`` attributes; defaults are kept verbatim."""
    if isinstance(node, list):
        return [_without_docs(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "doc":
            continue
        if key == "fields" and isinstance(value, list):
            out[key] = [_field_without_docs(field) for field in value]
        elif key in ("type", "items", "values"):
            out[key] = _without_docs(value)
        else:
            out[key] = value
    return out


def _field_without_docs(field: Any) -> Any:
    if not isinstance(field, Mapping):
        return field
    return {
        key: (_without_docs(value) if key == "type" else value)
        for key, value in field.items()
        if key != "doc"
    }


@dataclass(frozen=True, slots=True)
class _Entry:
    full_name: str
    short_name: str
    schema_id: int
    raw: dict[str, Any]
    parsed: ParsedSchema


class SchemaCatalog:
    """Record schemas by name and by id; satisfies :class:`~schemas.resolver.SchemaResolver`."""

    def __init__(self, schemas: Iterable[Mapping[str, Any]] = ()) -> None:
        self._by_id: dict[int, _Entry] = {}
        self._current: dict[str, _Entry] = {}  # full name -> current version
        self._short: dict[str, str] = {}  # short name -> full name
        for schema_json in schemas:
            self.add(schema_json)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def default(cls) -> SchemaCatalog:
        """A fresh catalog of the ``.avsc`` files shipped in ``schemas/avro``."""
        folder = resources.files("schemas").joinpath("avro")
        catalog = cls._from_traversables(
            [entry for entry in folder.iterdir() if entry.name.endswith(".avsc")], str(folder)
        )
        # Earlier versions of shipped records: known by id only, so what was written with
        # them stays readable (the current version of each name is the one above).
        previous = folder.joinpath("previous")
        if previous.is_dir():
            for entry in sorted(previous.iterdir(), key=lambda e: e.name):
                if entry.name.endswith(".avsc"):
                    catalog.add(json.loads(entry.read_text(encoding="utf-8")))
        return catalog

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> SchemaCatalog:
        """A catalog of every ``*.avsc`` file in ``path`` (not recursive)."""
        folder = Path(path)
        if not folder.is_dir():
            raise SchemaError(f"schema folder {folder} does not exist")
        return cls._from_traversables(list(folder.glob("*.avsc")), str(folder))

    @classmethod
    def _from_traversables(cls, files: list[Traversable], where: str) -> SchemaCatalog:
        if not files:
            raise SchemaError(f"no .avsc files in {where}")
        catalog = cls()
        for file in sorted(files, key=lambda f: f.name):
            try:
                schema_json = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise SchemaError(f"cannot read schema file {file.name}: {exc}") from exc
            try:
                catalog.add(schema_json)
            except SchemaError as exc:
                raise SchemaError(f"schema file {file.name}: {exc}") from exc
        logger.debug("loaded %d schemas from %s", len(files), where)
        return catalog

    def add(self, schema_json: Mapping[str, Any], *, make_current: bool = False) -> int:
        """Add a record schema and return its id.

        A record name seen for the first time becomes current. A new version of a known name is
        known by id only (readable, and resolved to the current version when read) unless
        ``make_current`` is true. Adding a schema that is already here is a no-op.
        """
        if not isinstance(schema_json, Mapping) or schema_json.get("type") not in (
            "record",
            "error",
        ):
            raise SchemaError("a catalog schema must be a JSON object of type record")
        raw = copy.deepcopy(dict(schema_json))
        try:
            parsed = fastavro.parse_schema(raw)
        except Exception as exc:  # fastavro raises several unrelated types here
            raise SchemaError(f"invalid Avro schema: {exc}") from exc
        full_name: str = parsed["name"]
        short_name = full_name.rsplit(".", 1)[-1]
        schema_id = schema_id_of(raw)

        existing = self._by_id.get(schema_id)
        if existing is not None:
            if fingerprint_form(existing.raw) != fingerprint_form(raw):
                raise SchemaError(
                    f"schema id collision: {full_name} and {existing.full_name} both hash to "
                    f"{schema_id}"
                )
            if make_current:
                self._current[full_name] = existing
            return schema_id

        known_full = self._short.get(short_name)
        if known_full is not None and known_full != full_name:
            raise SchemaError(
                f"short name {short_name!r} is already used by {known_full}; "
                f"cannot also add {full_name}"
            )
        entry = _Entry(full_name, short_name, schema_id, raw, parsed)
        self._by_id[schema_id] = entry
        self._short[short_name] = full_name
        if make_current or full_name not in self._current:
            self._current[full_name] = entry
        logger.debug("catalog: %s has id %d", full_name, schema_id)
        return schema_id

    # -- lookups --------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        entry = self._current.get(name)
        if entry is None:
            full = self._short.get(name)
            entry = self._current.get(full) if full is not None else None
        if entry is None:
            raise UnknownSchemaError(f"no schema named {name!r} in the catalog")
        return entry

    def names(self) -> list[str]:
        """Short names of the records in the catalog, sorted."""
        return sorted(entry.short_name for entry in self._current.values())

    def full_name(self, name: str) -> str:
        """The full record name for a short or full ``name``."""
        return self._entry(name).full_name

    def raw(self, name: str) -> dict[str, Any]:
        """A copy of the current schema JSON of ``name``."""
        return copy.deepcopy(self._entry(name).raw)

    def parsed(self, name: str) -> ParsedSchema:
        """The current fastavro-parsed schema of ``name`` (shared; do not mutate)."""
        return self._entry(name).parsed

    def schema_id(self, name: str) -> int:
        """The id of the current schema of ``name``."""
        return self._entry(name).schema_id

    def by_id(self, schema_id: int) -> tuple[str, ParsedSchema]:
        """``(full record name, parsed schema)`` of any version added, by id."""
        entry = self._by_id.get(schema_id)
        if entry is None:
            raise UnknownSchemaError(f"schema id {schema_id} is not in the catalog")
        return entry.full_name, entry.parsed

    def ids(self) -> dict[int, str]:
        """Every known id, with its full record name."""
        return {schema_id: entry.full_name for schema_id, entry in self._by_id.items()}

    # -- SchemaResolver -------------------------------------------------------------------------

    def id_for(self, name: str) -> int:
        """Same as :meth:`schema_id`."""
        return self.schema_id(name)

    def schema_for_id(self, schema_id: int) -> tuple[str, ParsedSchema]:
        """Same as :meth:`by_id`."""
        return self.by_id(schema_id)

    def __repr__(self) -> str:
        return f"SchemaCatalog({', '.join(self.names())})"
