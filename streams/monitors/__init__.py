"""Drift and quality monitors per model version.

Pure statistics and state (:mod:`two_sample`, :mod:`drift`, :mod:`quality`,
:mod:`refusals`), the offline sentence embedder (:mod:`embeddings`), the per-version set the
metrics job feeds (:mod:`monitor_set`), Prometheus gauges (:mod:`prometheus`) and the drift
test's power measurement (:mod:`power`).
"""

from streams.monitors.drift import DriftConfig, DriftMonitor, DriftReading, Reference
from streams.monitors.monitor_set import MonitorSet
from streams.monitors.prometheus import MonitorCollector
from streams.monitors.quality import QualityCounts
from streams.monitors.refusals import is_refusal
from streams.monitors.two_sample import TwoSampleResult, ks_test, mmd_test

__all__ = [
    "DriftConfig",
    "DriftMonitor",
    "DriftReading",
    "MonitorCollector",
    "MonitorSet",
    "QualityCounts",
    "Reference",
    "TwoSampleResult",
    "is_refusal",
    "ks_test",
    "mmd_test",
]
