"""The feedback join: requests + results + human feedback → redacted training examples.

Requests, results and feedback are all keyed by request_id with the same partition count,
so a request's three records land on the same partition and the same worker. The joiner
keeps what it needs per request_id in a changelog-backed table (a plain dict in unit
tests). It is a pure state machine: no I/O, the wall clock injected; the Faust agent in
:mod:`streams.feedback_join` decodes records, hands them over and publishes what comes back.
All table writes happen inside an agent's iteration, since Faust refuses table writes
from anywhere else. The state, timers and bounds are described in ``docs/feedback-join.md``.

Timing rules, on event time (record timestamps, one clock per partition, never more than
``clock_skew_ms`` past wall time), so replays behave like live runs:

* feedback for a request whose result is in the table → a training example at once;
* feedback that arrives before its result (or even before its request) is parked in the
  entry and joined when the result arrives; if nothing arrives within ``wait_ms`` it is
  dead-lettered (``unknown_request`` / ``no_result``), never dropped silently;
* an entry lives ``window_ms`` after its last update; then it is replaced by a small
  marker (no prompt, no answer) for another window, so feedback that comes too late is
  dead-lettered as ``outside_window`` (not mistaken for an unknown request); then it is
  deleted (a tombstone on the changelog).

Timers live in memory (a heap per partition); :meth:`FeedbackJoiner.rebuild` recreates
them from the table after a restart or a rebalance, so recovered entries expire too.
Every stored value is bounded by ``max_entry_bytes`` (see :func:`fit_entry`).
"""

from __future__ import annotations

import heapq
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

SCORES = (-1, 0, 1)

#: What a truncated text ends with (in the stored entry and so in the training example).
TRUNCATED = " …[truncated]"
#: The metadata key that replaces a parked feedback's metadata when it had to go.
METADATA_DROPPED = "sluice.truncated"


@dataclass(frozen=True)
class Emit:
    """A record the agent must publish: a training example or a feedback dead letter."""

    kind: str  # "training" | "dlq"
    key: bytes | None
    record: dict[str, Any]


class Redacts:
    """What the joiner needs from a redactor (``streams.redaction.Redactor`` fits)."""

    def redact(self, text: str) -> Any: ...  # returns an object with .text and .counts


def wall_ms() -> int:
    """The default wall clock: epoch milliseconds."""
    return int(time.time() * 1000)


@dataclass
class _Timers:
    """One partition's deadlines: a heap, plus the due time each key currently counts
    on (heap items whose time no longer matches are stale and skipped)."""

    heap: list[tuple[int, str]] = field(default_factory=list)
    due: dict[str, int] = field(default_factory=dict)


