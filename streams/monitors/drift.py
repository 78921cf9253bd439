"""Drift of one model version: its current prompts and response lengths against a reference.

The reference is either **pinned** (a dataset given up front, :class:`Reference`) or the
**first** ``reference_size`` results the version answered; after it fills, the latest
``current_size`` observations form the current sample. :meth:`DriftMonitor.reading` runs
the two tests of :mod:`streams.monitors.two_sample`:

* prompt embeddings: unbiased MMD² (RBF kernel) with a permutation p-value;
* response lengths (completion tokens of OK answers): Kolmogorov-Smirnov D with its p-value.

Pure: vectors come in already embedded (the embedder is injected higher up), the random
generator is passed in, and the whole state round-trips through plain JSON (vectors as
base64 float16: 384 numbers take 768 bytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streams.monitors.two_sample import ks_test, mmd_test


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """Sample sizes and the test's settings."""

    reference_size: int = 200
    current_size: int = 200
    min_current: int = 30
    permutations: int = 200
    alpha: float = 0.01

    def __post_init__(self) -> None:
        if self.reference_size < 2 or self.current_size < 2:
            raise ValueError("reference_size and current_size must be at least 2")
        if not 2 <= self.min_current <= self.current_size:
            raise ValueError("min_current must be between 2 and current_size")
        if self.permutations < 1:
            raise ValueError("permutations must be at least 1")
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be in (0, 1)")


@dataclass(frozen=True, slots=True)
class DriftReading:
    """The tests' outcome; a side with too few observations reads None."""

    prompt_mmd2: float | None
    prompt_p_value: float | None
    length_ks: float | None
    length_p_value: float | None
    reference_prompts: int
    current_prompts: int
    reference_lengths: int
    current_lengths: int

    def window_fields(self) -> dict[str, float | None]:
        """The ``MetricsWindow`` drift fields this reading fills."""
        return {
            "prompt_drift": self.prompt_mmd2,
            "prompt_drift_p_value": self.prompt_p_value,
            "response_length_drift": self.length_ks,
        }

    def prompt_drifted(self, alpha: float) -> bool:
        return self.prompt_p_value is not None and self.prompt_p_value < alpha

    def length_drifted(self, alpha: float) -> bool:
        return self.length_p_value is not None and self.length_p_value < alpha


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode("ascii")


def decode_vector(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f2").astype(np.float32)


@dataclass(frozen=True)
class Reference:
    """A pinned reference: prompt embeddings and response lengths of a known-good sample."""

    prompts: np.ndarray
    lengths: tuple[float, ...]
    #: :func:`prompt_key` of each prompt: a live prompt equal to one of these is a repeat
    prompt_keys: tuple[str, ...] = ()

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], embed: Any) -> Reference:
        """From dataset records ``{"prompt": str, "completion_tokens": int}`` (either may be
        missing); ``embed(texts)`` returns one vector per text."""
        prompts: list[str] = []
        lengths: list[float] = []
        for record in records:
            if record.get("prompt"):
                prompts.append(str(record["prompt"]))
            if record.get("completion_tokens") is not None:
                lengths.append(float(record["completion_tokens"]))
        unique = list(dict.fromkeys(prompts))  # a repeated prompt is one observation
        vectors = embed(unique) if unique else np.zeros((0, 0), dtype=np.float32)
        keys = tuple(prompt_key(p) for p in unique)
        return cls(np.asarray(vectors, dtype=np.float32), tuple(lengths), keys)

    @classmethod
    def from_file(cls, path: Path, embed: Any) -> Reference:
        """From a JSONL file of ``{"prompt", "completion_tokens"}`` records."""
        with path.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        return cls.from_records(records, embed)


def prompt_key(prompt: str) -> str:
    """Identity of a prompt for de-duplication: case and runs of whitespace ignored."""
    normal = " ".join(prompt.split()).casefold()
    return hashlib.blake2b(normal.encode("utf-8"), digest_size=8).hexdigest()


class DriftMonitor:
    """Reference and current samples of one version; see the module docstring."""

    def __init__(self, config: DriftConfig, reference: Reference | None = None) -> None:
        self.config = config
        self.pinned = reference is not None
        self._ref_prompts: list[np.ndarray] = []
        self._ref_lengths: list[float] = []
        if reference is not None:
            self._ref_prompts = [np.asarray(v, dtype=np.float32) for v in reference.prompts]
            self._ref_lengths = list(reference.lengths)
        self._cur_prompts: deque[np.ndarray] = deque(maxlen=config.current_size)
        self._cur_lengths: deque[float] = deque(maxlen=config.current_size)

    # -- inputs ------------------------------------------------------------------------------
    def add_prompt(self, vector: Sequence[float] | np.ndarray) -> bool:
        """Add a prompt's vector; True when it went into the reference."""
        vec = np.asarray(vector, dtype=np.float32)
        if not self.pinned and len(self._ref_prompts) < self.config.reference_size:
            self._ref_prompts.append(vec)
            return True
        self._cur_prompts.append(vec)
        return False

    @property
    def reference_full(self) -> bool:
        return self.pinned or len(self._ref_prompts) >= self.config.reference_size

    def add_response_length(self, tokens: float) -> None:
        if not self.pinned and len(self._ref_lengths) < self.config.reference_size:
            self._ref_lengths.append(float(tokens))
        else:
            self._cur_lengths.append(float(tokens))

    # -- outputs -----------------------------------------------------------------------------
    def reading(self, rng: np.random.Generator | None = None) -> DriftReading:
        config = self.config
        mmd2 = p_prompt = ks = p_length = None
        if len(self._ref_prompts) >= 2 and len(self._cur_prompts) >= config.min_current:
            result = mmd_test(
                np.vstack(self._ref_prompts),
                np.vstack(list(self._cur_prompts)),
                permutations=config.permutations,
                rng=rng,
            )
            mmd2, p_prompt = result.statistic, result.p_value
        if self._ref_lengths and len(self._cur_lengths) >= config.min_current:
            result = ks_test(self._ref_lengths, list(self._cur_lengths))
            ks, p_length = result.statistic, result.p_value
        return DriftReading(
            mmd2,
            p_prompt,
            ks,
            p_length,
            len(self._ref_prompts),
            len(self._cur_prompts),
            len(self._ref_lengths),
            len(self._cur_lengths),
        )

    def snapshot(self) -> DriftMonitor:
        """A copy whose samples no longer change (the vectors are shared, not copied): its
        :meth:`reading` can run in another thread while this one is fed."""
        copy = DriftMonitor(self.config)
        copy.pinned = self.pinned
        copy._ref_prompts = list(self._ref_prompts)
        copy._ref_lengths = list(self._ref_lengths)
        copy._cur_prompts.extend(self._cur_prompts)
        copy._cur_lengths.extend(self._cur_lengths)
        return copy

    # -- state -------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "pinned": self.pinned,
            "ref_prompts": [encode_vector(v) for v in self._ref_prompts],
            "ref_lengths": list(self._ref_lengths),
            "cur_prompts": [encode_vector(v) for v in self._cur_prompts],
            "cur_lengths": list(self._cur_lengths),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: DriftConfig) -> DriftMonitor:
        monitor = cls(config)
        monitor.pinned = bool(state["pinned"])
        monitor._ref_prompts = [decode_vector(v) for v in state["ref_prompts"]]
        monitor._ref_lengths = [float(x) for x in state["ref_lengths"]]
        monitor._cur_prompts.extend(decode_vector(v) for v in state["cur_prompts"])
        monitor._cur_lengths.extend(float(x) for x in state["cur_lengths"])
        return monitor
