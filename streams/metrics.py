"""Prometheus metrics of a worker, on an injected registry (never the global one)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    """The worker's metrics (listed in the README), prefixed ``sluice_``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests_total = Counter(
            "sluice_requests_total",
            "Requests answered, by status.",
            ["model", "status"],
            registry=registry,
        )
        self.request_latency_seconds = Histogram(
            "sluice_request_latency_seconds",
            "Latency per stage.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_total = Counter(
            "sluice_tokens_total", "Tokens processed.", ["direction"], registry=registry
        )
        self.batch_size = Histogram(
            "sluice_batch_size",
            "Requests per engine batch.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.inflight_requests = Gauge(
            "sluice_inflight_requests", "Accepted requests not yet answered.", registry=registry
        )
        self.dlq_total = Counter(
            "sluice_dlq_total", "Records dead-lettered, by reason.", ["reason"], registry=registry
        )
        self.duplicates_total = Counter(
            "sluice_duplicates_total",
            "Requests skipped because already answered.",
            registry=registry,
        )
        self.redeliveries_total = Counter(
            "sluice_redeliveries_total",
            "Request offsets read again at or below the highest offset read (seek back).",
            registry=registry,
        )
        self.skipped_records_total = Counter(
            "sluice_skipped_records_total",
            "Request records the stream skipped, read from the broker and answered.",
            registry=registry,
        )
        self.feedback_score = Histogram(
            "sluice_feedback_score",
            "Feedback scores received.",
            buckets=(-1, 0, 1),
            registry=registry,
        )
        self.results_by_version_total = Counter(
            "sluice_results_by_version_total",
            "Results published, by model version and status.",
            ["version", "status"],
            registry=registry,
        )
        self.canary_percent = Gauge(
            "sluice_canary_percent",
            "Share of requests routed to the candidate version.",
            registry=registry,
        )
        self.feedback_total = Counter(
            "sluice_feedback_total",
            "Feedback events by outcome (joined, early, dlq:<reason>).",
            ["outcome"],
            registry=registry,
        )
        self.model_info = Gauge(
            "sluice_model_info",
            "Model served (value 1).",
            ["model", "version"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "sluice_consumer_lag",
            "Records behind the partition end.",
            ["partition"],
            registry=registry,
        )
        self.commits_total = Counter(
            "sluice_commits_total", "Offset commits made.", registry=registry
        )
        self.publish_retries_total = Counter(
            "sluice_publish_retries_total", "Result/DLQ sends retried.", registry=registry
        )
        self.engine_retries_total = Counter(
            "sluice_engine_retries_total",
            "Requests the engine could not take (overloaded, transient error), run again.",
            registry=registry,
        )
        self.model_load_failures_total = Counter(
            "sluice_model_load_failures_total",
            "Model versions a rollout asked for that failed to load (not served).",
            ["version"],
            registry=registry,
        )
        self.control_rejected_total = Counter(
            "sluice_control_rejected_total",
            "Control commands ignored for their signature (unsigned, unknown_key, bad_signature).",
            ["reason"],
            registry=registry,
        )
        self.engine_healthy = Gauge(
            "sluice_engine_healthy",
            "1 while the engine serves; 0 once it died (the worker then exits non-zero).",
            registry=registry,
        )
        self.engine_healthy.set(1)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the lookup is a measurable share of the
        per-request cost at thousands of requests per second."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.child(self.request_latency_seconds, stage).observe(max(seconds, 0.0))


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[object, int]:
    """Start the /metrics HTTP server. Returns the server and the port it bound."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound
