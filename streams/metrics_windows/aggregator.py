"""Tumbling event-time windows over results, dead letters and feedback: a pure state machine.

Every input is a decoded record (``InferenceResult``, ``DeadLetter`` or ``FeedbackEvent``
dict) with, optionally, the :class:`Source` it was read from. Each record is counted in one
window of every configured length (``window_s``, default 10 s, and the ``rollup_s`` rollup,
default 60 s), keyed by model, model version and tenant.

Promises (tested in ``tests/unit/test_metrics_windows.py``):

* **Event time, bounded lateness.** The watermark is the largest event time seen minus
  ``lateness_s``; it never moves back. A window closes (its ``MetricsWindow`` record goes to
  the :attr:`~WindowAggregator.outbox`) once the watermark reaches its end. When no record
  arrives for longer than ``lateness_s`` (wall time, from the injected clock), event time is
  taken to run on with the clock, so the last window of a burst closes too
  (:meth:`~WindowAggregator.advance`).
* **Late records are corrections, never dropped.** A record whose window is already closed
  is counted in a *correction* for that window: a record with ``correction: true``, the same
  window fields and an id of its own, holding only the late records. A correction closes one
  window length (of event time) after it opened. Late records are counted (``late_records``).
* **Each source offset once.** With a :class:`Source`, the aggregator remembers the next
  offset per topic-partition (:meth:`~WindowAggregator.positions`) and ignores a record below
  it, so records read again after a restart are not counted twice.
* **Serialisable.** :meth:`~WindowAggregator.to_state` / :meth:`~WindowAggregator.from_state`
  round-trip everything (open windows, corrections, watermark, positions, outbox, tenants,
  the feedback lookup): an aggregator rebuilt from its state mid-stream and fed the rest
  emits exactly what an uninterrupted one emits.
* **Bounded keys.** At most ``max_tenants`` tenants get windows of their own (the first ones
  seen); a record without a tenant, or of any further tenant, is counted under tenant ``""``.
  Feedback carries no model: it is counted for the model/version/tenant of its result when
  that result is among the last ``feedback_lookup`` results seen, else under model ``""``.
  Dead letters never reached a model and are counted under model ``""``.
* **Tenants from the requests.** Results carry no tenant: :meth:`~WindowAggregator.
  add_request` remembers the tenant of the last ``request_lookup`` requests that have one,
  and a result takes its request's tenant (a ``tenant`` on the result itself wins). A result
  whose request was not read (yet) is counted under tenant ``""``.
* **Annotations at close.** ``annotate(key)``, when set, returns fields added to a closed
  window's record (not to corrections): the drift readings of its version at that moment.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from streams.metrics_windows.window import WindowKey, WindowTotals

logger = logging.getLogger(__name__)

STATE_VERSION = 1
UNATTRIBUTED = ""  # model/version/tenant of what cannot be attributed


@dataclass(frozen=True, slots=True)
class WindowConfig:
    """How windows are cut. ``rollup_s`` 0 (or equal to ``window_s``) means no rollup."""

    window_s: int = 10
    rollup_s: int = 60
    lateness_s: float = 5.0
    max_tenants: int = 100
    feedback_lookup: int = 10_000
    request_lookup: int = 10_000
    relative_accuracy: float = 0.01
    worker: str = ""

    def __post_init__(self) -> None:
        if self.window_s < 1:
            raise ValueError(f"window_s must be at least 1, got {self.window_s}")
        if self.rollup_s < 0:
            raise ValueError(f"rollup_s must not be negative, got {self.rollup_s}")
        if self.lateness_s < 0:
            raise ValueError(f"lateness_s must not be negative, got {self.lateness_s}")
        if self.max_tenants < 0 or self.feedback_lookup < 0 or self.request_lookup < 0:
            raise ValueError("max_tenants, feedback_lookup, request_lookup must not be negative")

    @property
    def lengths(self) -> tuple[int, ...]:
        if self.rollup_s and self.rollup_s != self.window_s:
            return tuple(sorted((self.window_s, self.rollup_s)))
        return (self.window_s,)


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record was read: ``offset`` is its offset in ``topic``/``partition``."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int = 0


@dataclass(slots=True)
class _Correction:
    totals: WindowTotals
    opened_at: int  # the watermark when it opened (part of its id)
    close_at: int  # watermark at which it is published


class WindowAggregator:
    """Open windows, corrections and the outbox of closed ones; see the module docstring.

    ``clock`` returns wall time in epoch milliseconds; it is used only for ``closed_at``
    and for closing windows when no record arrives.
    """

    def __init__(self, config: WindowConfig, clock: Callable[[], int]) -> None:
        self.config = config
        self._clock = clock
        self._lateness_ms = int(config.lateness_s * 1000)
        self._windows: dict[WindowKey, WindowTotals] = {}
        self._corrections: dict[WindowKey, _Correction] = {}
        self._next_close: int | None = None  # smallest end/close_at of what is open
        self._max_event: int | None = None
        self._watermark: int | None = None
        self._last_arrival = clock()
        self._positions: dict[tuple[str, int], int] = {}
        self._tenants: dict[str, None] = {}  # insertion-ordered set
        self._lookup: dict[str, tuple[str, str, str]] = {}  # request_id -> model key
        self._request_tenants: dict[str, str] = {}  # request_id -> tenant, from llm.requests
        self._outbox: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        #: fields added to each closed (non-correction) window's record; see the docstring
        self.annotate: Callable[[WindowKey], Mapping[str, Any]] | None = None

    # -- inputs ----------------------------------------------------------------------------
    def add_request(self, record: Mapping[str, Any], source: Source | None = None) -> bool:
        """Remember an ``InferenceRequest``'s tenant for its result (not counted in windows).
        False when ``source`` was counted already."""
        if not self._accept(source):
            return False
        request_id = str(record.get("request_id") or "")
        tenant = record.get("tenant")
        if request_id and tenant and self.config.request_lookup:
            self._request_tenants.pop(request_id, None)
            self._request_tenants[request_id] = str(tenant)
            while len(self._request_tenants) > self.config.request_lookup:
                del self._request_tenants[next(iter(self._request_tenants))]
        self.counts["requests"] += 1
        return True

    def request_tenant(self, record: Mapping[str, Any]) -> str | None:
        """The tenant a result is attributed to before folding: its own ``tenant`` field,
        else its request's, else None."""
        own = record.get("tenant")
        if own:
            return str(own)
        return self._request_tenants.get(str(record.get("request_id") or ""))

    def add_result(self, record: Mapping[str, Any], source: Source | None = None) -> bool:
        """Count an ``InferenceResult``. False when ``source`` was counted already."""
        if not self._accept(source):
            return False
        model = str(record.get("model") or UNATTRIBUTED)
        version = str(record.get("model_version") or UNATTRIBUTED)
        tenant = self._tenant(self.request_tenant(record))
        self._request_tenants.pop(str(record.get("request_id") or ""), None)
        request_id = record.get("request_id")
        if request_id and self.config.feedback_lookup:
            self._lookup.pop(request_id, None)
            self._lookup[request_id] = (model, version, tenant)
            while len(self._lookup) > self.config.feedback_lookup:
                del self._lookup[next(iter(self._lookup))]
        self._add(
            self._event_time(record, source),
            (model, version, tenant),
            lambda totals: totals.add_result(record),
        )
        self.counts["results"] += 1
        return True

    def add_dead_letter(self, record: Mapping[str, Any], source: Source | None = None) -> bool:
        """Count a ``DeadLetter`` (under model ``""``)."""
        if not self._accept(source):
            return False
        self._add(
            self._event_time(record, source),
            (UNATTRIBUTED, UNATTRIBUTED, UNATTRIBUTED),
            lambda totals: totals.add_dead_letter(record),
        )
        self.counts["dead_letters"] += 1
        return True

    def add_feedback(self, record: Mapping[str, Any], source: Source | None = None) -> bool:
        """Count a ``FeedbackEvent`` for the model of its result when that is known."""
        if not self._accept(source):
            return False
        key = self._lookup.get(str(record.get("request_id") or ""))
        if key is None:
            key = (UNATTRIBUTED, UNATTRIBUTED, UNATTRIBUTED)
            self.counts["feedback_unattributed"] += 1
        self._add(self._event_time(record, source), key, lambda totals: totals.add_feedback(record))
        self.counts["feedback"] += 1
        return True

    def skip(self, source: Source) -> bool:
        """Move past a record that is not counted (undecodable). False if seen already."""
        if not self._accept(source):
            return False
        self.counts["skipped"] += 1
        return True

    def advance(self) -> list[dict[str, Any]]:
        """Let event time run on with the clock when nothing arrived for ``lateness_s``,
        close what that closes, and return the records it closed (also in the outbox)."""
        if self._max_event is None:
            return []
        idle = self._clock() - self._last_arrival
        if idle > self._lateness_ms:
            self._raise_watermark(self._max_event - 2 * self._lateness_ms + idle)
        return self._close()

    # -- outputs ---------------------------------------------------------------------------
    @property
    def outbox(self) -> list[dict[str, Any]]:
        """Closed windows and corrections not yet acknowledged, oldest first (a copy)."""
        return list(self._outbox)

    def acknowledge(self, window_ids: Iterable[str]) -> None:
        """Drop published records from the outbox."""
        done = set(window_ids)
        self._outbox = [r for r in self._outbox if r["window_id"] not in done]

    def positions(self) -> dict[tuple[str, int], int]:
        """Next offset to read per (topic, partition): everything below is counted."""
        return dict(self._positions)

    @property
    def watermark(self) -> int | None:
        return self._watermark

    @property
    def open_windows(self) -> list[WindowKey]:
        return sorted(self._windows)

    # -- the work --------------------------------------------------------------------------
    def _accept(self, source: Source | None) -> bool:
        self._last_arrival = self._clock()
        if source is None:
            return True
        tp = (source.topic, source.partition)
        expected = self._positions.get(tp)
        if expected is not None and source.offset < expected:
            self.counts["duplicates"] += 1
            return False
        if expected is not None and source.offset > expected:
            self.counts["offset_gaps"] += 1  # compaction, transactions or a skipped range
        self._positions[tp] = source.offset + 1
        return True

    @staticmethod
    def _event_time(record: Mapping[str, Any], source: Source | None) -> int:
        created = int(record.get("created_at") or 0)
        if created > 0:
            return created
        return source.timestamp_ms if source is not None else 0

    def _tenant(self, tenant: Any) -> str:
        if not tenant:
            return UNATTRIBUTED
        name = str(tenant)
        if name in self._tenants:
            return name
        if len(self._tenants) < self.config.max_tenants:
            self._tenants[name] = None
            return name
        self.counts["tenants_folded"] += 1
        return UNATTRIBUTED

    def _add(
        self, event_ms: int, what: tuple[str, str, str], apply: Callable[[WindowTotals], None]
    ) -> None:
        if event_ms <= 0:
            # no created_at and no broker timestamp: count it at the watermark (or now)
            event_ms = self._max_event if self._max_event is not None else self._clock()
        if self._max_event is None or event_ms > self._max_event:
            self._max_event = event_ms
        self._raise_watermark(self._max_event - self._lateness_ms)
        late = False
        for length_s in self.config.lengths:
            length_ms = length_s * 1000
            start = event_ms - event_ms % length_ms
            key = WindowKey(length_s, start, *what)
            if self._watermark is not None and key.end_ms <= self._watermark:
                late = True
                apply(self._correction(key).totals)
            else:
                totals = self._windows.get(key)
                if totals is None:
                    totals = self._windows[key] = WindowTotals(self.config.relative_accuracy)
                    self._schedule(key.end_ms)
                apply(totals)
        if late:
            self.counts["late_records"] += 1
        self._close()

    def _correction(self, key: WindowKey) -> _Correction:
        found = self._corrections.get(key)
        if found is None:
            assert self._watermark is not None
            close_at = self._watermark + self.config.window_s * 1000
            found = self._corrections[key] = _Correction(
                WindowTotals(self.config.relative_accuracy), self._watermark, close_at
            )
            self._schedule(close_at)
        return found

    def _schedule(self, at: int) -> None:
        if self._next_close is None or at < self._next_close:
            self._next_close = at

    def _raise_watermark(self, candidate: int) -> None:
        if self._watermark is None or candidate > self._watermark:
            self._watermark = candidate

    def _close(self) -> list[dict[str, Any]]:
        mark = self._watermark
        if mark is None or self._next_close is None or self._next_close > mark:
            return []
        closed: list[dict[str, Any]] = []
        now = self._clock()
        worker = self.config.worker
        for key in sorted(k for k in self._windows if k.end_ms <= mark):
            totals = self._windows.pop(key)
            record = totals.to_record(
                key, window_id=key.window_id, correction=False, closed_at=now, worker=worker
            )
            if self.annotate is not None and key.model:
                record.update(self.annotate(key))
            closed.append(record)
            self.counts["windows"] += 1
        for key in sorted(k for k, c in self._corrections.items() if c.close_at <= mark):
            correction = self._corrections.pop(key)
            closed.append(
                correction.totals.to_record(
                    key,
                    window_id=f"{key.window_id}:correction@{correction.opened_at}",
                    correction=True,
                    closed_at=now,
                    worker=worker,
                )
            )
            self.counts["corrections"] += 1
        ends = [k.end_ms for k in self._windows] + [c.close_at for c in self._corrections.values()]
        self._next_close = min(ends) if ends else None
        self._outbox.extend(closed)
        return closed

    # -- state -----------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Everything, as plain JSON-friendly values."""
        return {
            "version": STATE_VERSION,
            "max_event": self._max_event,
            "watermark": self._watermark,
            "windows": [[k.to_list(), t.to_state()] for k, t in sorted(self._windows.items())],
            "corrections": [
                [k.to_list(), c.totals.to_state(), c.opened_at, c.close_at]
                for k, c in sorted(self._corrections.items())
            ],
            "positions": [[t, p, o] for (t, p), o in sorted(self._positions.items())],
            "tenants": list(self._tenants),
            "lookup": [[rid, *key] for rid, key in self._lookup.items()],
            "request_tenants": list(self._request_tenants.items()),
            "outbox": list(self._outbox),
            "counts": dict(self.counts),
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], config: WindowConfig, clock: Callable[[], int]
    ) -> WindowAggregator:
        """An aggregator that carries on where the one that wrote ``state`` stopped."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown metrics state version {state.get('version')!r}")
        agg = cls(config, clock)
        accuracy = config.relative_accuracy
        agg._max_event = state["max_event"]
        agg._watermark = state["watermark"]
        for key, totals in state["windows"]:
            window = WindowKey.from_list(key)
            agg._windows[window] = WindowTotals.from_state(totals, accuracy)
            agg._schedule(window.end_ms)
        for key, totals, opened_at, close_at in state["corrections"]:
            agg._corrections[WindowKey.from_list(key)] = _Correction(
                WindowTotals.from_state(totals, accuracy), int(opened_at), int(close_at)
            )
            agg._schedule(int(close_at))
        agg._positions = {(str(t), int(p)): int(o) for t, p, o in state["positions"]}
        agg._tenants = dict.fromkeys(state["tenants"])
        agg._lookup = {rid: (m, v, t) for rid, m, v, t in state["lookup"]}
        agg._request_tenants = {str(r): str(t) for r, t in state.get("request_tenants", [])}
        agg._outbox = [dict(r) for r in state["outbox"]]
        agg.counts = Counter(state["counts"])
        return agg
