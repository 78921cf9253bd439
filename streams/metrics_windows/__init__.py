"""Windowed metrics on ``llm.metrics``: a mergeable quantile sketch, a pure window aggregator
and the Faust job that runs it (see ``docs/metrics.md``)."""

from streams.metrics_windows.aggregator import Source, WindowAggregator, WindowConfig
from streams.metrics_windows.sketch import QuantileSketch

__all__ = ["QuantileSketch", "Source", "WindowAggregator", "WindowConfig"]
