"""A fake ``tensorrt_llm`` package with the shapes of the real 1.x LLM API.

Shapes copied from NVIDIA/TensorRT-LLM (see ``inference/backends/tensorrt_llm.py`` for the
files read): ``LLM(model, tokenizer=None, ..., **kwargs)`` rejects kwargs its args class
does not have; ``generate_async(inputs, sampling_params=None, ..., streaming=False, ...)``
returns an output object at once that is awaited with ``aresult()`` (or ``await``) and has
``outputs[0].text/token_ids/finish_reason/stop_reason`` and ``abort()``; per-request
failures are raised from the result as ``RequestError``; any other background error shuts
the executor down, after which ``generate_async`` raises ``RuntimeError("LLM is shutting
down")``; ``get_stats_async(timeout)`` returns an async iterable of dicts that ends after
``timeout`` s without stats (and yields nothing before the first request);
``SamplingParams`` and ``KvCacheConfig`` are kw-only and refuse unknown fields.

``install(monkeypatch)`` puts the package into ``sys.modules`` and returns the
:class:`FakeTensorRT` handle tests use to script and inspect the fake.
"""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest


# -- value classes (field names as in tensorrt_llm/sampling_params.py, llm_args.py) -------
@dataclass(slots=True, kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    logprobs: int | None = None
    return_perf_metrics: bool = False
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} (top_p=0 is disallowed in the backend)")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}")


@dataclass(slots=True, kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = None
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    dtype: str = "auto"


class RequestError(RuntimeError):
    """``tensorrt_llm.executor.utils.RequestError``: one request failed."""


_COMMON_ARGS = {
    "model",
    "tokenizer",
    "tokenizer_mode",
    "skip_tokenizer_init",
    "trust_remote_code",
    "tensor_parallel_size",
    "dtype",
    "revision",
    "tokenizer_revision",
    "pipeline_parallel_size",
    "kv_cache_config",
    "enable_chunked_prefill",
    "scheduler_config",
    "max_batch_size",
    "max_input_len",
    "max_seq_len",
    "max_beam_width",
    "max_num_tokens",
    "iter_stats_max_iterations",
    "backend",
}


class TorchLlmArgs:
    """``model_fields`` as the pydantic class has them (1.1+: no ``enable_mixed_sampler``)."""

    model_fields: dict[str, object] = dict.fromkeys(
        _COMMON_ARGS
        | {"enable_iter_perf_stats", "enable_iter_req_stats", "disable_overlap_scheduler"}
    )


class TrtLlmArgs:
    model_fields: dict[str, object] = dict.fromkeys(_COMMON_ARGS | {"build_config"})


# -- tokenizer ---------------------------------------------------------------------------
class FakeHFTokenizer:
    """Word-level tokenizer with a chat template (``<|im_start|>role\\n...<|im_end|>``)."""

    SPECIAL = {"<s>": 1, "</s>": 2, "<|im_end|>": 3, "<|im_start|>": 4}

    def __init__(self, *, chat_template: str | None = "{% chatml %}") -> None:
        self.chat_template = chat_template
        self.eos_token_id = 2
        self.pad_token_id = None
        self._vocab: dict[str, int] = dict(self.SPECIAL)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _id(self, word: str) -> int:
        return self._vocab.setdefault(word, 10 + len(self._vocab))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._id(w) for w in text.replace("\n", " \n ").split(" ") if w]
        return ([1] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        words = {v: k for k, v in self._vocab.items()}
        out = [words.get(i, f"<{i}>") for i in ids]
        if skip_special_tokens:
            out = [w for w in out if w not in self.SPECIAL]
        return " ".join(out)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool
    ) -> list[int] | str:
        text = "".join(f"<|im_start|> {m['role']} {m['content']} <|im_end|> " for m in messages)
        if add_generation_prompt:
            text += "<|im_start|> assistant "
        return self.encode(text.strip(), add_special_tokens=False) if tokenize else text


