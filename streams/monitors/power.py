"""How strong is the prompt drift test? Requests until a shift is flagged, false alarms.

A *trial* fills a reference of ``reference_size`` prompts from the base set, then feeds a
stream of prompts one by one and runs the MMD test every ``check_every`` requests on the
latest ``current_size`` (from ``min_current`` on) until it flags (p < alpha) or
``max_requests`` have passed. On a stream from the shifted set the number of requests
until the flag is the detection delay; on a stream from the base set any flag is a false
alarm (with the repeated looks, as the live monitor has them).

Embeddings are computed once per prompt pool; trials resample from the pools. The prompt
sets are built from templates (:func:`general_prompts`, :func:`coding_prompts`) so they
need no download. Run: ``python -m streams.monitors.power --trials 50``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from streams.monitors.drift import DriftConfig, DriftMonitor

_COUNTRIES = (
    "France Peru Japan Kenya Canada Brazil Norway Egypt India Chile Spain Italy Ghana Vietnam "
    "Mexico Poland Turkey Greece Sweden Morocco Argentina Australia Portugal Ireland Nepal"
).split()
_TOPICS = (
    "photosynthesis",
    "the water cycle",
    "plate tectonics",
    "inflation",
    "the French Revolution",
    "black holes",
    "vaccines",
    "the stock market",
    "climate change",
    "the Roman Empire",
    "volcanoes",
    "democracy",
    "the immune system",
    "gravity",
    "the printing press",
    "tides",
    "evolution",
    "electricity",
    "the Renaissance",
    "rainbows",
)
_GENERAL = (
    "What is the capital of {country}?",
    "Explain {topic} in simple terms.",
    "Give me three facts about {country}.",
    "Why is {topic} important?",
    "Write a short poem about {topic}.",
    "What language do people speak in {country}?",
    "Summarise the history of {topic} in two sentences.",
    "What is a good dish to try in {country}?",
    "What is the population of {country}?",
    "Plan a three-day trip to {country}.",
    "Who discovered {topic}?",
    "How would you teach {topic} to a child?",
    "What are common myths about {topic}?",
)
_TASKS = (
    "reverses a linked list",
    "parses a CSV file",
    "checks whether a string is a palindrome",
    "merges two sorted arrays",
    "computes the n-th Fibonacci number",
    "validates an email",
    "reads a JSON config file",
    "retries an HTTP request with backoff",
    "sorts a dictionary by value",
    "counts words in a file",
    "flattens a nested list",
    "implements binary search",
    "deduplicates records by key",
    "connects to a PostgreSQL database",
    "streams a Kafka topic",
)
_LANGS = ("Python", "Rust", "Go", "Java", "TypeScript", "C++", "SQL", "Bash")
_CODING = (
    "Write a {lang} function that {task}.",
    "Why does my {lang} code that {task} raise an error?",
    "How do I write a unit test for {lang} code that {task}?",
    "Optimise this {lang} snippet that {task}.",
    "Explain the time complexity of a {lang} routine that {task}.",
)


def _fill(
    templates: Sequence[str], slots: dict[str, Sequence[str]], n: int, seed: int
) -> list[str]:
    names = sorted(slots)
    combos = [
        t.format(**dict(zip(names, values, strict=True)))
        for t in templates
        for values in itertools.product(*(slots[k] for k in names))
        if all("{" + k + "}" in t for k in names if "{" + k + "}" in t)
    ]
    combos = sorted(set(combos))
    rng = np.random.default_rng(seed)
    return [combos[i] for i in rng.choice(len(combos), size=min(n, len(combos)), replace=False)]


def general_prompts(n: int, seed: int = 0) -> list[str]:
    """Everyday questions (geography, science, history, poems)."""
    return _fill(_GENERAL, {"country": _COUNTRIES, "topic": _TOPICS}, n, seed)


def coding_prompts(n: int, seed: int = 0) -> list[str]:
    """Programming questions: the shifted distribution."""
    return _fill(_CODING, {"lang": _LANGS, "task": _TASKS}, n, seed)


@dataclass(frozen=True)
class PowerReport:
    trials: int
    shift_fraction: float
    detected: int
    delays: tuple[int, ...]
    false_alarms: int
    max_requests: int

    @property
    def detection_rate(self) -> float:
        return self.detected / self.trials

    @property
    def false_alarm_rate(self) -> float:
        return self.false_alarms / self.trials

    def summary(self) -> dict[str, object]:
        delays = sorted(self.delays)
        return {
            "trials": self.trials,
            "shift_fraction": self.shift_fraction,
            "detection_rate": self.detection_rate,
            "requests_to_flag_median": statistics.median(delays) if delays else None,
            "requests_to_flag_p90": delays[int(0.9 * (len(delays) - 1))] if delays else None,
            "requests_to_flag_max": delays[-1] if delays else None,
            "false_alarm_rate": self.false_alarm_rate,
            "max_requests": self.max_requests,
        }


def requests_until_flag(
    reference: np.ndarray,
    stream: np.ndarray,
    config: DriftConfig,
    *,
    check_every: int,
    rng: np.random.Generator,
) -> int | None:
    """Feed ``stream`` after a pinned ``reference``; the request count at the first flag."""
    monitor = DriftMonitor(config)
    for vector in reference:
        monitor.add_prompt(vector)
    for i, vector in enumerate(stream, start=1):
        monitor.add_prompt(vector)
        if i >= config.min_current and i % check_every == 0:
            if monitor.reading(rng).prompt_drifted(config.alpha):
                return i
    return None


def measure_power(
    base: np.ndarray,
    shifted: np.ndarray,
    config: DriftConfig,
    *,
    trials: int = 50,
    shift_fraction: float = 1.0,
    max_requests: int = 300,
    check_every: int = 10,
    seed: int = 0,
) -> PowerReport:
    """Detection delays on streams with ``shift_fraction`` of shifted prompts, and the
    false-alarm rate on streams of base prompts only (``trials`` of each)."""
    rng = np.random.default_rng(seed)
    delays: list[int] = []
    false_alarms = 0
    length = min(max_requests, len(base) - config.reference_size, len(shifted))
    if length < config.min_current:
        raise ValueError(f"pools too small for {config.min_current} current prompts")
    for _ in range(trials):
        # every stream is drawn without replacement: no prompt repeats within a trial
        order = rng.permutation(len(base))
        reference = base[order[: config.reference_size]]
        rest = base[order[config.reference_size :]][:length]
        take = rng.random(length) < shift_fraction
        mixed = np.where(take[:, None], shifted[rng.permutation(len(shifted))[:length]], rest)
        flagged = requests_until_flag(reference, mixed, config, check_every=check_every, rng=rng)
        if flagged is not None:
            delays.append(flagged)
        calm = rest[rng.permutation(length)]
        if requests_until_flag(reference, calm, config, check_every=check_every, rng=rng):
            false_alarms += 1
    return PowerReport(trials, shift_fraction, len(delays), tuple(delays), false_alarms, length)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--reference-size", type=int, default=100)
    parser.add_argument("--current-size", type=int, default=100)
    parser.add_argument("--min-current", type=int, default=20)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--max-requests", type=int, default=200)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--shift-fractions", default="1.0,0.5,0.25")
    args = parser.parse_args(argv)
    from streams.monitors.embeddings import MiniLMEmbedder

    embedder = MiniLMEmbedder()
    base = embedder.embed(general_prompts(1000, seed=1))
    shifted = embedder.embed(coding_prompts(300, seed=2))
    config = DriftConfig(
        reference_size=args.reference_size,
        current_size=args.current_size,
        min_current=args.min_current,
        permutations=args.permutations,
        alpha=args.alpha,
    )
    print(json.dumps({"config": asdict(config), "check_every": args.check_every}))
    for fraction in (float(f) for f in args.shift_fractions.split(",")):
        report = measure_power(
            base,
            shifted,
            config,
            trials=args.trials,
            shift_fraction=fraction,
            max_requests=args.max_requests,
            check_every=args.check_every,
        )
        print(json.dumps(report.summary()))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
