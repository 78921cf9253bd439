"""One window's running totals, and the ``MetricsWindow`` record built from them.

Pure: no clock, no I/O. A :class:`WindowTotals` is what the aggregator keeps per open window
(and per open correction); its state is plain JSON so the aggregator can be serialised.
Answer quality (:class:`~streams.monitors.quality.QualityCounts`) and the engine-seconds
cost are counted here, per window; the drift readings of a version are not window sums:
the aggregator's ``annotate`` hook adds them when the window closes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streams.metrics_windows.sketch import QuantileSketch
from streams.monitors.quality import QualityCounts

STAGES = ("queue", "batch_wait", "inference", "total")
QUANTILES = (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99))
#: Filled by ``annotate`` (the version's drift reading when the window closed); else null.
DRIFT_FIELDS = (
    "prompt_drift",
    "prompt_drift_p_value",
    "prompt_drift_flagged",
    "prompt_drift_reference",
    "prompt_drift_current",
    "response_length_drift",
    "response_length_drift_p_value",
    "response_length_drift_flagged",
)


def engine_seconds(record: Mapping[str, Any]) -> float:
    """A result's share of its batch's engine call: ``inference_ms / batch_size`` in seconds
    (the whole call when the batch size is unknown)."""
    timings = record.get("timings") or {}
    inference_ms = max(float(timings.get("inference_ms") or 0.0), 0.0)
    batch_size = int(record.get("batch_size") or 0)
    return inference_ms / max(batch_size, 1) / 1000.0


@dataclass(frozen=True, slots=True, order=True)
class WindowKey:
    """Which window: its length, its start (epoch ms) and what it is keyed by."""

    length_s: int
    start_ms: int
    model: str
    model_version: str
    tenant: str

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.length_s * 1000

    @property
    def window_id(self) -> str:
        """Deterministic: the same window always has the same id, on any worker, after any
        restart, so a consumer can deduplicate a window published twice."""
        return f"{self.length_s}s:{self.start_ms}:{self.model}:{self.model_version}:{self.tenant}"

    def to_list(self) -> list[Any]:
        return [self.length_s, self.start_ms, self.model, self.model_version, self.tenant]

    @classmethod
    def from_list(cls, data: list[Any]) -> WindowKey:
        length_s, start_ms, model, version, tenant = data
        return cls(int(length_s), int(start_ms), str(model), str(version), str(tenant))


class WindowTotals:
    """Counts, token sums, batch sizes, feedback and one latency sketch per stage."""

    def __init__(self, relative_accuracy: float) -> None:
        self.relative_accuracy = relative_accuracy
        self.records = 0
        self.requests: dict[str, int] = {}
        self.dead_letters: dict[str, int] = {}
        self.latency = {stage: QuantileSketch(relative_accuracy) for stage in STAGES}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.batches = 0
        self.batch_size_sum = 0
        self.batch_size_max = 0
        self.feedback_count = 0
        self.feedback_score_sum = 0
        self.quality = QualityCounts()
        self.engine_seconds = 0.0

    # -- inputs ----------------------------------------------------------------------------
    def add_result(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        status = str(record.get("status") or "ERROR")
        self.requests[status] = self.requests.get(status, 0) + 1
        timings = record.get("timings") or {}
        for stage in STAGES:
            value = timings.get(f"{stage}_ms")
            if value is not None:
                self.latency[stage].add(max(float(value), 0.0))  # clock skew: never < 0
        self.prompt_tokens += int(record.get("prompt_tokens") or 0)
        self.completion_tokens += int(record.get("completion_tokens") or 0)
        batch_size = int(record.get("batch_size") or 0)
        if batch_size > 0:
            self.batches += 1
            self.batch_size_sum += batch_size
            self.batch_size_max = max(self.batch_size_max, batch_size)
        self.quality.add_result(record)
        self.engine_seconds += engine_seconds(record)

    def add_dead_letter(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        reason = str(record.get("reason_code") or "unknown")
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1

    def add_feedback(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        self.feedback_count += 1
        self.feedback_score_sum += int(record.get("score") or 0)

    # -- output ----------------------------------------------------------------------------
    def to_record(
        self,
        key: WindowKey,
        *,
        window_id: str,
        correction: bool,
        closed_at: int,
        worker: str,
    ) -> dict[str, Any]:
        """The ``MetricsWindow`` record (schemas/avro/MetricsWindow.avsc)."""
        latency = {}
        for stage, sketch in self.latency.items():
            summary: dict[str, Any] = {"count": sketch.count}
            for name, q in QUANTILES:
                summary[name] = sketch.quantile(q)
            summary["max_ms"] = sketch.max if sketch.count else None
            summary["mean_ms"] = sketch.mean
            summary["sketch"] = sketch.to_dict()
            latency[stage] = summary
        record: dict[str, Any] = {
            "window_id": window_id,
            "window_start": key.start_ms,
            "window_end": key.end_ms,
            "length_s": key.length_s,
            "model": key.model,
            "model_version": key.model_version,
            "tenant": key.tenant,
            "correction": correction,
            "records": self.records,
            "late_records": self.records if correction else 0,
            "requests": dict(sorted(self.requests.items())),
            "requests_total": sum(self.requests.values()),
            "dead_letters": dict(sorted(self.dead_letters.items())),
            "dead_letters_total": sum(self.dead_letters.values()),
            "latency": latency,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": self.completion_tokens / key.length_s,
            "batches": self.batches,
            "batch_size_mean": self.batch_size_sum / self.batches if self.batches else None,
            "batch_size_max": self.batch_size_max,
            "feedback_count": self.feedback_count,
            "feedback_score_sum": self.feedback_score_sum,
            "feedback_mean_score": (
                self.feedback_score_sum / self.feedback_count if self.feedback_count else None
            ),
            "closed_at": closed_at,
            "worker": worker,
        }
        quality = self.quality
        answered = quality.answers > 0
        record.update(quality.window_fields())
        record.update(
            {
                "truncated_rate": quality.truncated_rate,
                "answers": quality.answers if answered else None,
                "refusals": quality.refusals if answered else None,
                "empty_answers": quality.empty if answered else None,
                "truncated_answers": quality.truncated if answered else None,
                "length_finishes": quality.length_finish if answered else None,
                "engine_seconds": self.engine_seconds if self.requests else None,
            }
        )
        for name in DRIFT_FIELDS:
            record[name] = None  # the aggregator's annotate hook fills them
        return record

    # -- state -----------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "requests": dict(self.requests),
            "dead_letters": dict(self.dead_letters),
            "latency": {stage: sketch.to_dict() for stage, sketch in self.latency.items()},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "batches": self.batches,
            "batch_size_sum": self.batch_size_sum,
            "batch_size_max": self.batch_size_max,
            "feedback_count": self.feedback_count,
            "feedback_score_sum": self.feedback_score_sum,
            "quality": self.quality.to_state(),
            "engine_seconds": self.engine_seconds,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], relative_accuracy: float) -> WindowTotals:
        totals = cls(relative_accuracy)
        totals.records = int(state["records"])
        totals.requests = {str(k): int(v) for k, v in state["requests"].items()}
        totals.dead_letters = {str(k): int(v) for k, v in state["dead_letters"].items()}
        totals.latency = {
            stage: QuantileSketch.from_dict(state["latency"][stage]) for stage in STAGES
        }
        for name in (
            "prompt_tokens",
            "completion_tokens",
            "batches",
            "batch_size_sum",
            "batch_size_max",
            "feedback_count",
            "feedback_score_sum",
        ):
            setattr(totals, name, int(state[name]))
        # absent in a state written before the quality counts: start them at zero
        totals.quality = QualityCounts.from_state(state.get("quality") or {})
        totals.engine_seconds = float(state.get("engine_seconds") or 0.0)
        return totals
