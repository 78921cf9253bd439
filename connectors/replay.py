"""Replay a topic into a file for data teams: JSON Lines or Parquet.

``await replay(bootstrap, "llm.feedback", Path("feedback.parquet"), since_ms=..., min_score=1)``
reads any Sluice topic (requests, results, dead letters, feedback, training examples) and
writes one row per record. It never joins a consumer group (``group_id=None``, partitions
assigned by hand, nothing committed), so it cannot disturb the workers' group or move their
offsets, and any number of replays can run beside them.

What is read, per partition:

* from the earliest retained offset, or the first offset whose record timestamp is
  ``>= since_ms`` (``offsets_for_times``), or ``from_offset`` (inclusive), whichever is
  latest;
* up to the end offset taken when the replay starts, or the first offset whose timestamp is
  ``>= until_ms``, or ``to_offset`` (exclusive), whichever is earliest. The end is fixed at
  the start, so a replay terminates even while producers keep writing.

Offsets are per partition: ``from_offset=10, to_offset=20`` reads offsets 10..19 of every
partition. Time ranges are half-open too: ``since_ms <= timestamp < until_ms``. Producers
set record timestamps themselves, so within the offset window a record whose own timestamp
lies outside the range is skipped (``skipped_filtered``).

Then, in this order:

1. Decode with the codec (Confluent-framed Avro). A record that does not decode is counted
   (``undecodable``) and left out; it never stops the replay (a schema registry that cannot
   be reached does).
2. Deduplicate by ``request_id`` (``dedup=True``): keep the LAST record per request id and
   count the others as ``skipped_duplicates``. Later records supersede earlier ones: a
   re-sent feedback event or a corrected training example replaces the first judgement, and
   a result re-published after a worker restart carries the same answer again. Records are
   keyed by request id, so all versions of one sit in one partition and "last" is the
   highest offset (across partitions, the later timestamp). Records without a request id
   (a dead letter of undecodable bytes) are all kept. A tombstone (null value, as on the
   compacted llm.training-examples) is counted (``tombstones``), never written, and deletes
   the earlier records of its key (counted as duplicates); without dedup it is only counted.
3. Filter by ``model_version`` (field ``model_version``: results and training examples) and
   by score (``min_score <= score <= max_score``, field ``score``: feedback and training
   examples). A record without the field does not match a filter on it.

Rows carry ``_topic``, ``_partition``, ``_offset``, ``_timestamp_ms`` and ``_schema`` (the
record name) before the record's own fields, in (partition, offset) order.

* JSON Lines: one JSON object per line, nested records as objects, bytes base64-encoded,
  timestamps as epoch milliseconds.
* Parquet (pyarrow, zstd): nested records flattened (``timings.total_ms`` ->
  ``timings_total_ms``), column types from the Avro schemas (nullable unions, maps as Arrow
  maps, ``timestamp-millis`` as UTC timestamps), so every file of one topic has the same
  columns even when a batch holds only nulls in one of them.

The output is written to a temporary file beside ``out`` and renamed into place at the end:
a failed or interrupted replay leaves no half-written file. Rows are held in memory until
then (deduplication needs them all): about the size of the decoded records.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import AvroCodec
from schemas.errors import RegistryError, SchemaError, SluiceError
from streams.kafka_clients import stop_consumer, topic_partitions

logger = logging.getLogger(__name__)

Format = Literal["jsonl", "parquet"]
META_COLUMNS = ("_topic", "_partition", "_offset", "_timestamp_ms", "_schema")
_SUFFIXES: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class ReplayError(SluiceError):
    """The replay cannot run as asked (no such topic, bad range, unknown format, ...)."""

    reason_code = "replay"


@dataclass
class ReplaySummary:
    """What a replay read and wrote.

    ``read`` counts every record in the window (tombstones included); each is then either
    ``written`` or in exactly one of ``undecodable``, ``tombstones``, ``skipped_filtered``,
    ``skipped_duplicates``. ``partitions`` maps each partition to the ``(start, stop)``
    offsets it was read between (stop exclusive; equal when there was nothing to read).
    ``first_timestamp_ms`` and ``last_timestamp_ms`` are the smallest and largest record
    timestamps written (None when nothing was).
    """

    topic: str
    out: Path
    fmt: Format
    read: int = 0
    written: int = 0
    skipped_filtered: int = 0
    skipped_duplicates: int = 0
    undecodable: int = 0
    tombstones: int = 0
    partitions: dict[int, tuple[int, int]] = field(default_factory=dict)
    first_timestamp_ms: int | None = None
    last_timestamp_ms: int | None = None
    elapsed_s: float = 0.0


@dataclass(slots=True)
class ReplayRow:
    """One decoded record and where it came from."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    schema: str
    record: dict[str, Any]
    tombstone: bool = False  # a null value: on a compacted topic, deletes its key

    def meta(self) -> dict[str, Any]:
        return {
            "_topic": self.topic,
            "_partition": self.partition,
            "_offset": self.offset,
            "_timestamp_ms": self.timestamp_ms,
            "_schema": self.schema,
        }


