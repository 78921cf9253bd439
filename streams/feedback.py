"""The feedback join: requests + results + human feedback → redacted training examples.

One Faust agent reads ``llm.requests``, ``llm.results`` and ``llm.feedback`` (all keyed by
request_id with the same partition count, so a request's three records land on the same
partition and the same worker) and keeps what it needs in a changelog-backed table.
All table writes happen inside that agent's own iteration (FAUST_NOTES #1: a table written
from anywhere else crash-loops). This module is the logic; the agent in ``streams.app`` only
decodes and hands records over, then publishes what comes back.

Timing rules, all on event time (record timestamps), so replays behave like live runs:

* feedback for a request whose result is in the table → a training example at once;
* feedback that arrives before its result (or even before its request) is parked in the
  entry and joined when the result arrives; if nothing arrives within ``wait_ms`` it is
  dead-lettered (``unknown_request`` / ``no_result``), never dropped silently;
* an entry lives ``window_ms`` after its last update; then it becomes a tombstone for
  another window, so feedback that comes too late is dead-lettered as ``outside_window``
  (not mistaken for an unknown request); then it is deleted.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SCORES = (-1, 0, 1)


@dataclass(frozen=True)
class Emit:
    """A record the agent must publish: a training example or a feedback dead letter."""

    kind: str  # "training" | "dlq"
    key: bytes | None
    record: dict[str, Any]


class Redacts:
    """What the joiner needs from a redactor (``streams.redaction.Redactor`` fits)."""

    def redact(self, text: str) -> Any: ...  # returns an object with .text and .counts


class FeedbackJoiner:
    """Joins per request_id; ``table`` is the Faust table (a plain dict in unit tests)."""

    def __init__(
        self,
        table: MutableMapping[str, dict[str, Any]],
        redactor: Redacts,
        *,
        window_ms: int,
        wait_ms: int,
        max_correction_chars: int = 16_000,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.table = table
        self.redactor = redactor
        self.window_ms = window_ms
        self.wait_ms = wait_ms
        self.max_correction_chars = max_correction_chars
        self._on_outcome = on_outcome or (lambda _outcome: None)
        self._due: dict[int, list[tuple[int, str]]] = {}  # a heap per partition
        self._clock: dict[int, int] = {}
        self.counts: Counter[str] = Counter()

    # -- inputs ------------------------------------------------------------------------
    def on_request(self, partition: int, ts: int, record: Mapping[str, Any]) -> list[Emit]:
        now = self._tick(partition, ts)
        rid = record["request_id"]
        entry = dict(self.table.get(rid) or {})
        if entry.get("expired_ms") is not None:
            entry = {}
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
        entry = dict(self.table.get(rid) or {})
        if entry.get("expired_ms") is not None:
            entry = {}
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
        """A decoded FeedbackEvent. Invalid ones come back as dead letters."""
        now = self._tick(partition, ts)
        rid = record.get("request_id") or ""
        problem = self._validate(record)
        if problem is not None:
            return [self._dead(record, *problem)]
        entry = self.table.get(rid)
        if entry is not None and entry.get("expired_ms") is not None:
            return [self._dead(record, "outside_window", "feedback arrived after the window")]
        if entry is not None and "result" in entry and "request" in entry:
            if now - int(entry["seen_ms"]) > self.window_ms:
                return [self._dead(record, "outside_window", "feedback arrived after the window")]
            return [self._example(rid, entry, record)]
        # Early: before its result (or its request). Park it in the entry.
        entry = dict(entry or {})
        entry["pending"] = [*entry.get("pending", []), {**record, "_parked_ms": now}]
        self.table[rid] = {**entry, "seen_ms": entry.get("seen_ms", now)}
        self._schedule(partition, now + self.wait_ms, rid)
        self._count("early")
        return []

    def sweep(self, partition: int) -> list[Emit]:
        """Handle everything due on this partition by its event-time clock."""
        now = self._clock.get(partition)
        queue = self._due.get(partition)
        out: list[Emit] = []
        while queue and now is not None and queue[0][0] <= now:
            _, rid = heapq.heappop(queue)
            out.extend(self._expire(partition, rid, now))
        return out

    # -- internals ---------------------------------------------------------------------
    def _tick(self, partition: int, ts: int) -> int:
        now = max(self._clock.get(partition, 0), ts)
        self._clock[partition] = now
        return now

    def _store(self, partition: int, rid: str, entry: dict[str, Any], now: int) -> list[Emit]:
        entry["seen_ms"] = now
        out: list[Emit] = []
        pending = entry.pop("pending", [])
        if pending and "request" in entry and "result" in entry:
            out = [self._example(rid, entry, fb) for fb in pending]
        elif pending:
            entry["pending"] = pending
        self.table[rid] = entry
        self._schedule(partition, now + self.window_ms, rid)
        return out

    def _expire(self, partition: int, rid: str, now: int) -> list[Emit]:
        entry = self.table.get(rid)
        if entry is None:
            return []
        out: list[Emit] = []
        if entry.get("expired_ms") is not None:
            if now - int(entry["expired_ms"]) >= self.window_ms:
                del self.table[rid]
            else:
                self._schedule(partition, int(entry["expired_ms"]) + self.window_ms, rid)
            return []
        pending = entry.get("pending", [])
        waiting = [fb for fb in pending if now - int(fb["_parked_ms"]) < self.wait_ms]
        for fb in pending:
            if fb not in waiting:
                if "request" not in entry:
                    out.append(
                        self._dead(fb, "unknown_request", "no request with this id was seen")
                    )
                else:
                    out.append(self._dead(fb, "no_result", "the request has no result yet"))
        if waiting:
            entry = {**entry, "pending": waiting}
            self.table[rid] = entry
            self._schedule(
                partition, min(int(f["_parked_ms"]) for f in waiting) + self.wait_ms, rid
            )
        elif pending:
            entry = {k: v for k, v in entry.items() if k != "pending"}
            self.table[rid] = entry
        if now - int(entry["seen_ms"]) >= self.window_ms and not waiting:
            self.table[rid] = {"expired_ms": now, "seen_ms": entry["seen_ms"]}
            self._schedule(partition, now + self.window_ms, rid)
        elif not waiting:
            self._schedule(partition, int(entry["seen_ms"]) + self.window_ms, rid)
        return out

    def _schedule(self, partition: int, due: int, rid: str) -> None:
        heapq.heappush(self._due.setdefault(partition, []), (due, rid))

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
            "user": _pseudonymous(feedback.get("user")),
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
        self._count("joined")
        return Emit("training", rid.encode(), record)

    def _dead(self, feedback: Mapping[str, Any], code: str, reason: str) -> Emit:
        self._count(f"dlq:{code}")
        rid = feedback.get("request_id") or None
        return Emit(
            "dlq",
            rid.encode() if rid else None,
            {
                "reason_code": code,
                "reason": reason,
                "request_id": rid,
                "feedback": {k: v for k, v in feedback.items() if not k.startswith("_")},
            },
        )

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self._on_outcome(outcome)


def _pseudonymous(user: str | None) -> str | None:
    """Keep ids that look pseudonymous; hash anything that looks like an email or a name."""
    if not user:
        return None
    if "@" in user or " " in user.strip():
        return "u-" + hashlib.sha256(user.encode()).hexdigest()[:16]
    return user
