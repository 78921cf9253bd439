"""All versions' monitors behind one object: what the metrics job feeds and reads.

* :meth:`MonitorSet.add_request` remembers the prompt of a request (a bounded lookup by
  request_id, prompts cut to ``PROMPT_CHARS``: results do not carry their prompt);
* :meth:`MonitorSet.add_result` counts a result's response length for its model/version
  and queues its prompt, if remembered, for embedding: at most ``per_window`` prompts per
  version and window (``slot``, the result's event-time window), and never a prompt the
  version already has in its reference or current sample or in the queue (**de-duplicated**
  by :func:`~streams.monitors.drift.prompt_key`: a replayed prompt set is not a new sample,
  so it reads neither as "no drift" — identical points cancel in MMD — nor as drift — one
  prompt repeated is a tight cluster);
* :meth:`MonitorSet.take_pending` hands out what is queued (at most ``embed_batch``; the rest
  is dropped and counted: a sample is enough for a drift test) and
  :meth:`MonitorSet.add_embeddings` takes the vectors back: the caller embeds in between, off
  its event loop; :meth:`MonitorSet.embed_pending` does both in one call;
* :meth:`MonitorSet.refresh` re-runs the tests of the versions that changed and keeps the
  readings (:attr:`MonitorSet.latest`); :meth:`MonitorSet.reading` runs them for one version.

The embedder and the random generator are injected; the state is plain JSON, whole
(:meth:`to_state`) or per version (:meth:`version_state`). The prompt lookup and the queue
are not in the state: after a restart, results of requests read before it have no prompt
(counted ``prompt_unknown``).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from streams.monitors.drift import DriftConfig, DriftMonitor, DriftReading, Reference, prompt_key
from streams.monitors.embeddings import Embedder

logger = logging.getLogger(__name__)

VersionKey = tuple[str, str]
Pending = tuple[VersionKey, str, str]  # version, prompt key, prompt

#: Prompts are cut to this many characters (the embedder reads at most 256 word pieces).
PROMPT_CHARS = 2000
_BUDGET_SLOTS = 4096  # (version, window) budget counters kept


class _Seen:
    """Prompt keys of one version's reference and current samples (the current ones leave
    with their vectors)."""

    def __init__(self, current_size: int) -> None:
        self.reference: set[str] = set()
        self.current: deque[str] = deque(maxlen=current_size)

    def __contains__(self, key: str) -> bool:
        return key in self.reference or key in self.current


class MonitorSet:
    """Drift monitors keyed by (model, model_version); see the module docstring."""

    def __init__(
        self,
        config: DriftConfig,
        embedder: Embedder,
        *,
        reference: Reference | None = None,
        prompt_lookup: int = 10_000,
        embed_batch: int = 64,
        per_window: int | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.embedder = embedder
        self._reference = reference
        self._prompt_lookup = prompt_lookup
        self._embed_batch = embed_batch
        self._per_window = per_window
        self._rng = np.random.default_rng(seed)
        self._prompts: dict[str, str] = {}
        self._pending: list[Pending] = []
        self._queued: set[tuple[VersionKey, str]] = set()  # pending or being embedded
        self._budget: dict[tuple[VersionKey, int], int] = {}
        self._monitors: dict[VersionKey, DriftMonitor] = {}
        self._seen: dict[VersionKey, _Seen] = {}
        self._changed: set[VersionKey] = set()
        self.latest: dict[VersionKey, DriftReading] = {}
        self.counts: Counter[str] = Counter()

    def monitor(self, model: str, version: str) -> DriftMonitor:
        key = (model, version)
        found = self._monitors.get(key)
        if found is None:
            found = self._monitors[key] = DriftMonitor(self.config, self._reference)
            seen = self._seen[key] = _Seen(self.config.current_size)
            if self._reference is not None:
                seen.reference.update(self._reference.prompt_keys)
        return found

    @property
    def versions(self) -> list[VersionKey]:
        return sorted(self._monitors)

    # -- inputs ------------------------------------------------------------------------------
    def add_request(self, record: Mapping[str, Any]) -> None:
        request_id = str(record.get("request_id") or "")
        prompt = record.get("prompt")
        if not request_id or not prompt:
            return
        self._prompts.pop(request_id, None)
        self._prompts[request_id] = str(prompt)[:PROMPT_CHARS]
        while len(self._prompts) > self._prompt_lookup:
            del self._prompts[next(iter(self._prompts))]

    def add_result(self, record: Mapping[str, Any], slot: int | None = None) -> None:
        """Count an OK result; ``slot`` (its window) is what ``per_window`` budgets."""
        if record.get("status") != "OK":
            return
        key = (str(record.get("model") or ""), str(record.get("model_version") or ""))
        self.monitor(*key).add_response_length(int(record.get("completion_tokens") or 0))
        self._changed.add(key)
        prompt = self._prompts.pop(str(record.get("request_id") or ""), None)
        if prompt is None:
            self.counts["prompt_unknown"] += 1
            return
        pkey = prompt_key(prompt)
        if pkey in self._seen[key] or (key, pkey) in self._queued:
            self.counts["prompt_duplicate"] += 1
            return
        if self._per_window is not None and slot is not None:
            used = self._budget.get((key, slot), 0)
            if used >= self._per_window:
                self.counts["prompt_over_budget"] += 1
                return
            self._budget[(key, slot)] = used + 1
            while len(self._budget) > _BUDGET_SLOTS:
                del self._budget[next(iter(self._budget))]
        self._queued.add((key, pkey))
        self._pending.append((key, pkey, prompt))

    # -- embedding ---------------------------------------------------------------------------
    def take_pending(self) -> list[Pending]:
        """The queued prompts to embed now (at most ``embed_batch``; the rest are dropped)."""
        batch, dropped = self._pending[: self._embed_batch], self._pending[self._embed_batch :]
        self._pending = []
        for key, pkey, _ in dropped:
            self._queued.discard((key, pkey))
        if dropped:
            self.counts["prompt_not_sampled"] += len(dropped)
        return batch

    def add_embeddings(
        self, batch: Sequence[Pending], vectors: np.ndarray | Sequence[Sequence[float]] | None
    ) -> None:
        """The vectors of a :meth:`take_pending` batch, in order; None: embedding failed
        (the prompts are dropped and counted)."""
        if vectors is None:
            for key, pkey, _ in batch:
                self._queued.discard((key, pkey))
            self.counts["prompt_embed_failed"] += len(batch)
            return
        for (key, pkey, _), vector in zip(batch, vectors, strict=True):
            self._queued.discard((key, pkey))
            seen = self._seen[key]
            if pkey in seen:  # the same prompt reached the monitor meanwhile
                self.counts["prompt_duplicate"] += 1
                continue
            if self._monitors[key].add_prompt(vector):
                seen.reference.add(pkey)
            else:
                seen.current.append(pkey)
            self._changed.add(key)
        self.counts["prompts_embedded"] += len(batch)

    def embed_pending(self) -> int:
        """Embed the queued prompts (at most ``embed_batch``) here; returns how many."""
        batch = self.take_pending()
        if not batch:
            return 0
        self.add_embeddings(batch, self.embedder.embed([prompt for _, _, prompt in batch]))
        return len(batch)

    # -- outputs -----------------------------------------------------------------------------
    def reading(self, model: str, version: str) -> DriftReading:
        return self.monitor(model, version).reading(self._rng)

    def take_changed(
        self, due: Callable[[VersionKey], bool] | None = None
    ) -> dict[VersionKey, DriftMonitor]:
        """Frozen copies of the versions that got observations since they were last taken
        (only those ``due`` accepts; the others stay changed)."""
        keys = sorted(k for k in self._changed if due is None or due(k))
        self._changed.difference_update(keys)
        return {key: self._monitors[key].snapshot() for key in keys}

    def read(self, snapshots: Mapping[VersionKey, DriftMonitor]) -> dict[VersionKey, DriftReading]:
        """Run the tests on :meth:`take_changed` copies (may run in another thread than
        the feeding one, one call at a time) and keep the readings in :attr:`latest`."""
        fresh = {key: snapshot.reading(self._rng) for key, snapshot in snapshots.items()}
        self.latest.update(fresh)
        return fresh

    def refresh(self) -> dict[VersionKey, DriftReading]:
        """Re-run the tests of every version that got observations since the last call;
        returns (and keeps in :attr:`latest`) the new readings."""
        return self.read(self.take_changed())

    # -- state -------------------------------------------------------------------------------
    def version_state(self, model: str, version: str) -> dict[str, Any]:
        key = (model, version)
        seen = self._seen[key]
        return {
            "monitor": self._monitors[key].to_state(),
            "seen_reference": sorted(seen.reference),
            "seen_current": list(seen.current),
        }

    def restore_version(self, model: str, version: str, state: Mapping[str, Any]) -> None:
        key = (model, version)
        self._monitors[key] = DriftMonitor.from_state(state["monitor"], self.config)
        seen = self._seen[key] = _Seen(self.config.current_size)
        seen.reference.update(str(k) for k in state.get("seen_reference", []))
        seen.current.extend(str(k) for k in state.get("seen_current", []))
        self._changed.add(key)

    def to_state(self) -> dict[str, Any]:
        return {
            "monitors": [[m, v, self.version_state(m, v)] for m, v in self.versions],
            "prompts": list(self._prompts.items()),
            "pending": [[m, v, p] for (m, v), _, p in self._pending],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        for m, v, s in state["monitors"]:
            self.restore_version(str(m), str(v), s)
        self._prompts = {str(k): str(p) for k, p in state["prompts"]}
        self._pending = [
            ((str(m), str(v)), prompt_key(str(p)), str(p)) for m, v, p in state["pending"]
        ]
        self._queued = {(key, pkey) for key, pkey, _ in self._pending}
