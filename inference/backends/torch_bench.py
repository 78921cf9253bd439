"""Engine-only speed of the torch backend: tokens/s at batch 1 and with N concurrent
requests, greedy, next to agreement with fp32 greedy outputs.

Not a test and not part of the worker: a measuring tool, run by hand::

    .venv/bin/python -m inference.backends.torch_bench                     # fp32 + bf16
    .venv/bin/python -m inference.backends.torch_bench --variants fp32,fp32-rescored,llama_cpp
    .venv/bin/python -m inference.backends.torch_bench --variants fp32,bf16,fp32-compile \\
        --baseline-ref bb89c34 --threads 2 --json bench-results/torch-engine.json

``--baseline-ref`` loads ``inference/backends/torch.py`` as it was at that git commit (the
static-batch engine) and measures it in the same run, on the same prompts: batch 1 = one
request at a time, concurrent = all of them in one ``generate`` call.

``llama_cpp`` as a variant runs the packaged GGUF through the llama.cpp backend (the
anchor) and prints every figure as a ratio to its batch-1 tokens/s.

``--rounds`` rounds interleave the engines (each is started, runs each load, and is
stopped in turn), so a change in machine load hits every engine alike: on a shared machine
the ratios are the figures to trust. Each variant reports tokens/s (completion tokens /
wall time) for the two loads and the share of its outputs identical to the reference
(this engine, fp32, exact head, one at a time).
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
    "fp32-rescored": {"dtype": "float32", "lm_head": "rescored"},
    "fp32-rescored-compile": {"dtype": "float32", "lm_head": "rescored", "compile": True},
    "fp32-transformers": {"dtype": "float32", "kernel": "transformers"},
    "fp32-rescored-transformers": {
        "dtype": "float32",
        "lm_head": "rescored",
        "kernel": "transformers",
    },
    "int8w": {"quantize": "int8-weight", "lm_head": "rescored"},
    "int4w": {"quantize": "int4-weight", "lm_head": "rescored"},
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


LOADS = ("batch 1", "concurrent")


def _llama_cpp_engine(args: argparse.Namespace) -> Any:
    """The anchor: the packaged GGUF (Q4_1) through the llama.cpp backend."""
    from inference.backends.llama_cpp import LlamaCppEngine
    from inference.backends.model_files import find_smollm2_gguf

    return LlamaCppEngine(
        find_smollm2_gguf(),
        model_name="m",
        model_version="v",
        max_batch_size=args.concurrency,
        threads=args.threads,
    )


async def measure_round(
    engine: Any, *, new_tokens: int, concurrency: int, load: str
) -> tuple[float, list[Completion]]:
    """One pass of a load: the 8 prompts one at a time, or ``concurrency`` together."""
    prompts = list(CHAT_PROMPTS)
    batch = prompts if load == "batch 1" else [prompts[i % 8] for i in range(concurrency)]
    return await timed(engine, make_requests(engine, batch, new_tokens), load != "batch 1")


async def run(args: argparse.Namespace) -> list[Figure]:
    """Every engine started at once, then ``rounds`` rounds in which each engine runs
    each load in turn: a change of machine load hits all engines alike, so the ratios
    hold on a shared machine even where the absolute figures do not."""
    from inference.backends.model_files import resolve_model_dir
    from inference.backends.torch import TorchEngine

    repo = _REPO
    model_dir = resolve_model_dir(None, repo / ".sluice" / "models")
    common = {"model_name": "m", "model_version": "v", "device": "cpu", "threads": args.threads}
    engines: dict[str, Any] = {}
    # The reference first: this engine, fp32 (its batch-1 outputs are the yardstick).
    for name in ["fp32", *[v for v in args.variants if v != "fp32"]]:
        if name == "llama_cpp":
            engines[name] = _llama_cpp_engine(args)
        else:
            engines[name] = TorchEngine(
                model_dir, max_batch_size=args.concurrency, **common, **VARIANTS[name]
            )
    if args.baseline_ref:
        old = load_baseline(args.baseline_ref, repo)
        engines[f"static@{args.baseline_ref}"] = old(
            model_dir, max_batch_size=args.concurrency, **common
        )
    totals: dict[tuple[str, str], list[float]] = {}
    texts: dict[tuple[str, str], list[str]] = {}
    # Each engine runs alone: started, warmed, measured, stopped, round after round. Two
    # live torch engines in one process each keep an OpenMP team; with more OpenMP threads
    # than cores libgomp barely spins between parallel regions and every step slows down
    # (measured ~2x at batch 1 on 2 cores), so live neighbours would skew the figures.
    try:
        for r in range(args.rounds):
            for name, engine in engines.items():
                await engine.start()
                for load in LOADS:  # warm every shape once
                    await measure_round(
                        engine, new_tokens=8, concurrency=args.concurrency, load=load
                    )
                for load in LOADS:
                    seconds, outs = await measure_round(
                        engine, new_tokens=args.new_tokens, concurrency=args.concurrency, load=load
                    )
                    tokens = sum(o.completion_tokens for o in outs)
                    acc = totals.setdefault((name, load), [0.0, 0.0, 0.0])
                    acc[0] += seconds
                    acc[1] += tokens
                    acc[2] += len(outs)
                    texts[(name, load)] = [o.text for o in outs]
                    print(
                        f"round {r + 1}/{args.rounds} {name:>22} | {load:>10} | "
                        f"{tokens / seconds:7.1f} tok/s",
                        flush=True,
                    )
                await engine.stop()
    finally:
        for engine in engines.values():
            await engine.stop()
    reference = texts[("fp32", "batch 1")]
    figures = []
    for (name, load), (seconds, tokens, requests) in totals.items():
        got = texts[(name, load)]
        same = sum(t == reference[i % 8] for i, t in enumerate(got)) / len(got)
        label = "batch 1" if load == "batch 1" else f"{args.concurrency} concurrent"
        figures.append(
            Figure(name, label, int(requests), int(tokens), seconds, tokens / seconds, same)
        )
    print_table(figures)
    return figures


def print_table(figures: list[Figure]) -> None:
    anchor = {f.load: f.tokens_per_s for f in figures if f.engine == "llama_cpp"}
    one = anchor.get("batch 1")
    print()
    for f in figures:
        vs = f" | {f.tokens_per_s / one:5.2f}x llama.cpp batch 1" if one else ""
        print(
            f"{f.engine:>22} | {f.load:>14} | {f.completion_tokens:6d} tok | {f.seconds:8.2f} s | "
            f"{f.tokens_per_s:7.1f} tok/s{vs} | "
            f"identical to fp32 ref {f.identical_to_reference:.0%}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp32,bf16", type=lambda s: s.split(","))
    parser.add_argument("--baseline-ref", default=None, help="git ref of the static engine")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS and v != "llama_cpp"]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)} and llama_cpp")
    figures = asyncio.run(run(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
