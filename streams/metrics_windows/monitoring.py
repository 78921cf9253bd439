"""The drift and quality monitors inside the metrics job (docs/monitors.md).

:class:`LiveMonitors` holds one :class:`~streams.monitors.monitor_set.MonitorSet` (a drift
monitor per model version) and does what needs more than the record path:

* **feed** (:meth:`add_request`, :meth:`add_result`, synchronous, cheap): prompts are
  remembered by request_id; an OK result adds its response length and queues its prompt,
  within the budget of ``SLUICE_MONITOR_EMBED_PER_WINDOW`` prompts per version and window,
  de-duplicated;
* **step** (:meth:`step`, from a timer): embeds the queue in one batch and runs the tests of
  the versions that changed (each at most every ``SLUICE_MONITOR_TEST_INTERVAL_S``), both in
  a one-thread executor, off the event loop; sets the drift gauges;
* **annotate** (:meth:`annotate`): a closing window of a version gets the version's latest
  reading (statistic, p-value, flagged, sample sizes);
* **on_closed** (:meth:`on_closed`): the quality gauges of a version are those of its last
  closed window of the longest length (all tenants summed);
* **persistence** (:meth:`due_states`): each version's samples (the reference above all)
  are saved, per version, under keys of their own on the job's state topic, every
  ``SLUICE_MONITOR_PERSIST_INTERVAL_S`` and as soon as a reference is complete; the job
  writes and :meth:`start` restores them.

The embedder is injected (the real one is loaded on first use, in the executor).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from streams.metrics_windows.window import WindowKey
from streams.monitors.drift import DriftConfig, DriftReading, Reference
from streams.monitors.embeddings import Embedder, EmbedderUnavailable
from streams.monitors.monitor_set import MonitorSet, VersionKey
from streams.monitors.prometheus import MonitorCollector
from streams.monitors.quality import QualityCounts
from streams.settings import Settings

logger = logging.getLogger(__name__)

MONITOR_KEY_PREFIX = b"monitor:"


def drift_config(settings: Settings) -> DriftConfig:
    return DriftConfig(
        reference_size=settings.monitor_reference_size,
        current_size=settings.monitor_current_size,
        min_current=min(settings.monitor_min_current, settings.monitor_current_size),
        permutations=settings.monitor_permutations,
        alpha=settings.monitor_alpha,
    )


def monitor_key(app_id: str, model: str, version: str) -> bytes:
    """The state-topic key of one version's monitor state."""
    return MONITOR_KEY_PREFIX + json.dumps([app_id, model, version]).encode("utf-8")


def parse_monitor_key(key: bytes) -> tuple[str, str, str] | None:
    if not key.startswith(MONITOR_KEY_PREFIX):
        return None
    app_id, model, version = json.loads(key[len(MONITOR_KEY_PREFIX) :])
    return str(app_id), str(model), str(version)


def drift_fields(reading: DriftReading | None, alpha: float) -> dict[str, Any]:
    """The ``MetricsWindow`` drift fields of a reading (all null without one)."""
    if reading is None:
        return {}
    return {
        "prompt_drift": reading.prompt_mmd2,
        "prompt_drift_p_value": reading.prompt_p_value,
        "prompt_drift_flagged": (
            reading.prompt_drifted(alpha) if reading.prompt_p_value is not None else None
        ),
        "prompt_drift_reference": reading.reference_prompts,
        "prompt_drift_current": reading.current_prompts,
        "response_length_drift": reading.length_ks,
        "response_length_drift_p_value": reading.length_p_value,
        "response_length_drift_flagged": (
            reading.length_drifted(alpha) if reading.length_p_value is not None else None
        ),
    }


def quality_of(record: Mapping[str, Any]) -> QualityCounts:
    """The quality counts of a ``MetricsWindow`` record (zeros where null)."""
    return QualityCounts(
        answers=int(record.get("answers") or 0),
        empty=int(record.get("empty_answers") or 0),
        truncated=int(record.get("truncated_answers") or 0),
        length_finish=int(record.get("length_finishes") or 0),
        refusals=int(record.get("refusals") or 0),
        feedback_count=int(record.get("feedback_count") or 0),
        feedback_score_sum=int(record.get("feedback_score_sum") or 0),
    )


def latest_quality(
    records: Iterable[Mapping[str, Any]], length_s: int
) -> dict[VersionKey, QualityCounts]:
    """Per version, the summed counts (over tenants) of its latest window of ``length_s``
    among ``records`` (corrections and unattributed windows left out)."""
    latest: dict[VersionKey, int] = {}
    sums: dict[tuple[VersionKey, int], QualityCounts] = {}
    for record in records:
        if record.get("correction") or record.get("length_s") != length_s:
            continue
        if not record.get("model"):
            continue
        key = (str(record["model"]), str(record.get("model_version") or ""))
        start = int(record["window_start"])
        sums.setdefault((key, start), QualityCounts()).merge(quality_of(record))
        latest[key] = max(latest.get(key, start), start)
    return {key: sums[(key, start)] for key, start in latest.items()}


