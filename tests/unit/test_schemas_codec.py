"""AvroCodec: round trips, Confluent framing, the reference Avro decoder, and every error path."""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
from typing import Any

import avro.io
import avro.schema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    AvroCodec,
    NotFramedError,
    SchemaCatalog,
    SchemaError,
    SluiceError,
    UnknownSchemaError,
    WrongSchemaError,
)

RECORDS = ["InferenceRequest", "InferenceResult", "DeadLetter", "FeedbackEvent"]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# The millisecond range a datetime can hold (years 1 to 9999): the reference decoder turns
# timestamp-millis into datetimes, so values it is shown must fit.
DATETIME_MILLIS = (-62_135_596_800_000, 253_402_300_799_999)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

CATALOG = SchemaCatalog.default()
CODEC = AvroCodec(CATALOG)
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- strategies built from the schema JSON -----------------------------------------------------


def values_for(
    schema: Any, named: dict[str, Any], *, ts_range: tuple[int, int]
) -> st.SearchStrategy:
    """Valid Avro values for ``schema`` (the raw JSON); every field is always present."""
    if isinstance(schema, list):
        return st.one_of([values_for(branch, named, ts_range=ts_range) for branch in schema])
    if isinstance(schema, str):
        primitive = {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(*INT32),
            "long": st.integers(*INT64),
            "float": st.floats(width=32, allow_nan=False),
            "double": st.floats(allow_nan=False),
            "string": st.text(),
            "bytes": st.binary(),
        }.get(schema)
        if primitive is not None:
            return primitive
        return values_for(named[schema], named, ts_range=ts_range)
    kind = schema["type"]
    if schema.get("logicalType") == "timestamp-millis":
        return st.integers(*ts_range)
    if kind == "record":
        named[schema["name"]] = schema
        return st.fixed_dictionaries(
            {
                field["name"]: values_for(field["type"], named, ts_range=ts_range)
                for field in schema["fields"]
            }
        )
    if kind == "enum":
        named[schema["name"]] = schema
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(values_for(schema["items"], named, ts_range=ts_range), max_size=5)
    if kind == "map":
        return st.dictionaries(
            st.text(), values_for(schema["values"], named, ts_range=ts_range), max_size=5
        )
    return values_for(kind, named, ts_range=ts_range)


def records(name: str, *, ts_range: tuple[int, int] = INT64) -> st.SearchStrategy:
    return values_for(CATALOG.raw(name), {}, ts_range=ts_range)


def reference_decode(name: str, body: bytes) -> dict[str, Any]:
    """Decode a schemaless body with the Apache Avro reference implementation."""
    schema = avro.schema.parse(json.dumps(CATALOG.raw(name)))
    return avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(body)))


def reference_encode(name: str, record: dict[str, Any]) -> bytes:
    schema = avro.schema.parse(json.dumps(CATALOG.raw(name)))
    out = io.BytesIO()
    avro.io.DatumWriter(schema).write(record, avro.io.BinaryEncoder(out))
    return out.getvalue()


def millis_to_datetimes(record: dict[str, Any]) -> dict[str, Any]:
    """What the reference decoder returns for ``record``: created_at as an aware datetime."""
    return {**record, "created_at": EPOCH + dt.timedelta(milliseconds=record["created_at"])}


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECORDS)
@FAST
@given(data=st.data())
def test_round_trip(name: str, data: st.DataObject) -> None:
    record = data.draw(records(name))
    encoded = CODEC.encode(name, record)
    assert CODEC.decode(encoded) == (name, record)
    assert CODEC.decode_as(encoded, name) == record
    assert CODEC.decode_as(encoded, f"dev.sluice.{name}") == record


@pytest.mark.parametrize("name", RECORDS)
@FAST
@given(data=st.data())
def test_reference_avro_reads_our_bytes_and_we_read_its(name: str, data: st.DataObject) -> None:
    record = data.draw(records(name, ts_range=DATETIME_MILLIS))
    encoded = CODEC.encode(name, record)
    body = encoded[5:]
    assert reference_decode(name, body) == millis_to_datetimes(record)
    theirs = reference_encode(name, millis_to_datetimes(record))
    assert theirs == body
    assert CODEC.decode_as(CODEC.header(name) + theirs, name) == record


def test_frame_is_magic_byte_then_big_endian_schema_id() -> None:
    encoded = CODEC.encode("FeedbackEvent", {"request_id": "r", "score": 1})
    magic, schema_id = struct.unpack(">bI", encoded[:5])
    assert magic == 0
    assert schema_id == CATALOG.schema_id("FeedbackEvent")
    assert CODEC.header("FeedbackEvent") == encoded[:5]