# -- times ------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(?:now)?\s*([+-])\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$", re.IGNORECASE)
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_MIN_EPOCH_MS = 100_000_000_000  # 1973-03-03 in ms; a smaller number is likely seconds
_TIME_FORMS = (
    "ISO-8601 (2026-11-23T08:00:00Z, 2026-11-23T09:00+01:00, 2026-11-23), "
    "epoch milliseconds (1795420800000), 'now', or relative to now (-15m, -2h, -1d, -30s, "
    "-1w, now-90m)"
)


def parse_time(text: str, *, now_ms: int | None = None) -> int:
    """Epoch milliseconds from ISO-8601, epoch milliseconds, ``now`` or ``-15m``/``-2h``/``-1d``.

    ISO times without an offset are UTC; a bare date is its midnight UTC. Relative units:
    ms, s, m (minutes), h, d, w. Raises :class:`ValueError` saying what is accepted.
    """
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    raw = text
    text = text.strip()
    if not text:
        raise ValueError(f"empty time; expected {_TIME_FORMS}")
    if text.lower() == "now":
        return now_ms
    rel = _RELATIVE.match(text)
    if rel:
        sign, amount, unit = rel.groups()
        delta = round(float(amount) * _UNIT_MS[unit.lower()])
        return now_ms - delta if sign == "-" else now_ms + delta
    if re.fullmatch(r"-?\d+", text):
        value = int(text)
        if value < 0:
            raise ValueError(f"time {raw!r} is negative; relative times need a unit: -15m, -2h")
        if 0 < value < _MIN_EPOCH_MS:
            raise ValueError(
                f"time {raw!r} is not epoch milliseconds (it would be before 1973); "
                f"epoch seconds? use {value * 1000}"
            )
        return value
    odd = re.fullmatch(r"(?:now)?\s*([+-]?)\s*\d+(?:\.\d+)?\s*([a-zA-Z]+)", text)
    if odd:
        sign, unit = odd.groups()
        if not sign:
            raise ValueError(f"relative time {raw!r} needs a sign: -{text} means {text} ago")
        raise ValueError(
            f"unknown unit {unit!r} in {raw!r}: use ms, s, m (minutes), h, d or w (-15m, -2h)"
        )
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError(f"cannot read time {raw!r}; expected {_TIME_FORMS}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


# -- rows: JSON, flattening, dedup, filters ----------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` with bytes as base64 strings (recursively)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def flatten(record: Mapping[str, Any], schema: Any = None, *, sep: str = "_") -> dict[str, Any]:
    """Nested records as top-level columns: ``{"timings": {"total_ms": 1.0}}`` ->
    ``{"timings_total_ms": 1.0}``.

    With the record's Avro ``schema`` only nested *records* are flattened (maps and arrays
    stay values, and a null optional record gives null columns); without it every nested
    dict is flattened.
    """
    out: dict[str, Any] = {}
    if schema is None:
        _flatten_plain(record, "", sep, out)
    else:
        named: dict[str, Any] = {}
        _flatten_schema(record, _record_fields(schema, named), "", sep, out, named)
    return out


def _flatten_plain(value: Mapping[str, Any], prefix: str, sep: str, out: dict[str, Any]) -> None:
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            _flatten_plain(item, f"{name}{sep}", sep, out)
        else:
            out[name] = item


def _resolve(node: Any, named: dict[str, Any]) -> Any:
    """Follow a reference to a named type; remember named types seen."""
    if isinstance(node, str):
        return named.get(node, node)
    if isinstance(node, dict) and node.get("type") in ("record", "enum", "fixed"):
        name = node.get("name")
        if name:
            named[name] = node
            namespace = node.get("namespace")
            if namespace and "." not in name:
                named[f"{namespace}.{name}"] = node
    return node


def _record_fields(schema: Any, named: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _resolve(schema, named)
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise ValueError(f"not a record schema: {schema!r:.80}")
    return list(schema["fields"])


def _nested_record(node: Any, named: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """``(record schema, nullable)`` if ``node`` is a record or ``["null", record]``."""
    node = _resolve(node, named)
    if isinstance(node, list):
        branches = [_resolve(b, named) for b in node]
        non_null = [b for b in branches if b != "null"]
        if len(non_null) == 1 and isinstance(non_null[0], dict):
            if non_null[0].get("type") == "record":
                return non_null[0], len(branches) > 1
        return None, False
    if isinstance(node, dict) and node.get("type") == "record":
        return node, False
    return None, False


def _flatten_schema(
    value: Mapping[str, Any] | None,
    fields: list[dict[str, Any]],
    prefix: str,
    sep: str,
    out: dict[str, Any],
    named: dict[str, Any],
) -> None:
    for fld in fields:
        name = f"{prefix}{fld['name']}"
        item = None if value is None else value.get(fld["name"])
        nested, _ = _nested_record(fld["type"], named)
        if nested is not None:
            _flatten_schema(item, list(nested["fields"]), f"{name}{sep}", sep, out, named)
        else:
            out[name] = item


def dedup_last(rows: Iterable[ReplayRow]) -> tuple[list[ReplayRow], int]:
    """The last row per ``request_id`` (rows without one are all kept), in (partition,
    offset) order, and how many records were dropped. A tombstone row (null value, its key
    as ``request_id``) that comes last deletes its request id; tombstones are never kept
    nor counted as dropped.

    Last: the higher offset within a partition; across partitions the later timestamp (then
    the higher partition) wins.
    """
    keep: list[ReplayRow] = []
    latest: dict[str, ReplayRow] = {}
    records: dict[str, int] = {}  # request id -> how many (non-tombstone) records
    for row in rows:
        request_id = row.record.get("request_id")
        if request_id is None:
            if not row.tombstone:
                keep.append(row)
            continue
        if not row.tombstone:
            records[request_id] = records.get(request_id, 0) + 1
        seen = latest.get(request_id)
        if seen is None or _later(row, seen):
            latest[request_id] = row
    dropped = 0
    for request_id, row in latest.items():
        count = records.get(request_id, 0)
        if row.tombstone:
            dropped += count
        else:
            dropped += count - 1
            keep.append(row)
    keep.sort(key=lambda r: (r.partition, r.offset))
    return keep, dropped


def _later(a: ReplayRow, b: ReplayRow) -> bool:
    if a.partition == b.partition:
        return a.offset > b.offset
    return (a.timestamp_ms, a.partition) > (b.timestamp_ms, b.partition)


def row_matches(
    record: Mapping[str, Any],
    *,
    model_version: str | None = None,
    min_score: int | None = None,
    max_score: int | None = None,
) -> bool:
    """Whether ``record`` passes the model-version and score filters (a missing field does
    not match a filter on it)."""
    if model_version is not None and record.get("model_version") != model_version:
        return False
    if min_score is not None or max_score is not None:
        score = record.get("score")
        if not isinstance(score, int) or isinstance(score, bool):
            return False
        if min_score is not None and score < min_score:
            return False
        if max_score is not None and score > max_score:
            return False
    return True


def format_for(out: Path, fmt: Format | None = None) -> Format:
    """``fmt`` or the one the suffix of ``out`` names."""
    if fmt is not None:
        if fmt not in ("jsonl", "parquet"):
            raise ReplayError(f"unknown format {fmt!r}: use jsonl or parquet")
        return fmt
    try:
        return _SUFFIXES[out.suffix.lower()]
    except KeyError:
        raise ReplayError(
            f"cannot tell the format from {out.name!r}: name it .jsonl or .parquet, or pass "
            f"the format (jsonl, parquet)"
        ) from None


# -- writers ----------------------------------------------------------------------------------


def write_jsonl(rows: Iterable[ReplayRow], path: Path) -> int:
    """One JSON object per row; returns how many."""
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            line = {**row.meta(), **jsonable(row.record)}
            fh.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
            fh.write("\n")
            count += 1
    return count


def write_parquet(rows: list[ReplayRow], path: Path, codec: AvroCodec | None = None) -> int:
    """Flattened rows as Parquet, column types from the Avro schemas where ``codec`` knows
    them; returns how many rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas: dict[str, Any] = {}
    if codec is not None:
        for name in {row.schema for row in rows}:
            with contextlib.suppress(SluiceError, KeyError):
                schemas[name] = codec.resolver.parsed(name)
    columns: dict[str, pa.DataType | None] = {
        "_topic": pa.string(),
        "_partition": pa.int32(),
        "_offset": pa.int64(),
        "_timestamp_ms": pa.int64(),
        "_schema": pa.string(),
    }
    for name in sorted(schemas):
        for column, dtype in _arrow_columns(schemas[name]).items():
            if column in columns and columns[column] != dtype:
                columns[column] = pa.string()  # two records disagree: keep it as JSON text
            else:
                columns.setdefault(column, dtype)
    flat_rows = []
    for row in rows:
        flat = row.meta()
        flat.update(flatten(row.record, schemas.get(row.schema)))
        flat_rows.append(flat)
    names = list(columns)
    for flat in flat_rows:  # columns of records we have no schema for: inferred by pyarrow
        for column in flat:
            if column not in columns:
                columns[column] = None
                names.append(column)
    arrays = []
    fields = []
    for column in names:
        dtype = columns[column]
        values = [flat.get(column) for flat in flat_rows]
        if dtype == pa.string():
            values = [_as_text(v) for v in values]
        try:
            array = pa.array(values, type=dtype) if dtype is not None else pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            array = pa.array([_as_text(v) for v in values], type=pa.string())
        arrays.append(array)
        fields.append(pa.field(column, array.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    pq.write_table(table, path, compression="zstd")
    return len(flat_rows)


def _as_text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(jsonable(value), ensure_ascii=False)


def _arrow_columns(schema: Any) -> dict[str, Any]:
    """Flattened column name -> Arrow type for an Avro record schema."""
    named: dict[str, Any] = {}
    out: dict[str, Any] = {}
    _arrow_record(_record_fields(schema, named), "", out, named)
    return out


def _arrow_record(
    fields: list[dict[str, Any]], prefix: str, out: dict[str, Any], named: dict[str, Any]
) -> None:
    for fld in fields:
        name = f"{prefix}{fld['name']}"
        nested, _ = _nested_record(fld["type"], named)
        if nested is not None:
            _arrow_record(list(nested["fields"]), f"{name}_", out, named)
        else:
            out[name] = _arrow_type(fld["type"], named)


def _arrow_type(node: Any, named: dict[str, Any]) -> Any:
    import pyarrow as pa

    node = _resolve(node, named)
    if isinstance(node, list):
        non_null = [b for b in node if b != "null"]
        if len(non_null) == 1:
            return _arrow_type(non_null[0], named)
        return pa.string()  # a union of several types: JSON text
    if isinstance(node, dict):
        kind = node.get("type")
        logical = node.get("logicalType")
        if logical == "timestamp-millis" and kind == "long":
            return pa.timestamp("ms", tz="UTC")
        if kind == "array":
            return pa.list_(_arrow_type(node["items"], named))
        if kind == "map":
            return pa.map_(pa.string(), _arrow_type(node["values"], named))
        if kind == "enum":
            return pa.string()
        if kind == "fixed":
            return pa.binary()
        if kind == "record":
            return pa.struct(
                [pa.field(f["name"], _arrow_type(f["type"], named)) for f in node["fields"]]
            )
        if isinstance(kind, str | list | dict):
            return _arrow_type(kind, named)
    primitive = {
        "string": pa.string(),
        "bytes": pa.binary(),
        "int": pa.int32(),
        "long": pa.int64(),
        "float": pa.float32(),
        "double": pa.float64(),
        "boolean": pa.bool_(),
        "null": pa.null(),
    }
    return primitive.get(node, pa.string())


# -- the replay -------------------------------------------------------------------------------


async def replay(
    bootstrap: str,
    topic: str,
    out: Path,
    *,
    fmt: Format | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    model_version: str | None = None,
    min_score: int | None = None,
    max_score: int | None = None,
    dedup: bool = True,
    codec: AvroCodec | None = None,
    client_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplaySummary:
    """Write the records of ``topic`` in the given window to ``out``; see the module
    docstring. ``from_offset`` is inclusive and ``to_offset`` exclusive, both per partition;
    ``since_ms`` inclusive and ``until_ms`` exclusive. ``progress(done, total)`` is called
    as records are read (``total``: records in the window, known after the start).

    Raises :class:`ReplayError` for a topic that does not exist or a bad argument.
    """
    started = time.perf_counter()
    out = Path(out)
    kind = format_for(out, fmt)
    _check_range("since_ms/until_ms", since_ms, until_ms)
    _check_range("from_offset/to_offset", from_offset, to_offset)
    for name, value in (("from_offset", from_offset), ("to_offset", to_offset)):
        if value is not None and value < 0:
            raise ReplayError(f"{name} must be >= 0, not {value}")
    _check_range("min_score/max_score", min_score, max_score)
    codec = codec or AvroCodec.default()
    summary = ReplaySummary(topic=topic, out=out, fmt=kind)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **(client_options or {}),
    )
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, topic)
        if not parts:
            raise ReplayError(f"topic {topic!r} does not exist")
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        windows = await _windows(consumer, tps, since_ms, until_ms, from_offset, to_offset)
        summary.partitions = {tp.partition: window for tp, window in windows.items()}
        rows = await _read(consumer, windows, codec, summary, since_ms, until_ms, progress)
    finally:
        await stop_consumer(consumer)

    if dedup:
        rows, summary.skipped_duplicates = dedup_last(rows)
    else:
        rows = [row for row in rows if not row.tombstone]
    kept = [
        row
        for row in rows
        if row_matches(
            row.record, model_version=model_version, min_score=min_score, max_score=max_score
        )
    ]
    summary.skipped_filtered += len(rows) - len(kept)
    if kept:
        summary.first_timestamp_ms = min(row.timestamp_ms for row in kept)
        summary.last_timestamp_ms = max(row.timestamp_ms for row in kept)
    summary.written = await asyncio.to_thread(_write_atomically, kept, out, kind, codec)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _check_range(what: str, low: int | None, high: int | None) -> None:
    if low is not None and high is not None and low > high:
        raise ReplayError(f"{what}: {low} is after {high}")


async def _windows(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    since_ms: int | None,
    until_ms: int | None,
    from_offset: int | None,
    to_offset: int | None,
) -> dict[TopicPartition, tuple[int, int]]:
    """Per partition, the offsets ``[start, stop)`` to read."""
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)  # fixed now: later records are not waited for
    since = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms)) if since_ms else {}
    until = (
        await consumer.offsets_for_times(dict.fromkeys(tps, until_ms))
        if until_ms is not None
        else {}
    )
    windows: dict[TopicPartition, tuple[int, int]] = {}
    for tp in tps:
        start, stop = begin[tp], end[tp]
        if since_ms:
            found = since.get(tp)
            start = max(start, found.offset if found is not None else stop)
        if from_offset is not None:
            start = max(start, from_offset)
        if until_ms is not None:
            found = until.get(tp)
            if found is not None:
                stop = min(stop, found.offset)
        if to_offset is not None:
            stop = min(stop, to_offset)
        windows[tp] = (start, max(start, stop))
    return windows


async def _read(
    consumer: AIOKafkaConsumer,
    windows: dict[TopicPartition, tuple[int, int]],
    codec: AvroCodec,
    summary: ReplaySummary,
    since_ms: int | None,
    until_ms: int | None,
    progress: Callable[[int, int], None] | None,
) -> list[ReplayRow]:
    total = sum(stop - start for start, stop in windows.values())
    rows: list[ReplayRow] = []
    pending = {tp for tp, (start, stop) in windows.items() if stop > start}
    for tp, (start, _) in windows.items():
        consumer.seek(tp, start)
    if len(pending) < len(windows):
        consumer.pause(*(tp for tp in windows if tp not in pending))
    done = 0
    if progress:
        progress(0, total)
    loop = asyncio.get_running_loop()
    last_progress = loop.time()
    while pending:
        batches = await consumer.getmany(*pending, timeout_ms=500, max_records=5000)
        for tp, records in batches.items():
            stop = windows[tp][1]
            for message in records:
                if message.offset >= stop:
                    break
                done += 1
                row = _decode(codec, tp, message, summary)
                if row is None:
                    continue
                if not row.tombstone and (
                    (since_ms is not None and row.timestamp_ms < since_ms)
                    or (until_ms is not None and row.timestamp_ms >= until_ms)
                ):
                    summary.skipped_filtered += 1
                    continue
                rows.append(row)
        finished = set()
        for tp in pending:
            if await consumer.position(tp) >= windows[tp][1]:
                finished.add(tp)
        if finished:
            consumer.pause(*finished)
            pending -= finished
        if batches or finished:
            last_progress = loop.time()
            if progress:
                progress(done, total)
        elif loop.time() - last_progress > 60:
            # Offsets that never arrive (e.g. the rest of an aborted transaction under
            # read_committed): say so rather than wait forever.
            stuck = {tp.partition: windows[tp] for tp in pending}
            raise ReplayError(f"replay of {summary.topic!r} stalled in partitions {stuck}")
    return rows


def _decode(
    codec: AvroCodec, tp: TopicPartition, message: Any, summary: ReplaySummary
) -> ReplayRow | None:
    summary.read += 1
    if message.value is None:  # a tombstone: counted, and with dedup it deletes its key
        summary.tombstones += 1
        key = message.key.decode("utf-8", "replace") if message.key is not None else None
        return ReplayRow(
            tp.topic,
            tp.partition,
            message.offset,
            message.timestamp,
            "",
            {"request_id": key},
            tombstone=True,
        )
    try:
        name, record = codec.decode(message.value)
    except RegistryError:
        raise
    except SchemaError as exc:
        summary.undecodable += 1
        logger.debug("%s[%d]@%d undecodable: %s", tp.topic, tp.partition, message.offset, exc)
        return None
    return ReplayRow(tp.topic, tp.partition, message.offset, message.timestamp, name, record)


def _write_atomically(rows: list[ReplayRow], out: Path, kind: Format, codec: AvroCodec) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")  # same folder: rename
    try:
        if kind == "jsonl":
            count = write_jsonl(rows, tmp)
        else:
            count = write_parquet(rows, tmp, codec)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