class LiveMonitors:
    """See the module docstring. ``clock`` returns wall time in epoch milliseconds."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        registry: CollectorRegistry | None,
        clock: Callable[[], int],
        *,
        executor: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.config = drift_config(settings)
        self.embedder = embedder
        self._clock = clock
        self._executor = executor
        self._window_ms = settings.metrics_window_s * 1000
        self._longest = max(settings.metrics_window_s, settings.metrics_rollup_s)
        self.collector = MonitorCollector(registry) if registry is not None else None
        self._prompts_total = (
            PromCounter(
                "sluice_monitor_prompts_total",
                "Prompts for the drift test by outcome (embedded, duplicate, over_budget, "
                "not_sampled, unknown, embed_failed).",
                ["outcome"],
                registry=registry,
            )
            if registry is not None
            else None
        )
        self._reported: Counter[str] = Counter()
        self.prompt_drift = settings.monitor_prompt_drift
        self.monitors: MonitorSet | None = None
        self._unsaved: set[VersionKey] = set()
        self._complete: set[VersionKey] = set()  # versions whose reference is full
        self._save_now = False
        self._last_save = clock()
        self._tested: dict[VersionKey, int] = {}  # when each version was last tested

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, states: Mapping[VersionKey, Mapping[str, Any]]) -> None:
        """Build the monitor set (embedding a pinned reference file, off the loop) and
        restore the versions' saved states."""
        reference = None
        path = self.settings.monitor_reference_file
        if path is not None:
            reference = await self._run(Reference.from_file, path, self._embed_or_fail)
            logger.info(
                "monitors: pinned reference %s: %d prompts, %d lengths",
                path,
                len(reference.prompts),
                len(reference.lengths),
            )
        monitors = MonitorSet(
            self.config,
            self.embedder,
            reference=reference,
            prompt_lookup=self.settings.monitor_prompt_lookup,
            embed_batch=self.settings.monitor_embed_batch,
            per_window=self.settings.monitor_embed_per_window,
        )
        for (model, version), state in sorted(states.items()):
            monitors.restore_version(model, version, state)
            if monitors.monitor(model, version).reference_full:
                self._complete.add((model, version))
        self.monitors = monitors
        if states:
            logger.info("monitors: restored %d versions", len(states))

    def _embed_or_fail(self, texts: list[str]) -> Any:
        return self.embedder.embed(texts)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitors")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- feed (record path) --------------------------------------------------------------------
    def add_request(self, record: Mapping[str, Any]) -> None:
        if self.monitors is not None and self.prompt_drift:
            self.monitors.add_request(record)

    def add_result(self, record: Mapping[str, Any], event_ms: int) -> None:
        if self.monitors is not None and record.get("model"):
            self.monitors.add_result(record, slot=event_ms // self._window_ms)

    # -- timer ---------------------------------------------------------------------------------
    async def step(self) -> dict[VersionKey, DriftReading]:
        """Embed what is queued and re-run the changed versions' tests, off the loop."""
        monitors = self.monitors
        if monitors is None:
            return {}
        batch = monitors.take_pending()
        if batch:
            try:
                vectors = await self._run(self.embedder.embed, [p for _, _, p in batch])
            except EmbedderUnavailable as exc:
                logger.error("monitors: prompt drift off: %s", exc)
                self.prompt_drift = False
                vectors = None
            except Exception:
                logger.exception("monitors: embedding %d prompts failed", len(batch))
                vectors = None
            monitors.add_embeddings(batch, vectors)
        now = self._clock()
        interval_ms = self.settings.monitor_test_interval_s * 1000
        snapshots = monitors.take_changed(
            lambda key: now - self._tested.get(key, now - interval_ms) >= interval_ms
        )
        readings: dict[VersionKey, DriftReading] = {}
        if snapshots:
            readings = await self._run(monitors.read, snapshots)
        for key, reading in readings.items():
            self._tested[key] = now
            self._unsaved.add(key)
            if key not in self._complete and monitors.monitor(*key).reference_full:
                self._complete.add(key)
                self._save_now = True  # a complete reference is saved at once
                logger.info(
                    "monitors: %s %s reference complete (%d prompts, %d lengths)",
                    *key,
                    reading.reference_prompts,
                    reading.reference_lengths,
                )
            if self.collector is not None:
                self.collector.publish(*key, drift=reading)
        self._report_counts()
        return readings

    def _report_counts(self) -> None:
        if self.monitors is None or self._prompts_total is None:
            return
        names = {
            "prompts_embedded": "embedded",
            "prompt_duplicate": "duplicate",
            "prompt_over_budget": "over_budget",
            "prompt_not_sampled": "not_sampled",
            "prompt_unknown": "unknown",
            "prompt_embed_failed": "embed_failed",
        }
        for name, outcome in names.items():
            n = self.monitors.counts[name] - self._reported[name]
            if n > 0:
                self._prompts_total.labels(outcome=outcome).inc(n)
                self._reported[name] += n

    # -- windows -------------------------------------------------------------------------------
    def annotate(self, key: WindowKey) -> dict[str, Any]:
        if self.monitors is None:
            return {}
        reading = self.monitors.latest.get((key.model, key.model_version))
        return drift_fields(reading, self.config.alpha)

    def on_closed(self, records: Iterable[Mapping[str, Any]]) -> None:
        if self.collector is None:
            return
        for (model, version), quality in latest_quality(records, self._longest).items():
            self.collector.publish(model, version, quality=quality)

    # -- persistence ---------------------------------------------------------------------------
    def due_states(self, *, force: bool = False) -> list[tuple[bytes, dict[str, Any]]]:
        """(key, state) of the versions to save now; forgets them as saved."""
        now = self._clock()
        interval_ms = self.settings.monitor_persist_interval_s * 1000
        if self.monitors is None or not self._unsaved:
            return []
        if not (force or self._save_now or now - self._last_save >= interval_ms):
            return []
        app_id = self.settings.app_id
        due = [
            (monitor_key(app_id, m, v), self.monitors.version_state(m, v))
            for m, v in sorted(self._unsaved)
        ]
        self._unsaved.clear()
        self._save_now = False
        self._last_save = now
        return due

    def unsave(self, keys: Iterable[bytes]) -> None:
        """Saving failed: save these versions again next time."""
        for key in keys:
            parsed = parse_monitor_key(key)
            if parsed is not None:
                self._unsaved.add((parsed[1], parsed[2]))