def test_timestamps_stay_epoch_millis_ints() -> None:
    millis = 1_700_000_000_123
    record = CODEC.decode_as(
        CODEC.encode("InferenceRequest", {"request_id": "r", "prompt": "p", "created_at": millis}),
        "InferenceRequest",
    )
    assert record["created_at"] == millis
    assert type(record["created_at"]) is int


def test_missing_fields_with_defaults_get_them() -> None:
    record = CODEC.decode_as(
        CODEC.encode("InferenceRequest", {"request_id": "r1", "prompt": "hello"}),
        "InferenceRequest",
    )
    assert record == {
        "request_id": "r1",
        "model": "default",
        "prompt": "hello",
        "system": None,
        "raw": False,
        "sampling": {
            "max_new_tokens": 64,
            "temperature": 0.0,
            "top_p": 1.0,
            "stop": [],
            "seed": None,
        },
        "priority": 0,
        "deadline_ms": None,
        "tenant": None,
        "created_at": 0,
        "metadata": {},
    }


def test_decode_accepts_bytearray_and_memoryview() -> None:
    encoded = CODEC.encode("FeedbackEvent", {"request_id": "r", "score": -1})
    expected = CODEC.decode(encoded)
    assert CODEC.decode(bytearray(encoded)) == expected
    assert CODEC.decode(memoryview(encoded)) == expected


def test_default_codec_and_registry_factory_without_url() -> None:
    from schemas import codec_from_registry_url

    for codec in (AvroCodec.default(), codec_from_registry_url(None), codec_from_registry_url("")):
        assert isinstance(codec.resolver, SchemaCatalog)
        assert codec.header("InferenceResult") == CODEC.header("InferenceResult")


# -- encode errors ----------------------------------------------------------------------------

GOOD_REQUEST = {"request_id": "r", "prompt": "p"}


@pytest.mark.parametrize(
    ("changes", "field", "writer_catches"),
    [
        ({"prompt": None}, "prompt", True),
        ({"prompt": 3}, "prompt", True),
        ({"priority": 1.5}, "priority", False),  # fastavro would write 1
        ({"priority": True}, "priority", False),  # ... and 1 here
        ({"priority": 2**31}, "priority", False),  # ... and a varint Java rejects
        ({"deadline_ms": 2**63}, "deadline_ms", True),
        ({"raw": "false"}, "raw", False),  # ... and true
        ({"sampling": {"temperature": "hot"}}, "temperature", True),
        ({"sampling": {"stop": "stop"}}, "stop", False),  # ... and ["s", "t", "o", "p"]
        ({"sampling": {"stop": ["ok", 3]}}, "stop", True),
        ({"sampling": {"seed": "x"}}, "seed", True),
        ({"metadata": {"k": 1}}, "metadata", True),
        ({"metadata": [("k", "v")]}, "metadata", True),
        ({"promt": "typo"}, "promt", True),
        ({"sampling": {"temprature": 0.5}}, "temprature", True),
    ],
)
@pytest.mark.parametrize("validate", [True, False])
def test_bad_records_raise_schema_error_naming_the_field(
    changes: dict[str, Any], field: str, writer_catches: bool, validate: bool
) -> None:
    codec = AvroCodec(CATALOG, validate=validate)
    record = {**GOOD_REQUEST, **changes}
    if not validate and not writer_catches:
        codec.encode("InferenceRequest", record)  # documented: only validate=True catches it
        return
    with pytest.raises(SchemaError) as caught:
        codec.encode("InferenceRequest", record)
    assert type(caught.value) is SchemaError
    assert field in str(caught.value)
    assert str(caught.value).startswith("cannot encode InferenceRequest")


def test_missing_required_field_is_named() -> None:
    with pytest.raises(SchemaError, match=r"InferenceRequest\.prompt is missing"):
        CODEC.encode("InferenceRequest", {"request_id": "r"})


def test_bad_enum_symbol_lists_the_symbols() -> None:
    with pytest.raises(SchemaError, match="status.*OK, ERROR, EXPIRED, REJECTED"):
        CODEC.encode("InferenceResult", {"request_id": "r", "model": "m", "status": "FINE"})


@pytest.mark.parametrize("validate", [True, False])
def test_not_a_mapping(validate: bool) -> None:
    with pytest.raises(SchemaError, match="cannot encode FeedbackEvent"):
        AvroCodec(CATALOG, validate=validate).encode("FeedbackEvent", ["request_id", "r"])  # type: ignore[arg-type]


def test_unknown_record_name() -> None:
    with pytest.raises(UnknownSchemaError):
        CODEC.encode("NoSuchRecord", {})


# -- decode errors ------------------------------------------------------------------------------

