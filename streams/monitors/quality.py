"""Answer quality counts of one window: refusals, empty and truncated answers, the
``length`` finish reason, feedback. Pure, mergeable, plain-JSON state.

Rates are over the answers the model gave (status ``OK``): an ERROR or EXPIRED result has
no answer to judge (those are in the window's ``requests`` by status).

* **empty**: the text is blank after stripping whitespace;
* **truncated**: finish reason ``length`` and the text does not end a sentence (the
  answer was cut mid-sentence, not merely long);
* **length finish**: finish reason ``length`` (the token limit ended it);
* **refusal**: :func:`streams.monitors.refusals.is_refusal`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from streams.monitors.refusals import is_refusal

_SENTENCE_END = (".", "!", "?", '"', "'", ")", "]", "`", "\u201d", "\u3002")


def is_empty(text: str | None) -> bool:
    return not (text or "").strip()


def is_truncated(text: str | None, finish_reason: str | None) -> bool:
    return finish_reason == "length" and not (text or "").rstrip().endswith(_SENTENCE_END)


@dataclass(slots=True)
class QualityCounts:
    """Counts for one window (or any set of results); add, merge, read rates."""

    answers: int = 0
    empty: int = 0
    truncated: int = 0
    length_finish: int = 0
    refusals: int = 0
    feedback_count: int = 0
    feedback_score_sum: int = 0

    def add_result(self, record: Mapping[str, Any]) -> None:
        """Count an ``InferenceResult``; results other than OK are not answers."""
        if record.get("status") != "OK":
            return
        text = record.get("text") or ""
        finish = record.get("finish_reason")
        self.answers += 1
        self.empty += is_empty(text)
        self.truncated += is_truncated(text, finish)
        self.length_finish += finish == "length"
        self.refusals += (not is_empty(text)) and is_refusal(text)

    def add_feedback(self, record: Mapping[str, Any]) -> None:
        self.feedback_count += 1
        self.feedback_score_sum += int(record.get("score") or 0)

    def merge(self, other: QualityCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def _rate(self, count: int) -> float | None:
        return count / self.answers if self.answers else None

    @property
    def empty_rate(self) -> float | None:
        return self._rate(self.empty)

    @property
    def truncated_rate(self) -> float | None:
        return self._rate(self.truncated)

    @property
    def length_finish_rate(self) -> float | None:
        return self._rate(self.length_finish)

    @property
    def refusal_rate(self) -> float | None:
        return self._rate(self.refusals)

    @property
    def feedback_mean_score(self) -> float | None:
        return self.feedback_score_sum / self.feedback_count if self.feedback_count else None

    def window_fields(self) -> dict[str, float | None]:
        """The ``MetricsWindow`` fields these counts fill (None: no answer in the window)."""
        return {
            "refusal_rate": self.refusal_rate,
            "empty_rate": self.empty_rate,
            "length_finish_rate": self.length_finish_rate,
        }

    def to_state(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> QualityCounts:
        return cls(**{name: int(state.get(name, 0)) for name in cls.__dataclass_fields__})