class TransformersTokenizer:
    """``tensorrt_llm.llmapi.tokenizer.TransformersTokenizer``: the HF one in ``.tokenizer``."""

    def __init__(self, tokenizer: FakeHFTokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(text, *args, **kwargs)

    def decode(self, ids: list[int], *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, *args, **kwargs)


# -- results -----------------------------------------------------------------------------
@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Plan:
    """How the fake answers one request."""

    delay: float = 0.0
    text: str | None = None
    token_ids: list[int] | None = None
    finish_reason: str | None = "auto"  # "auto": "length" when max_tokens reached, else "stop"
    request_error: str | None = None  # raised from the result as RequestError
    fatal: BaseException | None = None  # background error: executor shuts down
    submit_error: BaseException | None = None  # raised by generate_async itself
    hang: bool = False  # never finishes (until aborted)


class RequestOutput:
    """Awaited like ``GenerationResult``: ``await out.aresult()`` or ``await out``."""

    def __init__(self, llm: LLM, request_id: int, prompt_token_ids: list[int]) -> None:
        self._llm = llm
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(0)]
        self._done = asyncio.Event()  # the real one needs a running loop too
        self._error: BaseException | None = None
        self.aborted = False

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _finish(self, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self._error = error
        self._done.set()
        self._llm._on_finished(self)

    async def aresult(self) -> RequestOutput:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.aresult().__await__()

    def abort(self) -> None:
        self.aborted = True
        self.outputs[0].finish_reason = "cancelled"
        self._finish()


class _Stats:
    """``IterationResult``: async iterable of dicts, ends after ``timeout`` s of silence."""

    def __init__(self, queue: asyncio.Queue[Any], timeout: float) -> None:
        self._queue = queue
        self._timeout = timeout

    def __aiter__(self) -> _Stats:
        return self

    async def __anext__(self) -> Any:
        try:
            return await asyncio.wait_for(self._queue.get(), self._timeout)
        except TimeoutError:
            raise StopAsyncIteration from None


class _Empty:
    def __aiter__(self) -> _Empty:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration


class LLM:
    """``tensorrt_llm.LLM`` (1.x: the PyTorch-backend ``_TorchLLM``)."""

    args_cls: type = TorchLlmArgs
    fake: FakeTensorRT  # set by install()

    def __init__(
        self,
        model: str,
        tokenizer: Any = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        for key in kwargs:
            if key not in self.args_cls.model_fields:
                raise ValueError(f"{type(self).__name__} got invalid argument: {key}")
        kv = kwargs.get("kv_cache_config")
        if kv is not None and not isinstance(kv, KvCacheConfig):
            raise TypeError(f"kv_cache_config must be a KvCacheConfig, got {type(kv)}")
        self.model = model
        self.kwargs = {"model": model, **kwargs}
        self.built_on_main_thread = threading.current_thread() is threading.main_thread()
        self.tokenizer = TransformersTokenizer(self.fake.hf_tokenizer)
        self.shutdown_calls = 0
        self.shutdown_on_main_thread: bool | None = None
        self.submitted: list[tuple[list[int], SamplingParams]] = []
        self.outputs: list[RequestOutput] = []
        self.finished_order: list[int] = []
        self.active = 0
        self.max_active = 0
        self.stats_polls = 0
        self.stats_polls_before_first_request = 0
        self._stats: asyncio.Queue[Any] | None = None
        self._executor_shut_down = False
        self.fake.instances.append(self)

    # generation
    def generate_async(
        self,
        inputs: list[int] | str,
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
        scheduling_params: Any = None,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        if self._executor_shut_down:
            raise RuntimeError("LLM is shutting down")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(sampling_params)}")
        if isinstance(inputs, str):
            prompt_ids = self.fake.hf_tokenizer.encode(inputs)
        elif isinstance(inputs, list) and all(isinstance(i, int) for i in inputs):
            prompt_ids = list(inputs)
        else:
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        plan = self.fake.plan(prompt_ids, sampling_params)
        if plan.submit_error is not None:
            raise plan.submit_error
        if self._stats is None:
            self._stats = asyncio.Queue()
        self.submitted.append((prompt_ids, sampling_params))
        output = RequestOutput(self, len(self.submitted), prompt_ids)
        self.outputs.append(output)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        asyncio.get_running_loop().create_task(self._run(output, plan, sampling_params))
        return output

    async def _run(self, output: RequestOutput, plan: Plan, params: SamplingParams) -> None:
        if plan.hang:
            return
        await asyncio.sleep(plan.delay)
        if plan.fatal is not None:
            self._executor_shut_down = True
            output._finish(plan.fatal)
            return
        if plan.request_error is not None:
            output._finish(RequestError(plan.request_error))
            return
        n = min(params.max_tokens, 3)
        token_ids = plan.token_ids if plan.token_ids is not None else [100 + i for i in range(n)]
        out = output.outputs[0]
        out.token_ids = list(token_ids)
        out.text = plan.text if plan.text is not None else " ".join(f"w{t}" for t in token_ids)
        default_reason = "length" if len(token_ids) >= params.max_tokens else "stop"
        out.finish_reason = default_reason if plan.finish_reason == "auto" else plan.finish_reason
        output._finish()

    def _on_finished(self, output: RequestOutput) -> None:
        self.active -= 1
        self.finished_order.append(output.request_id)

    # stats
    def get_stats_async(self, timeout: float | None = 2) -> Any:
        self.stats_polls += 1
        if self._stats is None:
            self.stats_polls_before_first_request += 1
            return _Empty()
        return _Stats(self._stats, 2 if timeout is None else timeout)

    def push_stats(self, stat: Any) -> None:
        assert self._stats is not None, "stats exist only after the first request"
        self._stats.put_nowait(stat)

    def shutdown(self) -> None:
        self.shutdown_calls += 1
        self.shutdown_on_main_thread = threading.current_thread() is threading.main_thread()
        self._executor_shut_down = True


class TrtEngineLLM(LLM):
    """``tensorrt_llm._tensorrt_engine.LLM`` (``_TrtLLM``) for prebuilt engine folders."""

    args_cls = TrtLlmArgs


# -- installation ------------------------------------------------------------------------
class FakeTensorRT:
    """Handle on one installed fake: script answers, read what the engine did."""

    def __init__(self, *, mixed_sampler_field: bool, chat_template: str | None) -> None:
        self.instances: list[LLM] = []
        self.hf_tokenizer = FakeHFTokenizer(chat_template=chat_template)
        self.plan: Callable[[list[int], SamplingParams], Plan] = lambda ids, p: Plan()
        torch_fields = dict(TorchLlmArgs.model_fields)
        if mixed_sampler_field:  # 1.0 had it; 1.1 removed it
            torch_fields["enable_mixed_sampler"] = None
        self.torch_args = type("TorchLlmArgs", (), {"model_fields": torch_fields})
        self.llm_cls = type("LLM", (LLM,), {"fake": self, "args_cls": self.torch_args})
        self.engine_llm_cls = type("LLM", (TrtEngineLLM,), {"fake": self})

    @property
    def llm(self) -> LLM:
        assert self.instances, "no LLM was built"
        return self.instances[-1]

    def modules(self) -> dict[str, types.ModuleType]:
        root = types.ModuleType("tensorrt_llm")
        llmapi = types.ModuleType("tensorrt_llm.llmapi")
        llm_args = types.ModuleType("tensorrt_llm.llmapi.llm_args")
        engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
        root.__version__ = "1.0.0+fake"  # type: ignore[attr-defined]
        root.LLM = self.llm_cls  # type: ignore[attr-defined]
        root.SamplingParams = SamplingParams  # type: ignore[attr-defined]
        root.llmapi = llmapi  # type: ignore[attr-defined]
        llmapi.LLM = self.llm_cls  # type: ignore[attr-defined]
        llmapi.SamplingParams = SamplingParams  # type: ignore[attr-defined]
        llmapi.KvCacheConfig = KvCacheConfig  # type: ignore[attr-defined]
        llmapi.RequestError = RequestError  # type: ignore[attr-defined]
        llmapi.llm_args = llm_args  # type: ignore[attr-defined]
        llm_args.TorchLlmArgs = self.torch_args  # type: ignore[attr-defined]
        llm_args.TrtLlmArgs = TrtLlmArgs  # type: ignore[attr-defined]
        llm_args.KvCacheConfig = KvCacheConfig  # type: ignore[attr-defined]
        engine.LLM = self.engine_llm_cls  # type: ignore[attr-defined]
        return {
            "tensorrt_llm": root,
            "tensorrt_llm.llmapi": llmapi,
            "tensorrt_llm.llmapi.llm_args": llm_args,
            "tensorrt_llm._tensorrt_engine": engine,
        }


def install(
    monkeypatch: pytest.MonkeyPatch,
    *,
    mixed_sampler_field: bool = False,
    chat_template: str | None = "{% chatml %}",
) -> FakeTensorRT:
    """Put a fresh fake ``tensorrt_llm`` into ``sys.modules`` for this test."""
    import sys

    fake = FakeTensorRT(mixed_sampler_field=mixed_sampler_field, chat_template=chat_template)
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake
