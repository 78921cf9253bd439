"""TorchEngine on the real SmolLM2-135M-Instruct: answers, in-flight batching, per-request
decoding, failures that stay with their request, the static-shape (CUDA graph) path on CPU.

Loads the model once for the module. Outputs stay short (max_new_tokens <= 24) so the file
runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from inference.backends.torch import TorchEngine, bucket_size, hash_uniform
from inference.errors import EngineDeadError, EngineError
from inference.types import GenerationRequest, Sampling
from tests.unit.engine_contract import FRANCE, PROMPTS, STORY, request, run_batch, run_one

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(model_dir: Path) -> AsyncIterator[TorchEngine]:
    eng = TorchEngine(model_dir, model_name="m", model_version="v")
    await eng.start()
    yield eng
    await eng.stop()


# -- basics ----------------------------------------------------------------------------------


async def test_engine_identity_and_health(engine: TorchEngine) -> None:
    assert engine.model_name == "m"
    assert engine.model_version == "v"
    assert engine.is_healthy
    assert engine.device in ("cpu", "cuda")


async def test_greedy_answer_knows_the_capital_of_france(engine: TorchEngine) -> None:
    req = request(engine, FRANCE, max_new_tokens=24)
    completion = await run_one(engine, req)
    assert "Paris" in completion.text
    assert completion.prompt_tokens == len(req.prompt_ids)
    # A short answer ends on the end-of-turn token before the budget runs out.
    assert completion.finish_reason == "stop"
    assert 0 < completion.completion_tokens < 24
    assert "<|im_end|>" not in completion.text


async def test_raw_prompt_is_continued_verbatim(engine: TorchEngine) -> None:
    req = request(engine, "The capital of France is", raw=True, max_new_tokens=6)
    completion = await run_one(engine, req)
    assert "Paris" in completion.text
    assert completion.prompt_tokens == len(req.prompt_ids)
    assert completion.prompt_tokens < 10  # no chat template around it
    assert completion.completion_tokens <= 6


# -- prompts ---------------------------------------------------------------------------------


async def test_encode_prompt_applies_the_chat_template(engine: TorchEngine) -> None:
    raw = engine.encode_prompt("Hello there", system=None, raw=True)
    chat = engine.encode_prompt("Hello there", system=None, raw=False)
    assert raw and chat
    assert chat != raw
    assert len(chat) > len(raw)
    # The user text is inside the template, tokenized the same way.
    assert any(chat[i : i + len(raw)] == raw for i in range(len(chat) - len(raw) + 1))
    tok = engine._tokenizer
    text = tok.decode(chat)
    assert "<|im_start|>user" in text
    assert text.rstrip().endswith("<|im_start|>assistant")  # the generation prompt


async def test_system_message_goes_into_the_template(engine: TorchEngine) -> None:
    plain = engine.encode_prompt("Hello", system=None, raw=False)
    with_system = engine.encode_prompt("Hello", system="You are a pirate.", raw=False)
    assert with_system != plain
    assert "You are a pirate." in engine._tokenizer.decode(with_system)
    # raw ignores the template, so the system message has nowhere to go
    assert engine.encode_prompt("Hello", system="You are a pirate.", raw=True) == (
        engine.encode_prompt("Hello", system=None, raw=True)
    )


async def test_not_started_engine_refuses(model_dir: Path) -> None:
    cold = TorchEngine(model_dir, model_name="m", model_version="v")
    try:
        with pytest.raises(EngineError):
            cold.encode_prompt("hi", system=None, raw=False)
        with pytest.raises(EngineError):
            await cold.generate([GenerationRequest("r", "hi", prompt_ids=[1, 2])])
    finally:
        await cold.stop()


# -- batching --------------------------------------------------------------------------------


async def test_batched_greedy_equals_single_requests(engine: TorchEngine) -> None:
    reqs = [request(engine, p, rid=f"r{i}", max_new_tokens=16) for i, p in enumerate(PROMPTS)]
    lengths = {len(r.prompt_ids) for r in reqs}
    assert len(lengths) == 3  # the batch really is ragged
    singles = [await run_one(engine, r) for r in reqs]
    batched = await run_batch(engine, reqs)
    assert [c.text for c in batched] == [c.text for c in singles]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in singles]
    assert [c.prompt_tokens for c in batched] == [len(r.prompt_ids) for r in reqs]
    assert all(c.text.strip() for c in batched)


async def test_greedy_tokens_match_a_forward_without_any_cache(engine: TorchEngine) -> None:
    """An independent reference: each next id from a full forward over the whole text, no
    KV cache, no packing, no masks of ours."""
    import torch

    reqs = [
        request(engine, p, rid=f"ref{i}", max_new_tokens=8, raw=True)
        for i, p in enumerate(
            ["The capital of France is", "Once upon a time, a dragon", "1, 2, 3, 4,"]
        )
    ]
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    tokenizer = engine._tokenizer
    expected = []
    with torch.inference_mode():
        for r in reqs:
            ids = list(r.prompt_ids)
            for _ in range(8):
                logits = reference(input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            expected.append(tokenizer.decode(ids[len(r.prompt_ids) :], skip_special_tokens=True))
    batched = await run_batch(engine, reqs)
    assert [c.text for c in batched] == expected


async def test_max_new_tokens_is_respected_per_request(engine: TorchEngine) -> None:
    prompt = "Count from 1 to 50, separated by commas."
    reqs = [
        request(engine, prompt, rid="three", max_new_tokens=3),
        request(engine, prompt, rid="twelve", max_new_tokens=12),
    ]
    three, twelve = await run_batch(engine, reqs)
    assert three.completion_tokens == 3 and three.finish_reason == "length"
    assert twelve.completion_tokens == 12 and twelve.finish_reason == "length"
    # Same prompt, greedy: the shorter output is the start of the longer one.
    assert twelve.text.startswith(three.text)
    assert len(twelve.text) > len(three.text)


async def test_stop_string_cuts_the_text(engine: TorchEngine) -> None:
    free = await run_one(engine, request(engine, FRANCE, max_new_tokens=24))
    assert "Paris" in free.text
    stopped = await run_one(engine, request(engine, FRANCE, max_new_tokens=24, stop=("Paris",)))
    assert "Paris" not in stopped.text
    assert stopped.finish_reason == "stop"
    assert free.text.startswith(stopped.text)
    assert stopped.text == free.text[: free.text.index("Paris")]
    assert stopped.completion_tokens <= free.completion_tokens


async def test_stop_string_never_seen_changes_nothing(engine: TorchEngine) -> None:
    free = await run_one(engine, request(engine, FRANCE, max_new_tokens=24))
    other = await run_one(engine, request(engine, FRANCE, max_new_tokens=24, stop=("zzqx",)))
    assert other == free


# -- sampling --------------------------------------------------------------------------------


async def test_same_seed_same_text_different_seeds_differ(engine: TorchEngine) -> None:
    def sampled(seed: int, rid: str = "s") -> GenerationRequest:
        return request(engine, STORY, rid=rid, max_new_tokens=12, temperature=0.9, seed=seed)

    first = await run_one(engine, sampled(1))
    again = await run_one(engine, sampled(1))
    assert first.text == again.text
    others = await run_batch(engine, [sampled(s, rid=f"s{s}") for s in (2, 3, 4)])
    texts = {first.text, *(c.text for c in others)}
    assert len(texts) >= 2  # four seeds at temperature 0.9 do not all agree


async def test_greedy_and_sampled_requests_share_a_batch(engine: TorchEngine) -> None:
    greedy_req = request(engine, STORY, rid="greedy", max_new_tokens=12)
    sampled_req = request(
        engine, STORY, rid="sampled", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7
    )
    greedy_alone = await run_one(engine, greedy_req)
    sampled_alone = await run_one(engine, sampled_req)
    greedy, sampled = await run_batch(engine, [greedy_req, sampled_req])
    # Each row kept its own settings: greedy stayed greedy, the sampled row used its seed.
    assert greedy.text == greedy_alone.text
    assert sampled.text == sampled_alone.text
    assert sampled.text != greedy.text


async def test_sampling_is_reproducible_whatever_the_batch_mates(engine: TorchEngine) -> None:
    """A row's seed drives only that row: batch-mates do not consume its random numbers."""
    seeded = request(engine, STORY, rid="seeded", max_new_tokens=10, temperature=0.9, seed=11)
    mate = request(engine, STORY, rid="mate", max_new_tokens=10, temperature=1.2, seed=99)
    alone = await run_one(engine, seeded)
    first, _ = await run_batch(engine, [seeded, mate])
    _, second = await run_batch(engine, [mate, seeded])
    assert first.text == alone.text
    assert second.text == alone.text


# -- in-flight batching ----------------------------------------------------------------------

LONG_PROMPT = (
    "Explain what a Kafka topic is to someone who has never used a message broker, and give "
    "one example of when a team would use several partitions for it."
)


async def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


def running_tokens(engine: TorchEngine, rid: str) -> int:
    assert engine._loop is not None
    for seq in list(engine._loop.scheduler.running):
        if seq.handle.request.request_id == rid:
            return len(seq.generated)
    return -1


async def test_engine_batches_in_flight(engine: TorchEngine) -> None:
    assert engine.inflight_batching is True


async def test_requests_admitted_mid_flight_equal_single_requests(engine: TorchEngine) -> None:
    long = request(
        engine, "Count from 1 to 50, separated by commas.", rid="long", max_new_tokens=24
    )
    late = [
        request(engine, p, rid=f"late{i}", max_new_tokens=12)
        for i, p in enumerate(["Hi", LONG_PROMPT, STORY])
    ]
    assert len({len(r.prompt_ids) for r in late}) == 3  # very different prompt lengths
    singles = [await run_one(engine, r) for r in [long, *late]]

    first = asyncio.create_task(engine.generate_one(long))
    await wait_until(lambda: running_tokens(engine, "long") >= 3)  # decoding already
    rest = [asyncio.create_task(engine.generate_one(r)) for r in late]
    done = [await first, *[await t for t in rest]]
    assert [c.text for c in done] == [c.text for c in singles]
    assert [c.completion_tokens for c in done] == [c.completion_tokens for c in singles]