class FeedbackJoiner:
    """Joins per request_id; ``table`` is the Faust table (a plain dict in unit tests).

    Table values (JSON): ``{"partition", "seen_ms", "request"?, "result"?, "failed"?,
    "pending"?: [feedback + "_parked_ms", "_offset"]}``, or the marker of an expired entry
    ``{"partition", "seen_ms", "expired_ms"}``.
    """

    def __init__(
        self,
        table: MutableMapping[str, dict[str, Any]],
        redactor: Redacts,
        *,
        window_ms: int,
        wait_ms: int,
        max_correction_chars: int = 16_000,
        max_entry_bytes: int = 256_000,
        clock_skew_ms: int = 60_000,
        wall_clock: Callable[[], int] = wall_ms,
        on_outcome: Callable[[str], None] | None = None,
        pseudonymize: Callable[[str | None], str | None] | None = None,
    ) -> None:
        """``pseudonymize`` turns a user id into its keyed pseudonym (every id, see
        :class:`streams.redaction.Pseudonymizer`); the default, for tests, is a keyed HMAC
        with a throwaway key."""
        self.table = table
        self.pseudonymize = pseudonymize or _throwaway_pseudonymizer()
        self.redactor = redactor
        self.window_ms = window_ms
        self.wait_ms = wait_ms
        self.max_correction_chars = max_correction_chars
        self.max_entry_bytes = max_entry_bytes
        self.clock_skew_ms = clock_skew_ms
        self._wall = wall_clock
        self._on_outcome = on_outcome or (lambda _outcome: None)
        self._timers: dict[int, _Timers] = {}
        self._clock: dict[int, int] = {}
        self.counts: Counter[str] = Counter()

    # -- inputs ------------------------------------------------------------------------
    def on_request(self, partition: int, ts: int, record: Mapping[str, Any]) -> list[Emit]:
        now = self._tick(partition, ts)
        rid = record["request_id"]
        entry = self._live_entry(rid)
        sampling = record.get("sampling") or {}
        entry["request"] = {
            "prompt": record.get("prompt", ""),
            "system": record.get("system"),
            "model": record.get("model", ""),
            "max_new_tokens": sampling.get("max_new_tokens", 64),
            "temperature": sampling.get("temperature", 0.0),
            "top_p": sampling.get("top_p", 1.0),
            "seed": sampling.get("seed"),
            "created_at": record.get("created_at") or ts,
        }
        return self._store(partition, rid, entry, now)

    def on_result(self, partition: int, ts: int, record: Mapping[str, Any]) -> list[Emit]:
        now = self._tick(partition, ts)
        rid = record["request_id"]
        entry = self._live_entry(rid)
        if record.get("status") != "OK":
            entry["failed"] = record.get("status")
        entry["result"] = {
            "text": record.get("text", ""),
            "model": record.get("model", ""),
            "model_version": record.get("model_version", ""),
            "finish_reason": record.get("finish_reason"),
            "created_at": record.get("created_at") or ts,
        }
        return self._store(partition, rid, entry, now)

    def on_feedback(self, partition: int, ts: int, record: Mapping[str, Any]) -> list[Emit]:
        """A decoded FeedbackEvent (``_offset``: its offset, for dead letters). Invalid
        ones come back as dead letters."""
        now = self._tick(partition, ts)
        rid = record.get("request_id") or ""
        problem = self._validate(record)
        if problem is not None:
            return [self._dead(partition, record, *problem)]
        entry = self.table.get(rid)
        if entry is not None and entry.get("expired_ms") is not None:
            return [self._dead(partition, record, *_OUTSIDE_WINDOW)]
        if entry is not None and "result" in entry and "request" in entry:
            if now - int(entry["seen_ms"]) > self.window_ms:
                return [self._dead(partition, record, *_OUTSIDE_WINDOW)]
            return [self._example(rid, entry, record)]
        # Early: before its result (or its request). Park it in the entry.
        entry = dict(entry or {})
        pending = list(entry.get("pending", []))
        offset = record.get("_offset")
        if offset is not None and any(fb.get("_offset") == offset for fb in pending):
            self.count("redelivered")  # read again after a restart: parked already
            return []
        pending.append({**record, "_parked_ms": now})
        entry.update(pending=pending, seen_ms=entry.get("seen_ms", now), partition=partition)
        entry, dropped = self._fit(entry)  # the newest goes first, if any must
        self.table[rid] = entry
        self._schedule(partition, self._next_due(entry), rid)
        if not dropped:
            self.count("early")
        return [self._dead(partition, fb, *_TOO_LARGE) for fb in dropped]

    def sweep(self, partition: int) -> list[Emit]:
        """Handle everything due on this partition by its event-time clock."""
        now = self._clock.get(partition)
        timers = self._timers.get(partition)
        out: list[Emit] = []
        while timers and timers.heap and now is not None and timers.heap[0][0] <= now:
            due, rid = heapq.heappop(timers.heap)
            if timers.due.get(rid) != due:
                continue  # superseded by an earlier deadline that already fired
            del timers.due[rid]
            out.extend(self._expire(partition, rid, now))
        return out

    def rebuild(
        self,
        partitions: Collection[int] | None = None,
        *,
        partition_of: Callable[[str], int] | None = None,
    ) -> list[str]:
        """Recreate every timer from the table (after its recovery from the changelog).

        ``partitions``: the partitions this worker now owns (None: all). Entries on other
        partitions get no timers; their keys are returned, so the caller can drop the
        local copies. ``partition_of`` places entries stored without a partition. Each
        owned partition's clock starts at the latest time its entries record (never past
        wall time + skew), so a restart does not make old entries look young.
        """
        self._timers.clear()
        ceiling = self._wall() + self.clock_skew_ms
        foreign: list[str] = []
        for rid, entry in list(self.table.items()):
            if not isinstance(entry, Mapping):
                continue
            partition = entry.get("partition")
            if partition is None and partition_of is not None:
                partition = partition_of(rid)
            if partition is None:
                logger.warning("feedback join: entry %r has no partition; no timer", rid)
                continue
            if partitions is not None and partition not in partitions:
                foreign.append(rid)
                continue
            self._schedule(partition, self._next_due(entry), rid)
            latest = min(_latest_ms(entry), ceiling)
            self._clock[partition] = max(self._clock.get(partition, 0), latest)
        logger.info(
            "feedback join: %d timers rebuilt (partitions %s), %d entries elsewhere",
            sum(len(t.due) for t in self._timers.values()),
            "all" if partitions is None else sorted(partitions),
            len(foreign),
        )
        return foreign

    def clock(self, partition: int) -> int | None:
        """This partition's event-time clock (epoch ms), None before its first record."""
        return self._clock.get(partition)

    def timers(self, partition: int) -> dict[str, int]:
        """The deadline each key on this partition counts on (a copy)."""
        timers = self._timers.get(partition)
        return dict(timers.due) if timers else {}

    def count(self, outcome: str) -> None:
        """Count an outcome (also for dead letters decided outside the joiner)."""
        self.counts[outcome] += 1
        self._on_outcome(outcome)

    # -- internals ---------------------------------------------------------------------
    def _tick(self, partition: int, ts: int) -> int:
        ceiling = self._wall() + self.clock_skew_ms
        if ts > ceiling:
            self.count("future_timestamp")
            ts = ceiling
        now = max(self._clock.get(partition, 0), ts)
        self._clock[partition] = now
        return now

    def _live_entry(self, rid: str) -> dict[str, Any]:
        entry = dict(self.table.get(rid) or {})
        return {} if entry.get("expired_ms") is not None else entry

    def _store(self, partition: int, rid: str, entry: dict[str, Any], now: int) -> list[Emit]:
        entry["seen_ms"] = now
        entry["partition"] = partition
        out: list[Emit] = []
        pending = entry.pop("pending", [])
        if pending and "request" in entry and "result" in entry:
            entry, _ = self._fit(entry)
            out = [self._example(rid, entry, fb) for fb in pending]
        else:
            if pending:
                entry["pending"] = pending
            entry, dropped = self._fit(entry)
            out = [self._dead(partition, fb, *_TOO_LARGE) for fb in dropped]
        self.table[rid] = entry
        self._schedule(partition, now + self.window_ms, rid)
        return out

    def _fit(self, entry: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        fitted, truncated, dropped = fit_entry(entry, self.max_entry_bytes)
        if truncated:
            self.count("truncated")
        return fitted, dropped

    def _expire(self, partition: int, rid: str, now: int) -> list[Emit]:
        entry = self.table.get(rid)
        if entry is None:
            return []
        if entry.get("expired_ms") is not None:
            if now - int(entry["expired_ms"]) >= self.window_ms:
                del self.table[rid]  # a tombstone on the changelog
            else:
                self._schedule(partition, self._next_due(entry), rid)
            return []
        pending = entry.get("pending", [])
        waiting = [fb for fb in pending if now - int(fb["_parked_ms"]) < self.wait_ms]
        out: list[Emit] = []
        for fb in pending:
            if now - int(fb["_parked_ms"]) < self.wait_ms:
                continue
            if "request" not in entry:
                out.append(self._dead(partition, fb, "unknown_request", _NO_REQUEST))
            else:
                out.append(self._dead(partition, fb, "no_result", _NO_RESULT))
        if not waiting and now - int(entry["seen_ms"]) >= self.window_ms:
            # The prompt and the answer leave the changelog here; the marker stays one
            # more window to tell late feedback from feedback for an unknown request.
            self.table[rid] = {
                "partition": partition,
                "seen_ms": int(entry["seen_ms"]),
                "expired_ms": now,
            }
            self.count("expired")
            self._schedule(partition, now + self.window_ms, rid)
            return out
        if len(waiting) != len(pending):
            entry = {k: v for k, v in entry.items() if k != "pending"}
            if waiting:
                entry["pending"] = waiting
            self.table[rid] = entry
        if waiting:  # the entry may be past its window: its feedback still waits
            due = min(int(fb["_parked_ms"]) for fb in waiting) + self.wait_ms
        else:
            due = int(entry["seen_ms"]) + self.window_ms
        self._schedule(partition, max(due, now + 1), rid)
        return out

    def _next_due(self, entry: Mapping[str, Any]) -> int:
        if entry.get("expired_ms") is not None:
            return int(entry["expired_ms"]) + self.window_ms
        due = int(entry.get("seen_ms", 0)) + self.window_ms
        pending = entry.get("pending") or []
        if pending:
            due = min(due, min(int(fb["_parked_ms"]) for fb in pending) + self.wait_ms)
        return due

    def _schedule(self, partition: int, due: int, rid: str) -> None:
        timers = self._timers.setdefault(partition, _Timers())
        current = timers.due.get(rid)
        if current is not None and current <= due:
            return  # the earlier deadline fires first and schedules the next one
        timers.due[rid] = due
        heapq.heappush(timers.heap, (due, rid))

    def _validate(self, record: Mapping[str, Any]) -> tuple[str, str] | None:
        if not (record.get("request_id") or "").strip():
            return "invalid_feedback", "request_id is empty"
        if record.get("score") not in SCORES:
            return "bad_score", f"score={record.get('score')} is not one of -1, 0, 1"
        correction = record.get("correction")
        if correction is not None and len(correction) > self.max_correction_chars:
            return "invalid_feedback", f"correction longer than {self.max_correction_chars}"
        return None

    def _example(self, rid: str, entry: Mapping[str, Any], feedback: Mapping[str, Any]) -> Emit:
        request, result = entry["request"], entry["result"]
        redactions: Counter[str] = Counter()

        def clean(text: str | None) -> str | None:
            if text is None:
                return None
            outcome = self.redactor.redact(text)
            redactions.update(outcome.counts)
            return outcome.text

        record = {
            "request_id": rid,
            "prompt": clean(request["prompt"]) or "",
            "system": clean(request.get("system")),
            "response": clean(result["text"]) or "",
            "score": feedback["score"],
            "label": feedback.get("label"),
            "correction": clean(feedback.get("correction")),
            "user": self.pseudonymize(feedback.get("user")),
            "model": result.get("model") or request.get("model", ""),
            "model_version": result.get("model_version", ""),
            "max_new_tokens": request.get("max_new_tokens", 64),
            "temperature": request.get("temperature", 0.0),
            "top_p": request.get("top_p", 1.0),
            "seed": request.get("seed"),
            "finish_reason": result.get("finish_reason"),
            "request_created_at": request.get("created_at", 0),
            "result_created_at": result.get("created_at", 0),
            "feedback_created_at": feedback.get("created_at", 0),
            "redactions": dict(redactions),
            "created_at": int(entry.get("seen_ms", 0)),
        }
        self.count("joined")
        return Emit("training", rid.encode(), record)

    def _dead(self, partition: int, feedback: Mapping[str, Any], code: str, reason: str) -> Emit:
        """A feedback dead letter; ``source_offset`` is the feedback record's own offset
        (when known), whenever the letter is decided."""
        self.count(f"dlq:{code}")
        rid = feedback.get("request_id") or None
        return Emit(
            "dlq",
            rid.encode() if rid else None,
            {
                "reason_code": code,
                "reason": reason,
                "request_id": rid,
                "source_partition": partition,
                "source_offset": feedback.get("_offset"),
                "feedback": {k: v for k, v in feedback.items() if not k.startswith("_")},
            },
        )


_OUTSIDE_WINDOW = ("outside_window", "feedback arrived after the window")
_TOO_LARGE = ("entry_too_large", "the join's entry for this request is full")
_NO_REQUEST = "no request with this id was seen"
_NO_RESULT = "the request has no result yet"


def _latest_ms(entry: Mapping[str, Any]) -> int:
    times = [int(entry.get("seen_ms", 0)), int(entry.get("expired_ms") or 0)]
    times += [int(fb.get("_parked_ms", 0)) for fb in entry.get("pending") or []]
    return max(times)


# -- size bound ----------------------------------------------------------------------------
def entry_bytes(value: Any) -> int:
    """Bytes of ``value`` as JSON with every non-ASCII character escaped: an upper bound
    of what Faust's JSON codecs (json or orjson) write to the changelog."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=True))


def fit_entry(
    entry: Mapping[str, Any], limit: int
) -> tuple[dict[str, Any], bool, list[dict[str, Any]]]:
    """``entry`` made to fit in ``limit`` bytes (:func:`entry_bytes`).

    In order, until it fits: a parked feedback's metadata larger than an eighth of the
    limit is replaced by ``{METADATA_DROPPED: "<n> entries"}``; the texts (prompt, system,
    answer, a parked feedback's correction, label and metadata values) are capped at one
    common length, the longest first, each cut at a word boundary and ending with
    :data:`TRUNCATED`; the remaining metadata goes the same way; the newest parked
    feedback is taken out. Returns the fitted copy, whether anything was truncated, and
    the parked feedback taken out, oldest first (the caller dead-letters them).
    """
    if entry_bytes(entry) <= limit:
        return dict(entry), False, []
    fitted: dict[str, Any] = json.loads(json.dumps(entry))  # a deep, JSON-shaped copy
    pending: list[dict[str, Any]] = fitted.get("pending") or []
    truncated = _drop_metadata(fitted, pending, limit, larger_than=limit // 8)
    for _ in range(4):  # one pass is exact but for the marker on very small caps
        excess = entry_bytes(fitted) - limit
        if excess <= 0:
            break
        truncated = _cap_texts(list(_texts(fitted)), excess) or truncated
    truncated = _drop_metadata(fitted, pending, limit, larger_than=0) or truncated
    dropped: list[dict[str, Any]] = []
    while pending and entry_bytes(fitted) > limit:
        dropped.insert(0, pending.pop())
    if "pending" in fitted and not pending:
        del fitted["pending"]
    if entry_bytes(fitted) > limit:
        logger.warning("feedback join: an entry is still %d bytes", entry_bytes(fitted))
    return fitted, truncated, dropped


def _drop_metadata(
    entry: dict[str, Any], pending: list[dict[str, Any]], limit: int, *, larger_than: int
) -> bool:
    dropped = False
    for fb in sorted(pending, key=lambda fb: -entry_bytes(fb.get("metadata") or {})):
        metadata = fb.get("metadata") or {}
        if entry_bytes(entry) <= limit or entry_bytes(metadata) <= max(larger_than, 2):
            break
        if METADATA_DROPPED not in metadata:
            fb["metadata"] = {METADATA_DROPPED: f"{len(metadata)} entries"}
            dropped = True
    return dropped


def _cap_texts(slots: list[tuple[dict[str, Any], str, str]], excess: int) -> bool:
    """Cap the texts at the one length (JSON bytes) that removes ``excess`` bytes in all
    (water-filling: texts under the cap stay whole)."""
    sizes = sorted((entry_bytes(text) for _, _, text in slots), reverse=True)
    budget = sum(sizes) - excess
    cap = 0
    for k in range(1, len(sizes) + 1):
        rest = sum(sizes[k:])
        cap = (budget - rest) // k
        if k == len(sizes) or cap >= sizes[k]:
            break
    cut = False
    for holder, name, text in slots:
        if entry_bytes(text) > cap:
            holder[name] = _cut(text, max(cap, 0))
            cut = True
    return cut


def _texts(entry: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, str]]:
    """Every cuttable text in an entry, as (holder, field name, text)."""
    for part, names in (("request", ("prompt", "system")), ("result", ("text",))):
        holder = entry.get(part)
        if isinstance(holder, dict):
            for name in names:
                if isinstance(holder.get(name), str):
                    yield holder, name, holder[name]
    for fb in entry.get("pending") or []:
        for name in ("correction", "label"):
            if isinstance(fb.get(name), str):
                yield fb, name, fb[name]
        metadata = fb.get("metadata")
        if isinstance(metadata, dict) and METADATA_DROPPED not in metadata:
            for name, value in metadata.items():
                if isinstance(value, str):
                    yield metadata, name, value


_LAST_SPACE = re.compile(r"\s\S*\Z")


def _cut(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` (JSON, marker included), at a word boundary
    (so no half an e-mail address or card number is left for the redactor to miss)."""
    body = text[: -len(TRUNCATED)] if text.endswith(TRUNCATED) else text
    room = max_bytes - entry_bytes(TRUNCATED)
    if room <= 2:
        return TRUNCATED
    per_char = max(entry_bytes(body) - 2, 1) / max(len(body), 1)
    keep = min(len(body), int((room - 2) / per_char))
    while keep > 0 and entry_bytes(body[:keep]) > room:
        keep -= max(1, (entry_bytes(body[:keep]) - room) // 12)
    head = body[: max(keep, 0)]
    if 0 < keep < len(body) and not body[keep].isspace():
        space = _LAST_SPACE.search(head, max(0, keep - 200))
        if space is not None:  # else one very long token: cut it where it is
            head = head[: space.start()]
    return head + TRUNCATED


def _throwaway_pseudonymizer() -> Callable[[str | None], str | None]:
    import secrets

    from streams.redaction import Pseudonymizer

    return Pseudonymizer(secrets.token_bytes(32)).pseudonym
