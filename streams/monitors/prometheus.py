"""The monitors as Prometheus gauges, on an injected ``CollectorRegistry``.

Ratios end in ``_ratio`` and are over OK answers; the drift p-values are the tests' own
(a small one is drift). Labels: ``model`` and ``version`` (one series per served version).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from streams.monitors.drift import DriftReading
from streams.monitors.quality import QualityCounts

_LABELS = ("model", "version")


class MonitorCollector:
    """Gauges for the drift and quality monitors; :meth:`publish` sets one version's."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _LABELS, registry=registry)

        self.prompt_drift = gauge(
            "sluice_monitor_prompt_drift_mmd2",
            "Prompt embedding drift: unbiased MMD² vs the reference.",
        )
        self.prompt_p = gauge(
            "sluice_monitor_prompt_drift_p_value", "Permutation p-value of the prompt drift test."
        )
        self.length_drift = gauge(
            "sluice_monitor_response_length_ks",
            "Response length drift: KS statistic vs the reference.",
        )
        self.length_p = gauge(
            "sluice_monitor_response_length_p_value", "p-value of the response length KS test."
        )
        self.refusal = gauge("sluice_monitor_refusal_ratio", "Share of answers that refuse.")
        self.empty = gauge("sluice_monitor_empty_answer_ratio", "Share of answers that are blank.")
        self.truncated = gauge(
            "sluice_monitor_truncated_answer_ratio",
            "Share of answers cut mid-sentence by the limit.",
        )
        self.length_finish = gauge(
            "sluice_monitor_length_finish_ratio", "Share of answers ended by max_new_tokens."
        )
        self.feedback = gauge("sluice_monitor_feedback_score", "Mean feedback score (-1..+1).")
        self.answers = gauge("sluice_monitor_answers", "Answers the quality ratios are over.")

    def publish(
        self,
        model: str,
        version: str,
        *,
        drift: DriftReading | None = None,
        quality: QualityCounts | None = None,
    ) -> None:
        """Set the gauges of one version; a value that is None (too few samples) is left."""
        values: list[tuple[Gauge, float | None]] = []
        if drift is not None:
            values += [
                (self.prompt_drift, drift.prompt_mmd2),
                (self.prompt_p, drift.prompt_p_value),
                (self.length_drift, drift.length_ks),
                (self.length_p, drift.length_p_value),
            ]
        if quality is not None:
            values += [
                (self.refusal, quality.refusal_rate),
                (self.empty, quality.empty_rate),
                (self.truncated, quality.truncated_rate),
                (self.length_finish, quality.length_finish_rate),
                (self.feedback, quality.feedback_mean_score),
                (self.answers, float(quality.answers)),
            ]
        for gauge, value in values:
            if value is not None:
                gauge.labels(model=model, version=version).set(value)
