"""The hand-written forward (``inference/backends/torch_fused.py``) on the real
SmolLM2-135M-Instruct: fp32 gives transformers' tokens, int8 weights are batch-invariant,
and what the fused forward does not cover is refused or falls back, with the reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_asyncio

from inference.backends.torch import TorchEngine
from inference.backends.torch_fused import quantize_int4, quantize_int8, unsupported_reason
from inference.errors import EngineError
from tests.unit.engine_contract import FRANCE, PROMPTS, STORY, request, run_batch, run_one

LONG = (
    "Explain what a Kafka topic is to someone who has never used a message broker, and give "
    "one example of when a team would use several partitions for it."
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def transformers_engine(model_dir: Path) -> AsyncIterator[TorchEngine]:
    eng = TorchEngine(model_dir, model_name="m", model_version="v", kernel="transformers")
    await eng.start()
    yield eng
    await eng.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def int8_engine(model_dir: Path) -> AsyncIterator[TorchEngine]:
    eng = TorchEngine(
        model_dir, model_name="m", model_version="v", quantize="int8-weight", lm_head="rescored"
    )
    await eng.start()
    yield eng
    await eng.stop()


pytestmark = pytest.mark.slow


async def test_fused_fp32_gives_the_transformers_tokens(
    transformers_engine: TorchEngine, model_dir: Path
) -> None:
    assert transformers_engine.fused is None
    fused = TorchEngine(model_dir, model_name="m", model_version="v", device="cpu")
    await fused.start()
    try:
        assert fused.fused is not None and fused.fused.weights == "float32"
        prompts = [*PROMPTS, STORY, LONG]
        reqs = [request(fused, p, rid=f"f{i}", max_new_tokens=24) for i, p in enumerate(prompts)]
        expected = [c.text for c in await run_batch(transformers_engine, reqs)]
        assert [c.text for c in await run_batch(fused, reqs)] == expected
        assert [(await run_one(fused, r)).text for r in reqs] == expected
    finally:
        await fused.stop()


async def test_int8_weights_answer_and_say_so_in_the_version(int8_engine: TorchEngine) -> None:
    assert int8_engine.dtype == "int8-weight"
    assert int8_engine.model_version == "v+int8w"
    assert int8_engine.fused is not None and int8_engine.fused.batch_invariant
    answer = await run_one(int8_engine, request(int8_engine, FRANCE, max_new_tokens=12))
    assert "Paris" in answer.text


async def test_int8_batched_greedy_equals_single_requests(int8_engine: TorchEngine) -> None:
    prompts = [*PROMPTS, STORY, LONG, "Why do cats purr?"]
    reqs = [request(int8_engine, p, rid=f"q{i}", max_new_tokens=32) for i, p in enumerate(prompts)]
    singles = [(await run_one(int8_engine, r)).text for r in reqs]
    assert [c.text for c in await run_batch(int8_engine, reqs + reqs)] == singles + singles


async def test_int8_requests_admitted_mid_flight_equal_single_requests(
    int8_engine: TorchEngine,
) -> None:
    eng = int8_engine
    first = request(eng, "Count from 1 to 50, separated by commas.", rid="a", max_new_tokens=32)
    late = [request(eng, p, rid=f"l{i}", max_new_tokens=16) for i, p in enumerate(PROMPTS)]
    singles = [(await run_one(eng, r)).text for r in [first, *late]]
    running = asyncio.create_task(eng.generate_one(first))
    await asyncio.sleep(0.3)  # decoding by now: the late ones join a running batch
    rest = [asyncio.create_task(eng.generate_one(r)) for r in late]
    assert [(await running).text, *[(await t).text for t in rest]] == singles


async def test_batched_attention_is_what_breaks_invariance(int8_engine: TorchEngine) -> None:
    """The guard above can fail: with row-by-row attention switched off, the same int8
    weights give batched answers that differ from single ones on these prompts."""
    fused = int8_engine.fused
    prompts = [*PROMPTS, STORY, LONG, "Why do cats purr?"]
    reqs = [request(int8_engine, p, rid=f"b{i}", max_new_tokens=48) for i, p in enumerate(prompts)]
    singles = [(await run_one(int8_engine, r)).text for r in reqs]
    fused.batch_invariant = False
    try:
        batched = [c.text for c in await run_batch(int8_engine, reqs + reqs)]
    finally:
        fused.batch_invariant = True
    assert batched != singles + singles


def test_quantize_int8_is_per_channel_and_close() -> None:
    import torch

    w = torch.randn(64, 32) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs().amax(dim=1)
    assert bool((err <= scale / 2 + 1e-12).all())  # at most half a step, in every row


async def test_int4_weights_are_batch_invariant_and_say_so(model_dir: Path) -> None:
    eng = TorchEngine(
        model_dir, model_name="m", model_version="v", quantize="int4-weight", lm_head="rescored"
    )
    await eng.start()
    try:
        assert eng.model_version == "v+int4w" and eng.fused is not None
        assert {layer.qkv.fmt for layer in eng.fused.layers} == {"int4"}
        assert eng.fused.head.fmt == "int4" and eng.fused.rescore_k == 8
        prompts = [*PROMPTS, STORY, LONG]
        reqs = [request(eng, p, rid=f"i{i}", max_new_tokens=32) for i, p in enumerate(prompts)]
        singles = [(await run_one(eng, r)).text for r in reqs]
        assert all(t.strip() for t in singles)
        assert [c.text for c in await run_batch(eng, reqs + reqs)] == singles + singles
    finally:
        await eng.stop()


def test_quantize_int4_reconstructs_within_half_a_step() -> None:
    import torch

    w = torch.randn(128, 192)
    packed, scales_zeros = quantize_int4(w)
    assert scales_zeros.shape == (192 // 32, 128, 2)
    x = torch.eye(192).to(torch.bfloat16)  # x @ W^T = W^T: the kernel de-quantizes for us
    back = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros).float().T
    step = scales_zeros[..., 0].float().T.repeat_interleave(32, dim=1)  # [128, 192]
    assert bool(((back - w).abs() <= step * 0.5 + 0.02 * w.abs() + 1e-2).all())
    with pytest.raises(ValueError, match="group"):
        quantize_int4(torch.randn(8, 100))  # 100 columns: not whole groups of 32


def _config(**over: object) -> SimpleNamespace:
    base = {"model_type": "llama", "hidden_act": "silu"}
    base["rope_parameters"] = {"rope_type": "default"}
    return SimpleNamespace(**{**base, **over})


def test_unsupported_models_are_named() -> None:
    assert unsupported_reason(_config()) is None
    assert unsupported_reason(_config(rope_parameters={"rope_type": "llama3"})) is None
    assert "gpt2" in (unsupported_reason(_config(model_type="gpt2")) or "")
    assert "gelu" in (unsupported_reason(_config(hidden_act="gelu")) or "")
    dynamic = _config(rope_parameters={"rope_type": "dynamic"})
    assert "dynamic" in (unsupported_reason(dynamic) or "")
    assert "biases" in (unsupported_reason(_config(mlp_bias=True)) or "")


async def test_int8_weight_without_the_fused_forward_is_refused(model_dir: Path) -> None:
    eng = TorchEngine(
        model_dir, model_name="m", model_version="v", quantize="int8-weight", kernel="transformers"
    )
    with pytest.raises(EngineError, match="fused"):
        await eng.start()


def test_unknown_kernel_and_quantize_values_are_refused(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="kernel"):
        TorchEngine(model_dir, model_name="m", model_version="v", kernel="fast")
    with pytest.raises(ValueError, match="quantize"):
        TorchEngine(model_dir, model_name="m", model_version="v", quantize="int4")
