"""Replay's pure parts: times, flattening, dedup, filters, writers (no broker)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from connectors.replay import (
    ReplayError,
    ReplayRow,
    dedup_last,
    flatten,
    format_for,
    jsonable,
    parse_time,
    row_matches,
    write_jsonl,
    write_parquet,
)
from schemas.codec import AvroCodec

NOW = 1_795_420_800_000  # 2026-11-23T08:00:00Z


# -- parse_time -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23T08:00:00Z", NOW),
        ("2026-11-23T08:00:00z", NOW),
        ("2026-11-23T09:00:00+01:00", NOW),
        ("2026-11-23T08:00:00.250Z", NOW + 250),
        ("2026-11-23T08:00", NOW),  # no offset: UTC
        ("2026-11-23 08:00:00", NOW),
        ("2026-11-23", NOW - 8 * 3_600_000),
        (str(NOW), NOW),
        ("0", 0),
        ("now", NOW),
        (" NOW ", NOW),
        ("-15m", NOW - 15 * 60_000),
        ("-2h", NOW - 2 * 3_600_000),
        ("-1d", NOW - 86_400_000),
        ("-30s", NOW - 30_000),
        ("-1w", NOW - 7 * 86_400_000),
        ("-500ms", NOW - 500),
        ("-1.5h", NOW - 5_400_000),
        ("now-90m", NOW - 90 * 60_000),
        ("+5m", NOW + 300_000),
    ],
)
def test_parse_time(text: str, expected: int) -> None:
    assert parse_time(text, now_ms=NOW) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty time"),
        ("yesterday", "expected ISO-8601"),
        ("2026-13-45", "expected ISO-8601"),
        ("-15", "relative times need a unit"),
        ("15m", "needs a sign: -15m means 15m ago"),
        ("-3y", "unknown unit 'y'"),
        ("-2 months", "unknown unit 'months'"),
        ("1795420800", "epoch seconds\\? use 1795420800000"),
    ],
)
def test_parse_time_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_time(text, now_ms=NOW)


def test_parse_time_uses_the_clock() -> None:
    import time

    before = int(time.time() * 1000)
    assert before - 60_000 - 5_000 <= parse_time("-1m") <= int(time.time() * 1000) - 60_000


# -- flattening and JSON ------------------------------------------------------------------------

RESULT = {
    "request_id": "r1",
    "model": "m",
    "model_version": "v1",
    "status": "OK",
    "text": "hi",
    "finish_reason": "stop",
    "prompt_tokens": 3,
    "completion_tokens": 1,
    "timings": {"queue_ms": 1.0, "batch_wait_ms": 2.0, "inference_ms": 3.0, "total_ms": 6.0},
    "batch_size": 1,
    "worker": "w",
    "error": None,
    "created_at": NOW,
}


def test_flatten_with_schema_flattens_records_only() -> None:
    codec = AvroCodec.default()
    flat = flatten(RESULT, codec.resolver.parsed("InferenceResult"))
    assert flat["timings_total_ms"] == 6.0 and flat["timings_queue_ms"] == 1.0
    assert "timings" not in flat
    assert flat["created_at"] == NOW and flat["error"] is None
    feedback = {"request_id": "r", "score": 1, "metadata": {"a": "b"}, "created_at": 0}
    flat = flatten(feedback, codec.resolver.parsed("FeedbackEvent"))
    assert flat["metadata"] == {"a": "b"}  # a map stays a value
    assert flat["label"] is None  # missing optional fields become null columns


def test_flatten_without_schema_flattens_every_dict() -> None:
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": [1], "f": {}}) == {
        "a_b_c": 1,
        "a_d": 2,
        "e": [1],
        "f": {},
    }
    assert flatten({"a": {"b": 1}}, sep=".") == {"a.b": 1}


def test_flatten_nullable_nested_record() -> None:
    schema = {
        "type": "record",
        "name": "Outer",
        "fields": [
            {"name": "x", "type": "int"},
            {
                "name": "inner",
                "type": [
                    "null",
                    {"type": "record", "name": "Inner", "fields": [{"name": "y", "type": "int"}]},
                ],
            },
            {"name": "again", "type": ["null", "Inner"]},
        ],
    }
    assert flatten({"x": 1, "inner": None, "again": {"y": 5}}, schema) == {
        "x": 1,
        "inner_y": None,
        "again_y": 5,
    }


def test_jsonable_base64_bytes() -> None:
    assert jsonable({"k": b"\x00\xff", "l": [b"ab"], "n": None}) == {
        "k": "AP8=",
        "l": ["YWI="],
        "n": None,
    }


# -- dedup and filters ------------------------------------------------------------------------


def row(partition: int, offset: int, record: dict, ts: int = 0, tombstone: bool = False):
    return ReplayRow("t", partition, offset, ts, "FeedbackEvent", record, tombstone)


def test_dedup_keeps_the_last_per_request_id() -> None:
    rows = [
        row(0, 0, {"request_id": "a", "score": 1}),
        row(0, 1, {"request_id": "b", "score": 1}),
        row(0, 2, {"request_id": "a", "score": -1}),  # a correction: supersedes offset 0
        row(1, 0, {"request_id": "c", "score": 0}),
        row(0, 3, {"reason_code": "undecodable"}),  # no request_id: always kept
        row(0, 4, {"reason_code": "undecodable"}),
    ]
    kept, dropped = dedup_last(rows)
    assert dropped == 1
    assert [(r.partition, r.offset) for r in kept] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]
    assert next(r for r in kept if r.record.get("request_id") == "a").record["score"] == -1


def test_dedup_order_does_not_matter_within_a_partition() -> None:
    rows = [row(0, 5, {"request_id": "a", "v": 2}), row(0, 3, {"request_id": "a", "v": 1})]
    kept, dropped = dedup_last(rows)
    assert dropped == 1 and kept[0].record["v"] == 2


def test_dedup_across_partitions_later_timestamp_wins() -> None:
    rows = [row(1, 0, {"request_id": "a", "v": 1}, ts=200), row(0, 9, {"request_id": "a"}, ts=100)]
    kept, _ = dedup_last(rows)
    assert kept[0].record["v"] == 1


def test_dedup_tombstones_delete_their_key() -> None:
    rows = [
        row(0, 0, {"request_id": "a"}),
        row(0, 1, {"request_id": "a"}),
        row(0, 2, {"request_id": "a"}, tombstone=True),
        row(0, 3, {"request_id": "b"}, tombstone=True),
        row(0, 4, {"request_id": "b", "v": 1}),  # written again after its deletion
    ]
    kept, dropped = dedup_last(rows)
    assert [(r.offset, r.record) for r in kept] == [(4, {"request_id": "b", "v": 1})]
    assert dropped == 2  # both records of a; tombstones are not counted as records


@pytest.mark.parametrize(
    ("record", "kwargs", "expected"),
    [
        ({"score": 1}, {}, True),
        ({"score": 1}, {"min_score": 1}, True),
        ({"score": 0}, {"min_score": 1}, False),
        ({"score": -1}, {"max_score": 0}, True),
        ({"score": 1}, {"min_score": -1, "max_score": 0}, False),
        ({"text": "x"}, {"min_score": -1}, False),  # no score field
        ({"model_version": "v2"}, {"model_version": "v2"}, True),
        ({"model_version": "v1"}, {"model_version": "v2"}, False),
        ({"score": 1}, {"model_version": "v2"}, False),  # no model_version field
        ({"model_version": "v2", "score": 1}, {"model_version": "v2", "min_score": 1}, True),
    ],
)
def test_row_matches(record: dict, kwargs: dict, expected: bool) -> None:
    assert row_matches(record, **kwargs) is expected


def test_format_for() -> None:
    assert format_for(Path("x.jsonl")) == "jsonl"
    assert format_for(Path("x.NDJSON")) == "jsonl"
    assert format_for(Path("x.parquet")) == "parquet"
    assert format_for(Path("x.out"), "parquet") == "parquet"
    with pytest.raises(ReplayError, match="cannot tell the format"):
        format_for(Path("x.csv"))
    with pytest.raises(ReplayError, match="unknown format"):
        format_for(Path("x.jsonl"), "csv")  # type: ignore[arg-type]


# -- writers ----------------------------------------------------------------------------------


def test_write_jsonl(tmp_path: Path) -> None:
    dead = {"reason_code": "undecodable", "original_value": b"\x01\x02", "request_id": None}
    rows = [
        ReplayRow("llm.results", 2, 7, NOW, "InferenceResult", RESULT),
        ReplayRow("llm.requests.dlq", 0, 1, NOW + 1, "DeadLetter", dead),
    ]
    path = tmp_path / "out.jsonl"
    assert write_jsonl(rows, path) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(lines[0])[:5] == ["_topic", "_partition", "_offset", "_timestamp_ms", "_schema"]
    assert lines[0]["_partition"] == 2 and lines[0]["_offset"] == 7
    assert lines[0]["timings"]["total_ms"] == 6.0  # nested stays nested in JSON
    assert lines[1]["original_value"] == "AQI="


def test_write_parquet_typed_and_flat(tmp_path: Path) -> None:
    codec = AvroCodec.default()
    other = dict(RESULT, request_id="r2", timings={"total_ms": 1.5}, error="boom")
    rows = [
        ReplayRow("llm.results", 0, 0, NOW, "InferenceResult", RESULT),
        ReplayRow("llm.results", 1, 3, NOW + 5, "InferenceResult", other),
    ]
    path = tmp_path / "out.parquet"
    assert write_parquet(rows, path, codec) == 2
    table = pq.read_table(path)
    assert table.column_names[:5] == ["_topic", "_partition", "_offset", "_timestamp_ms", "_schema"]
    assert "timings_total_ms" in table.column_names and "timings" not in table.column_names
    data = table.to_pylist()
    assert data[1]["timings_total_ms"] == 1.5 and data[1]["timings_queue_ms"] is None
    assert data[0]["error"] is None and data[1]["error"] == "boom"
    schema = table.schema
    assert str(schema.field("created_at").type) == "timestamp[ms, tz=UTC]"
    assert str(schema.field("prompt_tokens").type) == "int32"
    assert str(schema.field("error").type) == "string"  # typed even when a batch is all null


def test_write_parquet_maps_bytes_and_unknown_records(tmp_path: Path) -> None:
    codec = AvroCodec.default()
    feedback = {"request_id": "a", "score": 1, "metadata": {"src": "ui"}, "created_at": NOW}
    dead = {
        "reason_code": "undecodable",
        "reason": "bad",
        "source_topic": "llm.requests",
        "source_partition": 0,
        "source_offset": 9,
        "original_value": b"\x00\x01",
        "created_at": NOW,
    }
    rows = [
        ReplayRow("t", 0, 0, NOW, "FeedbackEvent", feedback),
        ReplayRow("t", 0, 1, NOW, "DeadLetter", dead),
        ReplayRow("t", 0, 2, NOW, "Unknown", {"x": {"y": 1}}),  # no schema: inferred
    ]
    path = tmp_path / "mixed.parquet"
    assert write_parquet(rows, path, codec) == 3
    data = pq.read_table(path).to_pylist()
    assert data[0]["metadata"] == [("src", "ui")] and data[0]["score"] == 1
    assert data[1]["original_value"] == b"\x00\x01" and data[1]["score"] is None
    assert data[2]["x_y"] == 1 and data[2]["_schema"] == "Unknown"


def test_write_parquet_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    assert write_parquet([], path, AvroCodec.default()) == 0
    assert pq.read_table(path).num_rows == 0