async def test_a_finished_request_is_handed_back_before_longer_ones(engine: TorchEngine) -> None:
    prompt = "Count from 1 to 50, separated by commas."
    long = asyncio.create_task(
        engine.generate_one(request(engine, prompt, rid="long", max_new_tokens=24))
    )
    short = asyncio.create_task(
        engine.generate_one(request(engine, prompt, rid="short", max_new_tokens=2))
    )
    done, _ = await asyncio.wait({long, short}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {short}
    assert not long.done()  # the long one is still decoding
    assert (await short).completion_tokens == 2
    assert (await long).completion_tokens == 24


async def test_a_bad_request_fails_alone(engine: TorchEngine) -> None:
    good = request(engine, FRANCE, rid="good", max_new_tokens=12)
    alone = await run_one(engine, good)
    bad_ids = GenerationRequest("bad-ids", "x", Sampling(max_new_tokens=4), prompt_ids=[10**9])
    empty = GenerationRequest("empty", "x", Sampling(max_new_tokens=4), prompt_ids=[])
    too_long = request(engine, FRANCE, rid="too-long", max_new_tokens=engine.max_seq_len)
    bad_temp = request(engine, FRANCE, rid="nan", max_new_tokens=4, temperature=float("nan"))
    outcomes = await engine.generate([bad_ids, good, empty, too_long, bad_temp])
    assert outcomes[1] == alone
    for i in (0, 2, 3, 4):
        assert isinstance(outcomes[i], EngineError), outcomes[i]
    assert engine.is_healthy


async def test_hostile_sampling_values_never_poison_batch_mates(engine: TorchEngine) -> None:
    greedy = request(engine, STORY, rid="greedy", max_new_tokens=12)
    alone = await run_one(engine, greedy)
    hostile = [
        request(engine, STORY, rid="tiny-t", max_new_tokens=12, temperature=1e-40, seed=1),
        request(engine, STORY, rid="tiny-p", max_new_tokens=12, temperature=1.0, top_p=1e-9),
        request(engine, STORY, rid="both", max_new_tokens=12, temperature=1e-40, top_p=1e-9),
        request(engine, STORY, rid="hot", max_new_tokens=12, temperature=100.0, seed=3),
    ]
    outcomes = await run_batch(engine, [greedy, *hostile])
    assert outcomes[0] == alone
    # A vanishing temperature or nucleus leaves only the most likely id: greedy text.
    assert [c.text for c in outcomes[1:4]] == [alone.text] * 3
    assert outcomes[4].completion_tokens == 12  # sampled from a flat distribution, no NaN


async def test_a_cancelled_request_frees_its_slot(engine: TorchEngine) -> None:
    prompt = "Count from 1 to 50, separated by commas."
    task = asyncio.create_task(
        engine.generate_one(request(engine, prompt, rid="cancel-me", max_new_tokens=500))
    )
    await wait_until(lambda: running_tokens(engine, "cancel-me") >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Freed within a few steps, long before its 500 tokens could have been decoded.
    await wait_until(lambda: running_tokens(engine, "cancel-me") == -1, timeout=5.0)
    assert (await run_one(engine, request(engine, FRANCE, max_new_tokens=4))).text


# -- the static-shape (CUDA graph) path, on CPU ---------------------------------------------


def test_bucket_sizes_are_powers_of_two_within_the_slots() -> None:
    assert [bucket_size(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert bucket_size(5, 6) == 6
    with pytest.raises(ValueError):
        bucket_size(0, 4)
    with pytest.raises(ValueError):
        bucket_size(5, 4)


def test_hashed_noise_is_uniform_and_depends_on_its_own_row_only() -> None:
    import torch

    keys = torch.tensor([1, 2, 1], dtype=torch.int64)
    steps = torch.tensor([0, 0, 1], dtype=torch.int64)
    u = hash_uniform(torch, keys, steps, 50_000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    alone = hash_uniform(torch, keys[:1], steps[:1], 50_000)
    assert torch.equal(alone[0], u[0])


async def test_static_shape_path_gives_the_same_tokens(
    engine: TorchEngine, model_dir: Path
) -> None:
    static = TorchEngine(
        model_dir,
        model_name="m",
        model_version="v",
        static_shapes=True,
        max_batch_size=4,
        max_seq_len=256,
    )
    await static.start()
    try:
        assert static.static_shapes and static._loop is not None
        assert static._loop.cache.capacity == 256  # preallocated whole, never grows
        reqs = [request(engine, p, rid=f"s{i}", max_new_tokens=12) for i, p in enumerate(PROMPTS)]
        expected = await run_batch(engine, reqs)
        assert await run_batch(static, reqs) == expected  # 3 rows padded to a bucket of 4
    finally:
        await static.stop()


async def test_rescored_head_keeps_the_fp32_greedy_tokens(
    engine: TorchEngine, model_dir: Path
) -> None:
    rescored = TorchEngine(
        model_dir, model_name="m", model_version="v", device="cpu", lm_head="rescored"
    )
    await rescored.start()
    try:
        assert rescored.lm_head == "rescored"
        assert rescored.fused is not None and rescored.fused.rescore_k == 8
        reqs = [request(engine, p, rid=f"h{i}", max_new_tokens=24) for i, p in enumerate(PROMPTS)]
        expected = [c.text for c in await run_batch(engine, reqs)]
        assert [c.text for c in await run_batch(rescored, reqs)] == expected
    finally:
        await rescored.stop()


def test_an_unknown_head_is_refused(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="lm_head"):
        TorchEngine(model_dir, model_name="m", model_version="v", lm_head="fast")


# -- device errors ---------------------------------------------------------------------------


async def test_a_failed_step_fails_its_requests_and_a_device_error_kills_the_engine(
    model_dir: Path,
) -> None:
    eng = TorchEngine(model_dir, model_name="m", model_version="v", max_batch_size=4)
    await eng.start()
    try:
        assert eng._loop is not None
        real_step = eng._loop.step
        calls = {"n": 0}

        def flaky(*args: object) -> object:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a transient failure")
            return real_step(*args)

        eng._loop.step = flaky
        with pytest.raises(EngineError, match="transient"):
            await eng.generate_one(request(eng, FRANCE, max_new_tokens=8))
        assert eng.is_healthy  # a step failure fails its requests, not the engine
        assert "Paris" in (await run_one(eng, request(eng, FRANCE, max_new_tokens=12))).text

        def broken(*args: object) -> object:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        eng._loop.step = broken
        outcome = await eng.generate([request(eng, FRANCE, max_new_tokens=8)])
        assert isinstance(outcome[0], EngineDeadError)
        assert eng.dead_error is not None and not eng.is_healthy
        with pytest.raises(EngineDeadError):
            await eng.generate_one(request(eng, FRANCE, max_new_tokens=8))
    finally:
        await eng.stop()
