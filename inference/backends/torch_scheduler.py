"""In-flight batching policy for the torch engine: which sequences run, and when others join.

Pure logic, no torch: the engine's decode thread drives it with plain values and applies
what it decides to the KV cache.

* :class:`StopWatcher` follows one sequence's text incrementally (a few tokens decoded per
  step, never the whole tail) and says when a stop string has appeared.
* :class:`SequenceState` is one request in flight: its generated ids, why it finished.
* :class:`InflightScheduler` holds the waiting queue and the running set. Sequences occupy
  rows ``0..n-1`` (row = KV-cache slot); :meth:`InflightScheduler.retire` frees a row at
  once and moves the last row into the hole, so the running rows stay contiguous and a
  decode step reads the cache as one slice. Admissions happen at step boundaries and are
  batched: a lone request on an idle engine starts at once, but while others decode, new
  requests join only when enough wait to fill a group (``admit_batch`` or every free slot)
  or the oldest has waited ``admit_wait_steps`` steps. Each admission round stalls the
  running sequences for one prefill, so admitting one request per step would spend most
  steps in prefill under load. A round is bounded by free slots, the token budget of the
  running set (prompt + ``max_new_tokens`` each) and ``max_prefill_tokens`` (one prompt
  longer than that still runs alone, so nothing waits forever). Waiting requests are served
  first come, first served.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Decode = Callable[[Sequence[int]], str]

_INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes a partial UTF-8 character to


class StopWatcher:
    """Incremental detokenizer that spots stop strings as they appear.

    Keeps two offsets into the ids (the vLLM scheme): each step decodes only the ids from
    ``prefix`` on, twice (with and without the newest ids), and takes the difference as the
    new text. A partial UTF-8 character (decoded as U+FFFD) waits for its next byte. Stop
    strings are searched only where they could have appeared: the new text plus the
    ``len(stop) - 1`` characters before it.
    """

    def __init__(self, stops: Iterable[str], decode: Decode) -> None:
        self.stops = tuple(s for s in stops if s)
        self._decode = decode
        self._longest = max((len(s) for s in self.stops), default=0)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def push(self, token: int) -> bool:
        """Add one generated id; True once any stop string is in the text."""
        self._ids.append(token)
        if not self.stops:
            return False
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) <= len(before) or now.endswith(_INCOMPLETE):
            return False  # nothing printable yet (a partial character, a special token)
        new = now[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        start = max(0, len(self.text) - self._longest + 1)
        self.text += new
        window = self.text[start:]
        return any(s in window for s in self.stops)


@dataclass(eq=False)
class SequenceState:
    """One request in flight. ``handle`` is whatever the engine needs to answer it."""

    handle: Any
    prompt_len: int
    max_new_tokens: int
    end_ids: frozenset[int] = frozenset()
    watcher: StopWatcher | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = "length"
    row: int = -1

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError("a sequence needs at least one prompt token")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")

    @property
    def cost(self) -> int:
        """Cache positions it can occupy: prompt plus its output budget."""
        return self.prompt_len + self.max_new_tokens

    @property
    def length(self) -> int:
        """Tokens in the cache once the last generated id has been fed back."""
        return self.prompt_len + len(self.generated)

    def push(self, token: int) -> bool:
        """Record the next id; True when this id finished the sequence.

        An end-of-turn id finishes it with ``stop`` and is not kept; a stop string in the
        text finishes it with ``stop``; the output budget with ``length``."""
        if self.finished:
            return False
        if token in self.end_ids:
            self.finished, self.finish_reason = True, "stop"
            return True
        self.generated.append(token)
        if self.watcher is not None and self.watcher.push(token):
            self.finished, self.finish_reason = True, "stop"
        elif len(self.generated) >= self.max_new_tokens:
            self.finished, self.finish_reason = True, "length"
        return self.finished


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """Bounds of the running set and of one admission round."""

    max_slots: int = 16
    max_tokens: int = 8_192
    max_prefill_tokens: int = 512
    admit_batch: int = 4
    admit_wait_steps: int = 4

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_tokens", "max_prefill_tokens", "admit_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.admit_wait_steps < 0:
            raise ValueError("admit_wait_steps must be >= 0")


@dataclass(frozen=True, slots=True)
class RowMove:
    """The sequence in row ``src`` now lives in row ``dst`` (copy its cache slot)."""

    src: int
    dst: int
    length: int


class InflightScheduler:
    """Waiting queue + running set; see the module docstring for the policy."""

    def __init__(self, limits: SchedulerLimits | None = None) -> None:
        self.limits = limits or SchedulerLimits()
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self._waited_steps = 0

    # -- state ---------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def running_tokens(self) -> int:
        return sum(s.cost for s in self.running)

    def fits(self, seq: SequenceState) -> bool:
        """Whether this sequence could ever run (alone) within the token budget."""
        return seq.cost <= self.limits.max_tokens

    # -- transitions ---------------------------------------------------------------------
    def add(self, seq: SequenceState) -> None:
        if not self.fits(seq):
            raise ValueError(
                f"prompt + max_new_tokens = {seq.cost} exceeds the engine's token budget "
                f"{self.limits.max_tokens}"
            )
        if not self.waiting:
            self._waited_steps = 0
        self.waiting.append(seq)

    def admission_due(self) -> bool:
        """Whether this step boundary admits (see the module docstring)."""
        if not self.waiting:
            return False
        free = self.limits.max_slots - len(self.running)
        if free <= 0:
            return False
        if not self.running:
            return True
        if len(self.waiting) >= min(free, self.limits.admit_batch):
            return True
        return self._waited_steps >= self.limits.admit_wait_steps

    def admit(self) -> list[SequenceState]:
        """Sequences to prefill now, each given its row; empty when no admission is due."""
        if not self.admission_due():
            return []
        admitted: list[SequenceState] = []
        tokens = self.running_tokens
        prefill = 0
        limits = self.limits
        while self.waiting and len(self.running) < limits.max_slots:
            head = self.waiting[0]
            if tokens + head.cost > limits.max_tokens:
                break
            if admitted and prefill + head.prompt_len > limits.max_prefill_tokens:
                break
            self.waiting.popleft()
            head.row = len(self.running)
            self.running.append(head)
            admitted.append(head)
            tokens += head.cost
            prefill += head.prompt_len
        self._waited_steps = 0
        return admitted

    def step_done(self) -> None:
        """One decode step has run: the oldest waiting request waited one step more."""
        if self.waiting:
            self._waited_steps += 1

    def retire(self, seq: SequenceState) -> RowMove | None:
        """Free ``seq``'s row at once; the last row moves into the hole (returned)."""
        row = seq.row
        if row < 0 or row >= len(self.running) or self.running[row] is not seq:
            raise ValueError("that sequence is not running")
        last = self.running.pop()
        seq.row = -1
        if last is seq:
            return None
        self.running[row] = last
        last.row = row
        return RowMove(src=len(self.running), dst=row, length=last.length)

    def drop_waiting(self, seq: SequenceState) -> bool:
        """Forget a waiting sequence (its request was cancelled); False if not waiting."""
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        return True

    def clear(self) -> list[SequenceState]:
        """Everything waiting or running, removed (the engine fails or stops them)."""
        dropped = [*self.running, *self.waiting]
        for seq in self.running:
            seq.row = -1
        self.running.clear()
        self.waiting.clear()
        return dropped
