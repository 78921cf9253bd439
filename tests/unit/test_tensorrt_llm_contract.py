"""TensorRTLLMEngine against a fake of the TensorRT-LLM 1.x LLM API.

The fake (``tests/unit/fake_tensorrt_llm.py``) copies the real API's shapes: kw-only
``SamplingParams``/``KvCacheConfig`` that refuse unknown fields, an ``LLM`` that refuses
kwargs its args class lacks, ``generate_async`` returning an output awaited with
``aresult()``, ``RequestError`` for one request and executor death for anything else, and
``get_stats_async`` as an async iterable. It goes into ``sys.modules`` so ``start()`` runs
its real lazy ``import tensorrt_llm``. Real-GPU behaviour is not covered here.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from inference.backends.tensorrt_llm import TensorRTLLMEngine
from inference.errors import EngineError, EngineOverloadedError, InvalidRequestError
from inference.inflight import InflightDispatcher
from inference.types import Completion, GenerationRequest, Sampling
from tests.unit.fake_tensorrt_llm import FakeTensorRT, Plan, install

WAIT = 5.0


def req(rid: str, sampling: Sampling | None = None, prompt_ids: list[int] | None = None):
    return GenerationRequest(
        request_id=rid,
        prompt=f"prompt {rid}",
        sampling=sampling or Sampling(),
        prompt_ids=[1, 11, 12] if prompt_ids is None else prompt_ids,
    )


def make_engine(registry: CollectorRegistry | None = None, **kwargs: object) -> TensorRTLLMEngine:
    return TensorRTLLMEngine(
        "org/some-model",
        model_name="m",
        model_version="v1",
        max_batch_size=8,
        max_num_tokens=2048,
        kv_cache_free_gpu_memory_fraction=0.5,
        registry=registry,
        stats_interval_s=0.01,
        **kwargs,  # type: ignore[arg-type]
    )


async def eventually(check, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    return install(monkeypatch)


@pytest.fixture
async def engine(fake: FakeTensorRT):
    eng = make_engine(CollectorRegistry())
    await eng.start()
    yield eng
    await eng.stop()


async def run(engine: TensorRTLLMEngine, request: GenerationRequest) -> Completion:
    return await asyncio.wait_for(engine.generate_one(request), WAIT)


# -- import and start ------------------------------------------------------------------
async def test_missing_tensorrt_llm_gives_plain_install_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import now fails
    engine = make_engine()  # the module imported fine without it
    with pytest.raises(EngineError) as info:
        await engine.start()
    message = str(info.value)
    assert "not installed" in message
    assert "sluice[tensorrt]" in message
    assert "NVIDIA's index" in message and "GPU host" in message
    assert engine.is_healthy  # a failed start is not a dead executor
    await engine.stop()


async def test_start_builds_llm_off_the_loop_with_documented_kwargs(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    llm = fake.llm
    assert not llm.built_on_main_thread  # blocking construction ran in a thread
    assert llm.kwargs["model"] == "org/some-model"
    assert llm.kwargs["max_batch_size"] == 8
    assert llm.kwargs["max_num_tokens"] == 2048
    assert llm.kwargs["kv_cache_config"].free_gpu_memory_fraction == 0.5
    assert llm.kwargs["enable_iter_perf_stats"] is True  # no stats without it
    assert "enable_mixed_sampler" not in llm.kwargs  # this fake is 1.1+: no such field
    assert engine.inflight_batching is True
    assert engine.max_batch_size == 8


async def test_enable_mixed_sampler_passed_where_the_args_class_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, mixed_sampler_field=True)  # TensorRT-LLM 1.0
    engine = make_engine()
    await engine.start()
    try:
        assert fake.llm.kwargs["enable_mixed_sampler"] is True
    finally:
        await engine.stop()


async def test_prebuilt_engine_folder_uses_the_tensorrt_engine_llm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = install(monkeypatch)
    (tmp_path / "rank0.engine").write_bytes(b"")
    engine = TensorRTLLMEngine(
        tmp_path, model_name="m", model_version="v", max_batch_size=4, max_num_tokens=512
    )
    await engine.start()
    try:
        assert type(fake.llm).__mro__[1].__name__ == "TrtEngineLLM"
        assert "enable_iter_perf_stats" not in fake.llm.kwargs  # not a TrtLlmArgs field
    finally:
        await engine.stop()


async def test_extra_llm_kwargs_pass_through_and_unknown_ones_fail_start(
    fake: FakeTensorRT,
) -> None:
    engine = make_engine(llm_kwargs={"max_seq_len": 4096})
    await engine.start()
    assert fake.llm.kwargs["max_seq_len"] == 4096
    await engine.stop()
    bad = make_engine(llm_kwargs={"max_sequence_length": 4096})
    with pytest.raises(EngineError, match="invalid argument: max_sequence_length"):
        await bad.start()
    await bad.stop()


async def test_load_failure_is_an_engine_error(fake: FakeTensorRT) -> None:
    def broken(**kwargs: object) -> object:
        raise RuntimeError("CUDA error: no device")

    engine = make_engine(llm_factory=broken)
    with pytest.raises(EngineError, match="could not load org/some-model: CUDA error"):
        await engine.start()
    with pytest.raises(EngineError, match="not started"):
        await engine.generate_one(req("r"))
    await engine.stop()


async def test_generate_before_start_raises(fake: FakeTensorRT) -> None:
    engine = make_engine()
    with pytest.raises(EngineError, match="not started"):
        await engine.generate([req("a")])
    with pytest.raises(EngineError, match="not started"):
        engine.encode_prompt("hi", system=None, raw=True)


# -- prompts ---------------------------------------------------------------------------
async def test_encode_prompt_applies_the_chat_template_unless_raw(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    hf = fake.hf_tokenizer
    raw = engine.encode_prompt("hello there", system=None, raw=True)
    assert raw == hf.encode("hello there", add_special_tokens=True)
    chat = engine.encode_prompt("hello there", system="be brief", raw=False)
    expected = hf.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    assert chat == expected
    assert chat != raw


async def test_no_chat_template_falls_back_to_plain_encoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, chat_template=None)
    engine = make_engine()
    await engine.start()
    try:
        ids = engine.encode_prompt("hello", system="sys", raw=False)
        assert ids == fake.hf_tokenizer.encode("hello", add_special_tokens=True)
    finally:
        await engine.stop()


async def test_token_ids_from_admission_are_sent_not_text(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    await run(engine, req("a", prompt_ids=[1, 42, 43, 44]))
    sent, _ = fake.llm.submitted[0]
    assert sent == [1, 42, 43, 44]


async def test_request_without_ids_is_encoded_with_the_chat_template(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    request = req("a", prompt_ids=[])
    completion = await run(engine, request)
    sent, _ = fake.llm.submitted[0]
    assert sent == engine.encode_prompt(request.prompt, system=None, raw=False)
    assert completion.prompt_tokens == len(sent)


# -- sampling mapping ------------------------------------------------------------------
async def test_max_tokens_is_always_explicit(fake: FakeTensorRT, engine: TensorRTLLMEngine) -> None:
    await run(engine, req("default"))  # Sampling() default: 64 new tokens
    await run(engine, req("five", Sampling(max_new_tokens=5)))
    params = [p for _, p in fake.llm.submitted]
    assert [p.max_tokens for p in params] == [64, 5]  # never TensorRT-LLM's default 32


async def test_temperature_zero_is_greedy_with_top_k_1(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    await run(engine, req("g", Sampling(max_new_tokens=7, temperature=0.0, top_p=0.9, seed=3)))
    _, p = fake.llm.submitted[0]
    assert p.top_k == 1
    assert p.temperature is None  # temperature=0 is rejected by older C++ runtimes
    assert p.top_p is None


async def test_sampled_request_maps_temperature_top_p_and_seed(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    await run(engine, req("s", Sampling(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=42)))
    _, p = fake.llm.submitted[0]
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (9, 0.7, 0.9, 42)
    assert p.top_k is None  # sampling over the whole vocabulary


async def test_unseeded_sampled_requests_get_their_own_seed(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    for i in range(4):
        await run(engine, req(f"s{i}", Sampling(temperature=1.0, top_p=1.0)))
    seeds = [p.seed for _, p in fake.llm.submitted]
    assert all(isinstance(s, int) for s in seeds)
    assert len(set(seeds)) > 1  # not the C++ default 0 for everyone


async def test_stop_strings_and_end_of_turn_tokens(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    await run(engine, req("st", Sampling(stop=("###", "END"))))
    _, p = fake.llm.submitted[0]
    assert p.stop == ["###", "END"]
    assert p.stop_token_ids == [fake.hf_tokenizer.get_vocab()["<|im_end|>"]]  # EOS excluded
    await run(engine, req("nostop"))
    _, p = fake.llm.submitted[1]
    assert p.stop is None


# -- results ---------------------------------------------------------------------------
@pytest.mark.parametrize("reason", ["stop", "length"])
async def test_finish_reason_and_counts(
    fake: FakeTensorRT, engine: TensorRTLLMEngine, reason: str
) -> None:
    fake.plan = lambda ids, p: Plan(text="hi there", token_ids=[7, 8], finish_reason=reason)
    completion = await run(engine, req("a", prompt_ids=[1, 2, 3, 4]))
    assert completion == Completion(
        text="hi there", finish_reason=reason, prompt_tokens=4, completion_tokens=2
    )


async def test_text_is_cut_at_a_stop_string_trt_missed(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = lambda ids, p: Plan(
        text="one two###three", token_ids=[1, 2, 3], finish_reason="length"
    )
    completion = await run(engine, req("a", Sampling(stop=("###",))))
    assert (completion.text, completion.finish_reason) == ("one two", "stop")


@pytest.mark.parametrize("reason", ["cancelled", "timeout", None])
async def test_other_finish_reasons_are_engine_errors(
    fake: FakeTensorRT, engine: TensorRTLLMEngine, reason: str | None
) -> None:
    fake.plan = lambda ids, p: Plan(finish_reason=reason, text="x", token_ids=[1])
    with pytest.raises(EngineError, match=f"finish_reason={reason!r}"):
        await run(engine, req("a"))
    assert engine.is_healthy


# -- errors ----------------------------------------------------------------------------
async def test_request_error_fails_only_that_request(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = lambda ids, p: Plan(request_error="bad logits") if ids == [9] else Plan()
    with pytest.raises(EngineError, match="bad logits") as info:
        await run(engine, req("bad", prompt_ids=[9]))
    assert not isinstance(info.value, EngineOverloadedError)
    assert engine.is_healthy
    assert (await run(engine, req("good"))).finish_reason in ("stop", "length")


async def test_capacity_request_error_is_retriable_overload(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = lambda ids, p: Plan(request_error="Request queue is full, try later")
    with pytest.raises(EngineOverloadedError) as info:
        await run(engine, req("a"))
    assert info.value.retriable
    assert engine.is_healthy


async def test_refused_at_submit_is_an_invalid_request(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = lambda ids, p: Plan(
        submit_error=ValueError(
            "The sum of prompt length (3000) ... should not exceed max_num_tokens"
        )
    )
    with pytest.raises(InvalidRequestError, match="max_num_tokens"):
        await run(engine, req("long"))
    assert engine.is_healthy


async def test_background_error_kills_the_engine(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = lambda ids, p: Plan(fatal=RuntimeError("CUDA error: illegal memory access"))
    with pytest.raises(EngineError, match="illegal memory access"):
        await run(engine, req("a"))
    assert not engine.is_healthy
    assert isinstance(engine.dead_error, RuntimeError)
    submitted = len(fake.llm.submitted)
    with pytest.raises(EngineError, match="dead"):
        await run(engine, req("b"))
    assert len(fake.llm.submitted) == submitted  # failed fast, TRT not asked


async def test_shut_down_executor_at_submit_kills_the_engine(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.llm._executor_shut_down = True  # what a background failure leaves behind
    with pytest.raises(EngineError, match="shutting down"):
        await run(engine, req("a"))
    assert not engine.is_healthy


async def test_cancelled_request_is_aborted_in_trt(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = lambda ids, p: Plan(hang=True)
    task = asyncio.create_task(engine.generate_one(req("a")))
    await eventually(lambda: bool(fake.llm.outputs))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.llm.outputs[0].aborted
    assert engine.is_healthy


# -- ordering and concurrency ----------------------------------------------------------
def delay_by_first_token(ids: list[int], params: object) -> Plan:
    return Plan(delay=ids[0] / 100.0, text=f"id{ids[0]}", token_ids=[ids[0]])


async def test_generate_returns_outcomes_in_request_order(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = lambda ids, p: (
        Plan(request_error="boom") if ids[0] == 2 else delay_by_first_token(ids, p)
    )
    batch = [req("slow", prompt_ids=[5]), req("bad", prompt_ids=[2]), req("fast", prompt_ids=[1])]
    outcomes = await asyncio.wait_for(engine.generate(batch), WAIT)
    assert isinstance(outcomes[0], Completion) and outcomes[0].text == "id5"
    assert isinstance(outcomes[1], EngineError)
    assert isinstance(outcomes[2], Completion) and outcomes[2].text == "id1"
    assert fake.llm.finished_order.index(3) < fake.llm.finished_order.index(1)  # fast first


async def test_generate_one_results_arrive_as_each_finishes(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = delay_by_first_token
    arrived: list[str] = []

    async def one(rid: str, first: int) -> None:
        completion = await engine.generate_one(req(rid, prompt_ids=[first]))
        arrived.append(completion.text)

    await asyncio.wait_for(asyncio.gather(one("a", 6), one("b", 1), one("c", 3)), WAIT)
    assert arrived == ["id1", "id3", "id6"]
    assert fake.llm.max_active == 3  # all three were in TRT at once


async def test_inflight_dispatcher_bound_is_respected(
    fake: FakeTensorRT, engine: TensorRTLLMEngine
) -> None:
    fake.plan = lambda ids, p: Plan(delay=0.02)
    dispatcher = InflightDispatcher(engine.generate_one, max_inflight=3)
    futures = [await dispatcher.submit(req(f"r{i}")) for i in range(10)]
    outcomes = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
    await dispatcher.stop()
    assert all(o.ok for o in outcomes)
    assert len(fake.llm.submitted) == 10
    assert fake.llm.max_active == 3  # concurrent, and never more than the bound


# -- stats -----------------------------------------------------------------------------
STAT = {
    "iter": 7,
    "iterLatencyMS": 12.5,
    "numActiveRequests": 5,
    "numQueuedRequests": 2,
    "maxNumActiveRequests": 8,
    "numCompletedRequests": 1,
    "gpuMemUsage": 1024,
    "kvCacheStats": {
        "maxNumBlocks": 100,
        "freeNumBlocks": 60,
        "usedNumBlocks": 40,
        "tokensPerBlock": 32,
        "reusedBlocks": 4,
        "missedBlocks": 10,
        "cacheHitRate": 0.25,
    },
    "inflightBatchingStats": {
        "numScheduledRequests": 5,
        "numContextRequests": 1,
        "numGenRequests": 4,
        "numPausedRequests": 0,
        "numCtxTokens": 30,
    },
}


async def test_iteration_stats_are_exported(fake: FakeTensorRT) -> None:
    registry = CollectorRegistry()
    engine = make_engine(registry)
    await engine.start()
    try:
        await asyncio.sleep(0.05)
        assert fake.llm.stats_polls == 0  # no polling before the first request
        await run(engine, req("a"))
        second = json.loads(json.dumps(STAT))
        second["kvCacheStats"].update(reusedBlocks=9, missedBlocks=12, usedNumBlocks=41)
        second["numCompletedRequests"] = 2
        fake.llm.push_stats(STAT)
        fake.llm.push_stats(json.dumps(second))  # a JSON string is read as well
        value = registry.get_sample_value

        await eventually(lambda: value("sluice_trt_kv_cache_used_blocks") == 41)
        assert value("sluice_trt_inflight_requests") == 5
        assert value("sluice_trt_queued_requests") == 2
        assert value("sluice_trt_max_inflight_requests") == 8
        assert value("sluice_trt_gpu_memory_used_bytes") == 1024
        assert value("sluice_trt_kv_cache_free_blocks") == 60
        assert value("sluice_trt_kv_cache_max_blocks") == 100
        assert value("sluice_trt_kv_cache_hit_ratio") == 0.25
        assert value("sluice_trt_kv_cache_reused_blocks_total") == 9  # running total
        assert value("sluice_trt_kv_cache_missed_blocks_total") == 12
        assert value("sluice_trt_completed_requests_total") == 3
        assert value("sluice_trt_context_tokens_total") == 60
        assert value("sluice_trt_scheduled_requests", {"phase": "generation"}) == 4
        assert value("sluice_trt_iteration_latency_seconds_count") == 2
        assert value("sluice_trt_iteration_latency_seconds_sum") == pytest.approx(0.025)
        assert fake.llm.stats_polls_before_first_request == 0
    finally:
        await engine.stop()


async def test_stats_can_be_turned_off(fake: FakeTensorRT) -> None:
    engine = make_engine(iteration_stats=False)
    await engine.start()
    try:
        await run(engine, req("a"))
        await asyncio.sleep(0.05)
        assert fake.llm.stats_polls == 0
        assert "enable_iter_perf_stats" not in fake.llm.kwargs
    finally:
        await engine.stop()


# -- stop ------------------------------------------------------------------------------
async def test_stop_shuts_down_once_off_the_loop(fake: FakeTensorRT) -> None:
    engine = make_engine()
    await engine.start()
    await run(engine, req("a"))  # the stats task is running now
    stats_task = engine._stats_task
    assert stats_task is not None and not stats_task.done()
    await engine.stop()
    await engine.stop()
    assert fake.llm.shutdown_calls == 1
    assert fake.llm.shutdown_on_main_thread is False
    assert stats_task.done()
    with pytest.raises(EngineError, match="not started"):
        await engine.generate_one(req("b"))


async def test_stop_before_start_is_harmless(fake: FakeTensorRT) -> None:
    engine = make_engine()
    await engine.stop()
    assert fake.instances == []
