"""All versions' monitors behind one object: what the metrics job feeds and reads.

* :meth:`MonitorSet.add_request` remembers the prompt of a request (a bounded lookup by
  request_id: results do not carry their prompt);
* :meth:`MonitorSet.add_result` counts a result's response length for its model/version
  and queues its prompt, if remembered, for embedding;
* :meth:`MonitorSet.embed_pending` embeds what is queued in one batch (the expensive part:
  call it from a timer, off the record path) and adds the vectors to each version's
  :class:`~streams.monitors.drift.DriftMonitor`; at most ``embed_batch`` prompts per call,
  the rest are dropped and counted (a sample is enough for a drift test);
* :meth:`MonitorSet.reading` gives the version's :class:`~streams.monitors.drift.DriftReading`.

The embedder and the random generator are injected; the state is plain JSON.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from streams.monitors.drift import DriftConfig, DriftMonitor, DriftReading, Reference
from streams.monitors.embeddings import Embedder

logger = logging.getLogger(__name__)

VersionKey = tuple[str, str]


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
        seed: int = 0,
    ) -> None:
        self.config = config
        self._embedder = embedder
        self._reference = reference
        self._prompt_lookup = prompt_lookup
        self._embed_batch = embed_batch
        self._rng = np.random.default_rng(seed)
        self._prompts: dict[str, str] = {}
        self._pending: list[tuple[VersionKey, str]] = []
        self._monitors: dict[VersionKey, DriftMonitor] = {}
        self.counts: Counter[str] = Counter()

    def monitor(self, model: str, version: str) -> DriftMonitor:
        key = (model, version)
        found = self._monitors.get(key)
        if found is None:
            found = self._monitors[key] = DriftMonitor(self.config, self._reference)
        return found

    @property
    def versions(self) -> list[VersionKey]:
        return sorted(self._monitors)

    def add_request(self, record: Mapping[str, Any]) -> None:
        request_id = str(record.get("request_id") or "")
        prompt = record.get("prompt")
        if not request_id or not prompt:
            return
        self._prompts.pop(request_id, None)
        self._prompts[request_id] = str(prompt)
        while len(self._prompts) > self._prompt_lookup:
            del self._prompts[next(iter(self._prompts))]

    def add_result(self, record: Mapping[str, Any]) -> None:
        if record.get("status") != "OK":
            return
        key = (str(record.get("model") or ""), str(record.get("model_version") or ""))
        self.monitor(*key).add_response_length(int(record.get("completion_tokens") or 0))
        prompt = self._prompts.pop(str(record.get("request_id") or ""), None)
        if prompt is None:
            self.counts["prompt_unknown"] += 1
        else:
            self._pending.append((key, prompt))

    def embed_pending(self) -> int:
        """Embed the queued prompts (at most ``embed_batch``); returns how many."""
        if not self._pending:
            return 0
        batch, dropped = self._pending[: self._embed_batch], self._pending[self._embed_batch :]
        self._pending = []
        if dropped:
            self.counts["prompt_not_sampled"] += len(dropped)
        vectors = self._embedder.embed([prompt for _, prompt in batch])
        for (key, _), vector in zip(batch, vectors, strict=True):
            self.monitor(*key).add_prompt(vector)
        self.counts["prompts_embedded"] += len(batch)
        return len(batch)

    def reading(self, model: str, version: str) -> DriftReading:
        return self.monitor(model, version).reading(self._rng)

    def to_state(self) -> dict[str, Any]:
        return {
            "monitors": [[m, v, mon.to_state()] for (m, v), mon in sorted(self._monitors.items())],
            "prompts": list(self._prompts.items()),
            "pending": [[m, v, p] for (m, v), p in self._pending],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self._monitors = {
            (str(m), str(v)): DriftMonitor.from_state(s, self.config)
            for m, v, s in state["monitors"]
        }
        self._prompts = {str(k): str(p) for k, p in state["prompts"]}
        self._pending = [((str(m), str(v)), str(p)) for m, v, p in state["pending"]]
