"""SchemaCatalog: loading, lookups, and ids that are stable without a registry."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from schemas import SchemaCatalog, SchemaError, UnknownSchemaError
from schemas.resolver import SchemaResolver

SHIPPED = Path(__file__).resolve().parents[2] / "schemas" / "avro"
RECORDS = [
    "ControlCommand",
    "DeadLetter",
    "FeedbackEvent",
    "InferenceRequest",
    "InferenceResult",
    "MetricsWindow",
    "TrainingExample",
]


def test_default_loads_every_shipped_schema() -> None:
    catalog = SchemaCatalog.default()
    assert catalog.names() == RECORDS
    assert sorted(path.stem for path in SHIPPED.glob("*.avsc")) == RECORDS
    for name in RECORDS:
        full = f"dev.sluice.{name}"
        assert catalog.full_name(name) == full
        assert catalog.parsed(name) is catalog.parsed(full)
        assert catalog.parsed(name)["name"] == full
        assert catalog.schema_id(name) == catalog.schema_id(full) == catalog.id_for(name)
        assert catalog.by_id(catalog.schema_id(name)) == (full, catalog.parsed(name))
        assert catalog.schema_for_id(catalog.schema_id(name)) == catalog.by_id(
            catalog.schema_id(name)
        )
        assert catalog.raw(name) == json.loads((SHIPPED / f"{name}.avsc").read_text())


def test_ids_are_positive_31_bit_and_distinct() -> None:
    ids = [SchemaCatalog.default().schema_id(name) for name in RECORDS]
    assert len(set(ids)) == len(ids)
    assert all(0 <= schema_id < 2**31 for schema_id in ids)


def test_ids_are_stable_across_instances_paths_and_formatting(tmp_path: Path) -> None:
    first, second = SchemaCatalog.default(), SchemaCatalog.default()
    for name in RECORDS:
        raw = first.raw(name)
        reordered = dict(reversed(list(raw.items())))  # same schema, other key order
        (tmp_path / f"{name}.avsc").write_text(json.dumps(reordered, indent=7))
    from_copy = SchemaCatalog.from_dir(tmp_path)
    for name in RECORDS:
        assert first.schema_id(name) == second.schema_id(name) == from_copy.schema_id(name)


def test_ids_are_stable_across_interpreters() -> None:
    """A fresh process with another hash seed derives the same ids."""
    script = (
        "import json; from schemas import SchemaCatalog; c = SchemaCatalog.default(); "
        "print(json.dumps({n: c.schema_id(n) for n in c.names()}))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env
    ).stdout
    catalog = SchemaCatalog.default()
    assert json.loads(out) == {name: catalog.schema_id(name) for name in RECORDS}


def _with(raw: dict[str, Any], field: str, **changes: Any) -> dict[str, Any]:
    changed = copy.deepcopy(raw)
    for spec in changed["fields"]:
        if spec["name"] == field:
            spec.update(changes)
    return changed


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: {**raw, "fields": [*raw["fields"], {"name": "x", "type": "int", "default": 0}]},
        lambda raw: _with(raw, "priority", type="long"),
        lambda raw: _with(raw, "priority", default=5),
        lambda raw: _with(raw, "created_at", type="long"),  # logical type dropped
        lambda raw: _with(raw, "tenant", aliases=["org"]),
        lambda raw: {**raw, "name": "InferenceRequest2"},
    ],
    ids=["new-field", "type", "default", "logical-type", "alias", "name"],
)
def test_a_changed_schema_gets_another_id(change: Any) -> None:
    catalog = SchemaCatalog.default()
    raw = catalog.raw("InferenceRequest")
    changed = change(raw)
    assert changed != raw
    new_id = catalog.add(changed)
    assert new_id != catalog.schema_id("InferenceRequest")
    assert catalog.by_id(new_id)[1]["name"].startswith("dev.sluice.InferenceRequest")


def test_docs_do_not_change_the_id() -> None:
    catalog = SchemaCatalog.default()
    raw = catalog.raw("InferenceRequest")
    redocumented = _with({**raw, "doc": "other words"}, "prompt", doc="the prompt")
    assert catalog.add(redocumented) == catalog.schema_id("InferenceRequest")


def test_add_versions_and_make_current() -> None:
    catalog = SchemaCatalog.default()
    old_id = catalog.schema_id("FeedbackEvent")
    raw = catalog.raw("FeedbackEvent")
    new = {**raw, "fields": [*raw["fields"], {"name": "v", "type": "int", "default": 2}]}
    new_id = catalog.add(new)
    assert catalog.schema_id("FeedbackEvent") == old_id  # known by id only
    assert catalog.by_id(new_id)[0] == "dev.sluice.FeedbackEvent"
    assert catalog.add(new) == new_id  # idempotent
    assert catalog.add(new, make_current=True) == new_id
    assert catalog.schema_id("FeedbackEvent") == new_id
    assert catalog.by_id(old_id)[0] == "dev.sluice.FeedbackEvent"  # old version still readable
    assert catalog.names() == RECORDS


def test_a_new_record_name_becomes_current() -> None:
    catalog = SchemaCatalog()
    schema_id = catalog.add(
        {
            "type": "record",
            "name": "Ping",
            "namespace": "t",
            "fields": [{"name": "n", "type": "int"}],
        }
    )
    assert catalog.names() == ["Ping"]
    assert catalog.schema_id("t.Ping") == schema_id
    assert isinstance(catalog, SchemaResolver)


def test_raw_is_a_copy() -> None:
    catalog = SchemaCatalog.default()
    catalog.raw("InferenceRequest")["fields"].clear()
    assert catalog.raw("InferenceRequest")["fields"]


def test_unknown_names_and_ids() -> None:
    catalog = SchemaCatalog.default()
    for lookup in (catalog.parsed, catalog.schema_id, catalog.raw, catalog.full_name):
        with pytest.raises(UnknownSchemaError, match="Nope"):
            lookup("Nope")
    with pytest.raises(UnknownSchemaError, match="12345") as caught:
        catalog.by_id(12345)
    assert caught.value.reason_code == "unknown_schema"


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "enum", "name": "E", "symbols": ["A"]}, "record"),
        ("string", "record"),
        ({"type": "record", "name": "R", "fields": [{"name": "a", "type": "nope"}]}, "invalid"),
        ({"type": "record", "name": "R", "fields": [{"name": "a"}]}, "invalid"),
    ],
)
def test_add_rejects_what_is_not_a_valid_record_schema(schema: Any, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        SchemaCatalog().add(schema)


def test_short_name_clash_across_namespaces() -> None:
    catalog = SchemaCatalog.default()
    raw = {**catalog.raw("FeedbackEvent"), "namespace": "other"}
    with pytest.raises(SchemaError, match="already used by dev.sluice.FeedbackEvent"):
        catalog.add(raw)


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        SchemaCatalog.from_dir(tmp_path / "missing")
    with pytest.raises(SchemaError, match=r"no \.avsc files"):
        SchemaCatalog.from_dir(tmp_path)
    (tmp_path / "Broken.avsc").write_text("{not json")
    with pytest.raises(SchemaError, match=r"Broken\.avsc"):
        SchemaCatalog.from_dir(tmp_path)
    (tmp_path / "Broken.avsc").write_text('{"type": "record", "name": "B", "fields": [{}]}')
    with pytest.raises(SchemaError, match=r"Broken\.avsc"):
        SchemaCatalog.from_dir(tmp_path)
