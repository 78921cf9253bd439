"""Schema evolution: records written with one version of InferenceRequest read with another."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import AvroCodec, SchemaCatalog, SchemaError, UnknownSchemaError

NEW_FIELDS = [
    {"name": "trace_id", "type": ["null", "string"], "default": None},
    {"name": "labels", "type": {"type": "array", "items": "string"}, "default": ["none"]},
]


def new_version() -> dict[str, Any]:
    """InferenceRequest v2: two new fields with defaults, one of them in the middle."""
    raw = copy.deepcopy(SchemaCatalog.default().raw("InferenceRequest"))
    fields = raw["fields"]
    fields.insert(3, NEW_FIELDS[0])
    fields.append(NEW_FIELDS[1])
    return raw


def old_side() -> tuple[SchemaCatalog, int]:
    """A consumer still on v1 that has learnt v2's id (a registry would tell it)."""
    catalog = SchemaCatalog.default()
    return catalog, catalog.add(new_version())


def new_side() -> tuple[SchemaCatalog, int]:
    """A producer/consumer on v2 that still knows v1."""
    catalog = SchemaCatalog.default()
    old_id = catalog.schema_id("InferenceRequest")
    catalog.add(new_version(), make_current=True)
    return catalog, old_id


requests = st.fixed_dictionaries(
    {
        "request_id": st.text(min_size=1),
        "prompt": st.text(),
        "tenant": st.none() | st.text(),
        "priority": st.integers(-(2**31), 2**31 - 1),
        "metadata": st.dictionaries(st.text(), st.text(), max_size=3),
        "sampling": st.fixed_dictionaries(
            {"temperature": st.floats(0, 2, width=32), "stop": st.lists(st.text(), max_size=3)}
        ),
    }
)


@settings(deadline=None)
@given(record=requests, trace_id=st.none() | st.text(), labels=st.lists(st.text(), max_size=3))
def test_old_reader_reads_new_records(
    record: dict[str, Any], trace_id: str | None, labels: list[str]
) -> None:
    new_catalog, _ = new_side()
    old_catalog, new_id = old_side()
    writer, reader = AvroCodec(new_catalog), AvroCodec(old_catalog)

    encoded = writer.encode("InferenceRequest", {**record, "trace_id": trace_id, "labels": labels})
    assert int.from_bytes(encoded[1:5], "big") == new_id
    name, decoded = reader.decode(encoded, expected="InferenceRequest")

    assert name == "InferenceRequest"
    assert "trace_id" not in decoded and "labels" not in decoded
    assert decoded == reader.decode(reader.encode("InferenceRequest", record))[1]


@settings(deadline=None)
@given(record=requests)
def test_new_reader_reads_old_records_with_defaults(record: dict[str, Any]) -> None:
    new_catalog, old_id = new_side()
    writer, reader = AvroCodec.default(), AvroCodec(new_catalog)

    encoded = writer.encode("InferenceRequest", record)
    assert int.from_bytes(encoded[1:5], "big") == old_id
    decoded = reader.decode_as(encoded, "InferenceRequest")

    assert decoded["trace_id"] is None
    assert decoded["labels"] == ["none"]
    without_new = {k: v for k, v in decoded.items() if k not in ("trace_id", "labels")}
    assert without_new == writer.decode_as(encoded, "InferenceRequest")
    assert set(decoded) == {field["name"] for field in new_version()["fields"]}


def test_a_reader_that_never_saw_the_new_version_cannot_read_it() -> None:
    """Without a registry, ids of versions a consumer was not given are unknown to it."""
    new_catalog, _ = new_side()
    encoded = AvroCodec(new_catalog).encode("InferenceRequest", {"request_id": "r", "prompt": "p"})
    with pytest.raises(UnknownSchemaError):
        AvroCodec.default().decode(encoded)


def test_incompatible_new_version_is_a_schema_error() -> None:
    """A new required field without a default cannot be filled in for old records."""
    raw = copy.deepcopy(SchemaCatalog.default().raw("InferenceRequest"))
    raw["fields"].append({"name": "required_now", "type": "string"})
    catalog = SchemaCatalog.default()
    catalog.add(raw, make_current=True)
    encoded = AvroCodec.default().encode("InferenceRequest", {"request_id": "r", "prompt": "p"})
    with pytest.raises(SchemaError, match="cannot read .*InferenceRequest") as caught:
        AvroCodec(catalog).decode(encoded)
    assert caught.value.reason_code == "undecodable"


def test_type_promotion_int_to_long() -> None:
    """Avro's int -> long promotion works through the resolver too."""
    raw = copy.deepcopy(SchemaCatalog.default().raw("InferenceRequest"))
    for field in raw["fields"]:
        if field["name"] == "priority":
            field["type"] = "long"
    catalog = SchemaCatalog.default()
    catalog.add(raw, make_current=True)
    encoded = AvroCodec.default().encode(
        "InferenceRequest", {"request_id": "r", "prompt": "p", "priority": -7}
    )
    assert AvroCodec(catalog).decode_as(encoded, "InferenceRequest")["priority"] == -7
