"""Engine-only speed of the torch backend: tokens/s at batch 1 and with N concurrent
requests, greedy, next to agreement with fp32 greedy outputs.

Not a test and not part of the worker: a measuring tool, run by hand::

    .venv/bin/python -m inference.backends.torch_bench                     # fp32 + bf16
    .venv/bin/python -m inference.backends.torch_bench --variants fp32,bf16,fp32-compile \\
        --baseline-ref bb89c34 --threads 2 --json bench-results/torch-engine.json

``--baseline-ref`` loads ``inference/backends/torch.py`` as it was at that git commit (the
static-batch engine) and measures it in the same run, on the same prompts: batch 1 = one
request at a time, concurrent = all of them in one ``generate`` call.

Each variant reports tokens/s (completion tokens / wall time) for the two loads and the
share of its outputs identical to the reference (this engine, fp32, one at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from inference.types import Completion, GenerationRequest, Sampling

_REPO = Path(__file__).resolve().parents[2]

#: Eight chat prompts of mixed lengths (3 to 40 words).
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Hi",
    "Write one sentence about the ocean and explain, in simple words, why it looks blue.",
    "Tell me a short story about a dragon.",
    "List three tips for staying focused while studying at home.",
    "Explain what a Kafka topic is to someone who has never used a message broker, "
    "and give one example of when a team would use several partitions for it.",
    "Translate 'good morning' into Spanish.",
    "Why do cats purr?",
)

#: name -> engine keyword arguments
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp32-compile": {"dtype": "float32", "compile": True},
    "bf16-compile": {"dtype": "bfloat16", "compile": True},
    "fp32-static": {"dtype": "float32", "static_shapes": True},
}


@dataclass
class Figure:
    engine: str
    load: str
    requests: int
    completion_tokens: int
    seconds: float
    tokens_per_s: float
    identical_to_reference: float


def load_baseline(ref: str, repo: Path) -> type:
    """``TorchEngine`` from ``inference/backends/torch.py`` at git ``ref``."""
    source = subprocess.run(
        ["git", "show", f"{ref}:inference/backends/torch.py"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "torch_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("torch_baseline", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TorchEngine  # type: ignore[no-any-return]


def make_requests(engine: Any, prompts: Sequence[str], new_tokens: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"r{i}",
            p,
            Sampling(max_new_tokens=new_tokens),
            prompt_ids=engine.encode_prompt(p, system=None, raw=False),
        )
        for i, p in enumerate(prompts)
    ]


async def timed(engine: Any, reqs: list[GenerationRequest], concurrent: bool) -> tuple[float, list]:
    start = time.perf_counter()
    if concurrent:
        outs = await engine.generate(reqs)
    else:
        outs = [(await engine.generate([r]))[0] for r in reqs]
    elapsed = time.perf_counter() - start
    for o in outs:
        if not isinstance(o, Completion):
            raise RuntimeError(f"a request failed: {o!r}")
    return elapsed, outs


async def measure(
    name: str,
    engine: Any,
    *,
    new_tokens: int,
    concurrency: int,
    reference: dict[str, list[str]],
) -> list[Figure]:
    await engine.start()
    figures = []
    try:
        prompts = list(CHAT_PROMPTS)
        many = [prompts[i % len(prompts)] for i in range(concurrency)]
        for load, batch, concurrent in (
            ("batch 1", prompts, False),
            (f"{concurrency} concurrent", many, True),
        ):
            reqs = make_requests(engine, batch, new_tokens)
            await timed(engine, reqs[:2], concurrent)  # warm this shape
            seconds, outs = await timed(engine, reqs, concurrent)
            texts = [o.text for o in outs]
            base = reference.setdefault("batch 1", texts)  # the first engine's batch 1
            ref = [base[prompts.index(p)] for p in batch]
            same = sum(a == b for a, b in zip(texts, ref, strict=True)) / len(texts)
            tokens = sum(o.completion_tokens for o in outs)
            figures.append(Figure(name, load, len(reqs), tokens, seconds, tokens / seconds, same))
            print(
                f"{name:>16} | {load:>14} | {tokens:5d} tok | {seconds:7.2f} s | "
                f"{tokens / seconds:7.1f} tok/s | identical to fp32 ref {same:.0%}",
                flush=True,
            )
    finally:
        await engine.stop()
    return figures


async def run(args: argparse.Namespace) -> list[Figure]:
    from inference.backends.model_files import resolve_model_dir
    from inference.backends.torch import TorchEngine

    repo = _REPO
    model_dir = resolve_model_dir(None, repo / ".sluice" / "models")
    common = {"model_name": "m", "model_version": "v", "device": "cpu", "threads": args.threads}
    reference: dict[str, list[str]] = {}
    figures: list[Figure] = []
    # The reference first: this engine, fp32 (its batch-1 outputs are the yardstick).
    names = ["fp32", *[v for v in args.variants if v != "fp32"]]
    for name in names:
        engine = TorchEngine(model_dir, max_batch_size=args.concurrency, **common, **VARIANTS[name])
        figures += await measure(
            name,
            engine,
            new_tokens=args.new_tokens,
            concurrency=args.concurrency,
            reference=reference,
        )
    if args.baseline_ref:
        old = load_baseline(args.baseline_ref, repo)
        engine = old(model_dir, max_batch_size=args.concurrency, **common)
        figures += await measure(
            f"static@{args.baseline_ref}",
            engine,
            new_tokens=args.new_tokens,
            concurrency=args.concurrency,
            reference=reference,
        )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp32,bf16", type=lambda s: s.split(","))
    parser.add_argument("--baseline-ref", default=None, help="git ref of the static engine")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    figures = asyncio.run(run(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
