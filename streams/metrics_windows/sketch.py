"""A mergeable quantile sketch with a relative-accuracy guarantee (DDSketch-style).

Values are counted in logarithmic buckets: bucket ``k`` holds the values in
``(gamma**(k-1), gamma**k]`` with ``gamma = (1 + a) / (1 - a)``, and a quantile is answered
with the bucket's midpoint ``2 * gamma**k / (gamma + 1)``, which is within a relative error
``a`` of every value in the bucket. So for any quantile ``q`` the answer ``x`` satisfies
``|x - v| <= a * v`` where ``v`` is the exact lower quantile of the values added (the value at
rank ``floor(q * (n - 1))`` of the sorted values). Values at or below ``min_value`` (and
negative ones, which latencies are not) go to a zero bucket and are answered as 0.

Two sketches with the same accuracy merge by adding bucket counts: merging the sketches of
two halves of a stream gives exactly the sketch of the whole stream. The serialised form
(:meth:`QuantileSketch.to_dict`) is small (sparse bucket keys and counts) and is what the
``MetricsWindow`` Avro record carries, so consumers can merge windows themselves.

Memory: one bucket per occupied power of ``gamma``; with the default 1 % accuracy, values
from 0.001 to 10,000,000 (ms) need at most about 1,150 buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_RELATIVE_ACCURACY = 0.01
DEFAULT_MIN_VALUE = 1e-3


class QuantileSketch:
    """Counts of values in log buckets; mergeable, serialisable, pure."""

    __slots__ = (
        "_gamma",
        "_log_gamma",
        "buckets",
        "count",
        "max",
        "min",
        "min_value",
        "relative_accuracy",
        "total",
        "zero_count",
    )

    def __init__(
        self,
        relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
        *,
        min_value: float = DEFAULT_MIN_VALUE,
    ) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy}")
        if min_value <= 0:
            raise ValueError(f"min_value must be positive, got {min_value}")
        self.relative_accuracy = relative_accuracy
        self.min_value = min_value
        self._gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._log_gamma = math.log(self._gamma)
        self.buckets: dict[int, int] = {}
        self.zero_count = 0
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    # -- adding ----------------------------------------------------------------------------
    def add(self, value: float, weight: int = 1) -> None:
        """Count ``value`` (``weight`` times). NaN is refused."""
        if value != value:  # NaN
            raise ValueError("cannot add NaN to a quantile sketch")
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if value <= self.min_value:
            self.zero_count += weight
        else:
            key = math.ceil(math.log(value) / self._log_gamma)
            self.buckets[key] = self.buckets.get(key, 0) + weight
        self.count += weight
        self.total += value * weight
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self.add(value)

    def merge(self, other: QuantileSketch) -> None:
        """Add ``other``'s counts to this sketch (same accuracy and minimum required)."""
        if (other.relative_accuracy, other.min_value) != (self.relative_accuracy, self.min_value):
            raise ValueError(
                "cannot merge sketches of different accuracy: "
                f"{self.relative_accuracy}/{self.min_value} and "
                f"{other.relative_accuracy}/{other.min_value}"
            )
        for key, n in other.buckets.items():
            self.buckets[key] = self.buckets.get(key, 0) + n
        self.zero_count += other.zero_count
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    # -- asking ----------------------------------------------------------------------------
    def quantile(self, q: float) -> float | None:
        """The estimated ``q``-quantile (0 <= q <= 1), or None for an empty sketch."""
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if self.count == 0:
            return None
        rank = math.floor(q * (self.count - 1))
        if rank == 0:
            return self.min  # the extremes are kept exactly
        if rank == self.count - 1:
            return self.max
        seen = self.zero_count
        if rank < seen:  # the zero bucket: values at or below min_value
            return min(max(self.min, 0.0), self.max)
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if rank < seen:
                estimate = 2 * self._gamma**key / (self._gamma + 1)
                return min(max(estimate, self.min), self.max)
        return self.max  # not reached: the counts add up to ``count``

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    # -- serialising ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON- and Avro-friendly form (``Sketch`` in MetricsWindow.avsc)."""
        keys = sorted(self.buckets)
        return {
            "relative_accuracy": self.relative_accuracy,
            "min_value": self.min_value,
            "keys": keys,
            "counts": [self.buckets[k] for k in keys],
            "zero_count": self.zero_count,
            "count": self.count,
            "sum": float(self.total),
            "min": float(self.min) if self.count else 0.0,
            "max": float(self.max) if self.count else 0.0,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantileSketch:
        sketch = cls(data["relative_accuracy"], min_value=data["min_value"])
        keys, counts = list(data["keys"]), list(data["counts"])
        if len(keys) != len(counts):
            raise ValueError(f"sketch has {len(keys)} keys but {len(counts)} counts")
        sketch.buckets = {int(k): int(n) for k, n in zip(keys, counts, strict=True)}
        sketch.zero_count = int(data["zero_count"])
        sketch.count = int(data["count"])
        if sketch.count != sketch.zero_count + sum(sketch.buckets.values()):
            raise ValueError("sketch count does not match its buckets")
        sketch.total = float(data["sum"])
        if sketch.count:
            sketch.min, sketch.max = float(data["min"]), float(data["max"])
        return sketch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"QuantileSketch(count={self.count}, buckets={len(self.buckets)}, "
            f"p50={self.quantile(0.5)}, p99={self.quantile(0.99)})"
        )
