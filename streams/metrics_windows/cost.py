"""Cost per tenant as Prometheus counters with a bounded number of tenant labels.

Per result: prompt and completion tokens, engine-seconds (its share of its batch's engine
call, :func:`~streams.metrics_windows.window.engine_seconds`) and one request, labelled
``tenant``, ``model``, ``version``. The exact totals of every tenant (up to
``SLUICE_METRICS_MAX_TENANTS``) are in the ``MetricsWindow`` records on ``llm.metrics``;
the counters are for dashboards and alerts, so their tenants are bounded
(:class:`TenantLabels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from streams.metrics_windows.window import engine_seconds

UNKNOWN = "unknown"
OTHER = "other"


class TenantLabels:
    """The ``tenant`` label of a tenant: its own name for the first ``top_k`` tenants that
    reach the job (sticky: a counter cannot move to another series), ``other`` for every
    further one, ``unknown`` for a result without a tenant. Pure."""

    def __init__(self, top_k: int) -> None:
        if top_k < 0:
            raise ValueError("top_k must not be negative")
        self.top_k = top_k
        self._named: set[str] = set()

    def label(self, tenant: str | None) -> str:
        if not tenant:
            return UNKNOWN
        if tenant in self._named:
            return tenant
        if len(self._named) < self.top_k and tenant not in (UNKNOWN, OTHER):
            self._named.add(tenant)
            return tenant
        return OTHER

    @property
    def named(self) -> frozenset[str]:
        return frozenset(self._named)


class CostCounters:
    """``sluice_tenant_*_total`` counters on an injected registry."""

    def __init__(self, registry: CollectorRegistry, top_k: int) -> None:
        labels = ("tenant", "model", "version")
        self.labels = TenantLabels(top_k)
        self.requests = Counter(
            "sluice_tenant_requests_total",
            "Results per tenant, model and version (top tenants by name, then other/unknown).",
            labels,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "sluice_tenant_prompt_tokens_total",
            "Prompt tokens per tenant, model and version.",
            labels,
            registry=registry,
        )
        self.completion_tokens = Counter(
            "sluice_tenant_completion_tokens_total",
            "Completion tokens per tenant, model and version.",
            labels,
            registry=registry,
        )
        self.engine_seconds = Counter(
            "sluice_tenant_engine_seconds_total",
            "Engine-seconds per tenant, model and version: each result's share of its batch.",
            labels,
            registry=registry,
        )

    def add_result(self, record: Mapping[str, Any], tenant: str | None) -> None:
        values = (
            self.labels.label(tenant),
            str(record.get("model") or ""),
            str(record.get("model_version") or ""),
        )
        self.requests.labels(*values).inc()
        self.prompt_tokens.labels(*values).inc(max(int(record.get("prompt_tokens") or 0), 0))
        self.completion_tokens.labels(*values).inc(
            max(int(record.get("completion_tokens") or 0), 0)
        )
        self.engine_seconds.labels(*values).inc(engine_seconds(record))
