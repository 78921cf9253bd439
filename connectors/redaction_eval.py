"""``sluice redaction eval``: recall and precision of the PII redactor on a labelled set.

The set is JSON lines, one snippet each: ``{"text": ..., "spans": [{"start", "end",
"type"}]}`` (``tests/data/redaction_set.jsonl`` by default, made by
``tests/data/make_redaction_set.py``). Matching is by overlap, per type:

* a labelled span is *found* when a finding of the same type overlaps it (recall);
* a finding is *correct* when it overlaps a labelled span of the same type (precision).

"overall" sums every type. "any type" ignores the type: a labelled span counts as found when
any finding overlaps it (the text is hidden, even if under another placeholder), a finding
is correct when it overlaps any labelled span.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.redaction import KINDS, Redactor

DEFAULT_SET = Path(__file__).resolve().parents[1] / "tests" / "data" / "redaction_set.jsonl"
OVERALL = "overall"
ANY_TYPE = "any type"


@dataclass
class Score:
    """Counts for one type: labelled spans found / missed, findings right / wrong."""

    found: int = 0
    missed: int = 0
    correct: int = 0
    wrong: int = 0

    @property
    def recall(self) -> float:
        total = self.found + self.missed
        return self.found / total if total else 1.0

    @property
    def precision(self) -> float:
        total = self.correct + self.wrong
        return self.correct / total if total else 1.0

    def add(self, other: Score) -> None:
        self.found += other.found
        self.missed += other.missed
        self.correct += other.correct
        self.wrong += other.wrong


@dataclass
class Report:
    """Scores per type plus ``overall`` and ``any type``; the misses and false findings."""

    scores: dict[str, Score] = field(default_factory=dict)
    misses: list[tuple[str, str, str]] = field(default_factory=list)  # (id, type, value)
    false: list[tuple[str, str, str]] = field(default_factory=list)
    snippets: int = 0

    def score(self, kind: str) -> Score:
        return self.scores.setdefault(kind, Score())


def load_set(path: Path) -> list[dict[str, Any]]:
    """The snippets of a JSON-lines set; each needs ``text`` and ``spans``."""
    snippets = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("text"), str) or not isinstance(record.get("spans"), list):
                raise ValueError(f"{path}:{number}: needs 'text' and 'spans'")
            snippets.append(record)
    return snippets


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def evaluate(snippets: Iterable[Mapping[str, Any]], redactor: Redactor) -> Report:
    """Compare the redactor's findings with the labels of every snippet."""
    report = Report()
    typed = Score()
    untyped = Score()
    for index, snippet in enumerate(snippets):
        report.snippets += 1
        sid = str(snippet.get("id", index))
        text = snippet["text"]
        gold = [(int(s["start"]), int(s["end"]), str(s["type"])) for s in snippet["spans"]]
        found = redactor.find(text)
        for start, end, kind in gold:
            score = report.score(kind)
            if any(k == kind and _overlaps((start, end), (s, e)) for s, e, k in found):
                score.found += 1
                typed.found += 1
            else:
                score.missed += 1
                typed.missed += 1
                report.misses.append((sid, kind, text[start:end]))
            if any(_overlaps((start, end), (s, e)) for s, e, _ in found):
                untyped.found += 1
            else:
                untyped.missed += 1
        for start, end, kind in found:
            score = report.score(kind)
            if any(k == kind and _overlaps((start, end), (s, e)) for s, e, k in gold):
                score.correct += 1
                typed.correct += 1
            else:
                score.wrong += 1
                typed.wrong += 1
                report.false.append((sid, kind, text[start:end]))
            if any(_overlaps((start, end), (s, e)) for s, e, _ in gold):
                untyped.correct += 1
            else:
                untyped.wrong += 1
    report.scores[OVERALL] = typed
    report.scores[ANY_TYPE] = untyped
    return report


def format_report(report: Report, *, show_errors: bool = False) -> str:
    """A plain-text table: one row per type, then overall and any type."""
    order = [k for k in KINDS if k in report.scores]
    order += sorted(k for k in report.scores if k not in KINDS and k not in (OVERALL, ANY_TYPE))
    order += [OVERALL, ANY_TYPE]
    lines = [
        f"{report.snippets} snippets",
        f"{'type':<12} {'labelled':>8} {'found':>6} {'recall':>7} "
        f"{'findings':>8} {'right':>6} {'precision':>9}",
    ]
    for kind in order:
        s = report.scores[kind]
        lines.append(
            f"{kind:<12} {s.found + s.missed:>8} {s.found:>6} {s.recall:>7.1%} "
            f"{s.correct + s.wrong:>8} {s.correct:>6} {s.precision:>9.1%}"
        )
    if show_errors:
        lines += [f"missed {kind} in {sid}: {value!r}" for sid, kind, value in report.misses]
        lines += [f"false {kind} in {sid}: {value!r}" for sid, kind, value in report.false]
    return "\n".join(lines)


def run(path: Path | None = None, *, region: str = "US", show_errors: bool = False) -> Report:
    """Load the set, evaluate a warmed-up :class:`Redactor`, print the table, return it."""
    redactor = Redactor(region=region)
    redactor.warm_up()
    report = evaluate(load_set(path or DEFAULT_SET), redactor)
    print(format_report(report, show_errors=show_errors))
    return report
