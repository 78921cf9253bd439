"""What came back from a fuzz run, against what was sent. Pure functions over plain values.

Every sent payload must end in exactly one answer: a dead letter (matched by its source
partition and offset) or a result (matched by the request id the payload decodes to).
:func:`account` folds what was read back into a :class:`Tally`; :meth:`Tally.problems`
lists every broken invariant (empty: the run passed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from connectors.fuzzing.payloads import Expect, Payload


@dataclass(frozen=True)
class Sent:
    """A payload and where the broker put it."""

    payload: Payload
    partition: int
    offset: int


@dataclass
class Tally:
    """Running account of one fuzz run (feed it with :meth:`add_result`/:meth:`add_letter`)."""

    sent: list[Sent]
    by_offset: dict[tuple[int, int], int] = field(default_factory=dict)
    by_id: dict[str, int] = field(default_factory=dict)
    outputs: list[list[str]] = field(
        default_factory=list
    )  # per payload: "dlq:<code>"/"result:<status>"
    unexpected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.outputs = [[] for _ in self.sent]
        for i, s in enumerate(self.sent):
            self.by_offset[(s.partition, s.offset)] = i
            if s.payload.request_id is not None and s.payload.expect is not Expect.DLQ:
                self.by_id[s.payload.request_id] = i  # unique (see payloads.generate)
        for i, s in enumerate(self.sent):  # a result for one of these is a wrong answer
            if s.payload.request_id is not None and s.payload.expect is Expect.DLQ:
                self.by_id.setdefault(s.payload.request_id, i)

    # -- feeding --------------------------------------------------------------------------
    def add_result(self, result: dict[str, Any]) -> None:
        i = self.by_id.get(result.get("request_id"))  # type: ignore[arg-type]
        if i is None:
            self.unexpected.append(
                f"result for a request id never sent: {result.get('request_id')!r}"
            )
            return
        self.outputs[i].append(f"result:{result.get('status')}")

    def add_letter(self, letter: dict[str, Any]) -> None:
        i = self.by_offset.get((letter.get("source_partition"), letter.get("source_offset")))  # type: ignore[arg-type]
        if i is None:
            self.unexpected.append(
                f"dead letter for an offset never sent: {letter.get('source_partition')}"
                f"@{letter.get('source_offset')}"
            )
            return
        if not letter.get("reason"):
            self.unexpected.append(
                f"dead letter without a reason at offset {letter.get('source_offset')}"
            )
        self.outputs[i].append(f"dlq:{letter.get('reason_code')}")

    # -- reading --------------------------------------------------------------------------
    @property
    def accounted(self) -> int:
        return sum(1 for o in self.outputs if o)

    def missing(self) -> list[Sent]:
        return [s for s, o in zip(self.sent, self.outputs, strict=True) if not o]

    def duplicates(self) -> list[tuple[Sent, list[str]]]:
        return [(s, o) for s, o in zip(self.sent, self.outputs, strict=True) if len(o) > 1]

    def wrong(self) -> list[tuple[Sent, str]]:
        """Payloads answered against their expectation (the first output counts)."""
        found = []
        for s, o in zip(self.sent, self.outputs, strict=True):
            if not o:
                continue
            p, first = s.payload, o[0]
            if p.expect is Expect.DLQ and not first.startswith("dlq:"):
                found.append((s, f"must be dead-lettered, got {first}"))
            elif p.expect is Expect.ANSWER and first.startswith("dlq:"):
                found.append((s, f"must be answered, got {first}"))
            elif first == "result:ERROR":  # admitted, then the engine failed on it
                found.append((s, "answered ERROR: a batch-mate broke it, or the engine failed"))
            elif p.reason is not None and first != f"dlq:{p.reason}":
                found.append((s, f"reason {p.reason} expected, got {first}"))
        return found

    def summary(self) -> dict[str, Any]:
        """Counts for the report (plain values, JSON-ready)."""
        sent_by = Counter(s.payload.family for s in self.sent)
        must_dlq = [i for i, s in enumerate(self.sent) if s.payload.expect is Expect.DLQ]
        dlq_reasons: Counter[str] = Counter()
        answered: Counter[str] = Counter()
        for s, o in zip(self.sent, self.outputs, strict=True):
            if not o:
                continue
            if o[0].startswith("dlq:"):
                dlq_reasons[o[0][4:]] += 1
                continue
            p = s.payload
            if p.family == "valid":
                kind = "valid"
            elif p.expect is Expect.EITHER:
                kind = "still valid after mutation"
            else:
                kind = f"normalised or valid ({p.family})"
            answered[f"{kind}: {o[0][7:]}"] += 1
        return {
            "sent": len(self.sent),
            "sent_by_family": dict(sorted(sent_by.items())),
            "must_dlq": len(must_dlq),
            "must_dlq_in_dlq": sum(
                1 for i in must_dlq if self.outputs[i][:1] and self.outputs[i][0].startswith("dlq:")
            ),
            "may_decode": sum(1 for s in self.sent if s.payload.expect is Expect.EITHER),
            "dlq_by_reason": dict(dlq_reasons.most_common()),
            "answered": dict(sorted(answered.items())),
            "accounted": self.accounted,
            "missing": len(self.missing()),
            "duplicates": len(self.duplicates()),
            "wrong": len(self.wrong()),
            "unexpected": len(self.unexpected),
        }

    def problems(self, limit: int = 10) -> list[str]:
        """Every broken invariant, with up to ``limit`` examples each."""
        out: list[str] = []

        def show(s: Sent) -> str:
            p = s.payload
            return f"{p.family}/{p.case} at {s.partition}@{s.offset} (id {p.request_id!r})"

        missing = self.missing()
        if missing:
            out.append(
                f"{len(missing)} payloads have no answer: "
                + "; ".join(show(s) for s in missing[:limit])
            )
        dups = self.duplicates()
        if dups:
            out.append(
                f"{len(dups)} payloads answered more than once: "
                + "; ".join(f"{show(s)} {o}" for s, o in dups[:limit])
            )
        wrong = self.wrong()
        if wrong:
            out.append(
                f"{len(wrong)} payloads answered wrongly: "
                + "; ".join(f"{show(s)}: {why}" for s, why in wrong[:limit])
            )
        if self.unexpected:
            out.append(
                f"{len(self.unexpected)} unexpected records: " + "; ".join(self.unexpected[:limit])
            )
        return out


def account(
    sent: list[Sent], results: list[dict[str, Any]], letters: list[dict[str, Any]]
) -> Tally:
    """The tally of ``sent`` once ``results`` and ``letters`` were read back."""
    tally = Tally(sent)
    for r in results:
        tally.add_result(r)
    for d in letters:
        tally.add_letter(d)
    return tally