FEEDBACK = CODEC.encode("FeedbackEvent", {"request_id": "r", "score": 1, "label": "good"})


@pytest.mark.parametrize(
    "data",
    [None, b"", b"\x00", b"\x00\x01\x02\x03", b"\x01" + FEEDBACK[1:], b'{"json": true}'],
    ids=["none", "empty", "one-byte", "short-header", "magic-1", "json"],
)
def test_not_framed(data: bytes | None) -> None:
    with pytest.raises(NotFramedError, match="not Confluent-framed Avro") as caught:
        CODEC.decode(data)
    assert caught.value.reason_code == "undecodable"


def test_unknown_schema_id() -> None:
    unknown = max(CATALOG.ids()) + 1
    with pytest.raises(UnknownSchemaError, match=str(unknown)) as caught:
        CODEC.decode(struct.pack(">bI", 0, unknown) + FEEDBACK[5:])
    assert caught.value.reason_code == "unknown_schema"


def test_wrong_schema() -> None:
    with pytest.raises(WrongSchemaError, match="expected InferenceRequest") as caught:
        CODEC.decode(FEEDBACK, expected="InferenceRequest")
    assert caught.value.reason_code == "wrong_schema"
    with pytest.raises(WrongSchemaError):
        CODEC.decode_as(FEEDBACK, "dev.sluice.InferenceRequest")


@pytest.mark.parametrize("cut", range(5, len(FEEDBACK)))
def test_truncated_body(cut: int) -> None:
    with pytest.raises(SchemaError, match="malformed Avro body") as caught:
        CODEC.decode(FEEDBACK[:cut])
    assert type(caught.value) is SchemaError
    assert caught.value.reason_code == "undecodable"


def test_trailing_bytes() -> None:
    with pytest.raises(SchemaError, match="malformed Avro body.*1 bytes left"):
        CODEC.decode(FEEDBACK + b"\x00")


@pytest.mark.parametrize(
    "body",
    [
        b"\xff" * 12,  # a varint that never ends
        b"\x05abc",  # negative string length
        b"\x04\xff\xfe",  # invalid UTF-8
        b"\x02r\x02\x09",  # union branch 4 of 2 (label)
        b"\x02r\x02\x00\x00\x00\x00\x00\xfe\xff\xff\xff\xff\xff\xff\xff\x7f",  # 2**62 map entries
    ],
    ids=["endless-varint", "negative-length", "bad-utf8", "bad-union-index", "huge-block"],
)
def test_garbage_body(body: bytes) -> None:
    with pytest.raises(SchemaError, match="malformed Avro body") as caught:
        CODEC.decode(CODEC.header("FeedbackEvent") + body)
    assert type(caught.value) is SchemaError


@pytest.mark.parametrize("name", RECORDS)
@FAST
@given(body=st.binary(max_size=64))
def test_any_body_decodes_or_raises_schema_error(name: str, body: bytes) -> None:
    try:
        decoded_name, record = CODEC.decode(CODEC.header(name) + body)
    except SchemaError as exc:
        assert type(exc) is SchemaError
        assert "malformed Avro body" in str(exc)
    else:
        assert decoded_name == name
        assert isinstance(record, dict)


@FAST
@given(data=st.binary(max_size=64))
def test_any_bytes_decode_or_raise_a_sluice_error(data: bytes) -> None:
    try:
        CODEC.decode(data)
    except SluiceError:
        pass


def test_recursive_and_fixed_test_only_schema() -> None:
    """The pre-write checks handle named-type references, recursion, fixed and bytes."""
    catalog = SchemaCatalog()
    catalog.add(
        {
            "type": "record",
            "name": "Node",
            "namespace": "test",
            "fields": [
                {"name": "tag", "type": {"type": "fixed", "name": "Tag", "size": 2}},
                {"name": "blob", "type": "bytes"},
                {"name": "next", "type": ["null", "Node"], "default": None},
                {"name": "children", "type": {"type": "array", "items": "Node"}, "default": []},
            ],
        }
    )
    codec = AvroCodec(catalog)
    leaf = {"tag": b"ab", "blob": b"", "next": None, "children": []}
    tree = {"tag": b"xy", "blob": b"\x00\xff", "next": leaf, "children": [leaf, leaf]}
    assert codec.decode(codec.encode("Node", tree)) == ("Node", tree)
    with pytest.raises(SchemaError, match=r"Node\.children\[1\]\.tag"):
        codec.encode("Node", {**tree, "children": [leaf, {**leaf, "tag": b"abc"}]})
    with pytest.raises(SchemaError, match=r"Node\.blob"):
        codec.encode("Node", {**tree, "blob": "text"})
