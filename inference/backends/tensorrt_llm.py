"""TensorRT-LLM backend: in-flight batching through the LLM API of TensorRT-LLM 1.x.

Every request goes to the engine on its own (``generate_one``) and TensorRT-LLM re-forms its
batch every iteration; the pipeline bounds how many are in flight. ``tensorrt_llm`` is
imported only inside :meth:`TensorRTLLMEngine.start`, so this module imports anywhere.

API facts this module relies on, read in the NVIDIA/TensorRT-LLM sources (1.x line, commits
named where it matters):

* ``tensorrt_llm/llmapi/llm.py`` (4c05a748): ``tensorrt_llm.LLM`` is the PyTorch-backend
  ``_TorchLLM`` (a prebuilt engine folder needs ``tensorrt_llm._tensorrt_engine.LLM``);
  unknown constructor kwargs raise ``ValueError`` ("got invalid argument"). The constructor
  loads the model and starts the executor (blocking). ``generate_async(inputs,
  sampling_params=..., streaming=False, ...)`` returns a ``RequestOutput`` at once (no
  coroutine); ``inputs`` may be a list of token ids. It raises ``RuntimeError("LLM is
  shutting down")`` once the executor is gone and ``ValueError`` for requests that can never
  run (prompt longer than ``max_num_tokens``). ``get_stats_async(timeout=2)`` is a plain
  method returning an async iterable of per-iteration stats dicts; ``shutdown()``;
  ``tokenizer`` (a ``TransformersTokenizer`` that wraps the HF one in ``.tokenizer``).
* ``tensorrt_llm/executor/result.py`` (005bc848): ``await output.aresult()`` (or ``await
  output``) waits for the final result; ``abort()``; ``outputs[0]`` is a
  ``CompletionOutput`` with ``text``, ``token_ids`` and ``finish_reason`` in
  ``'stop' | 'length' | 'timeout' | 'cancelled'``; stop strings are cut off the output.
  ``IterationResult`` (the stats iterable) ends after ``timeout`` s without stats and stays
  ended until the next request is submitted.
* ``tensorrt_llm/executor/executor.py``: per-request failures are raised from the result as
  ``RequestError`` (``tensorrt_llm.llmapi.RequestError``); any other background error
  shuts the executor down and is raised: the engine is dead from then on. Before the first
  request ``get_stats_async`` prints a warning and yields nothing, so polling starts after
  the first request.
* ``tensorrt_llm/sampling_params.py`` (000a01de, 416251432 newer): ``SamplingParams`` is a
  kw-only dataclass (unknown fields raise ``TypeError``); ``max_tokens`` defaults to 32, so
  it is always set here; the seed field is ``seed`` (``random_seed`` was removed before
  1.0, PR #3732); ``top_k=1`` means greedy in every version (``temperature=0`` only in
  newer ones, older C++ runtimes reject it); unset ``top_p``/``seed`` fall back to C++
  defaults 0, so both are set explicitly when sampling.
* ``tensorrt_llm/llmapi/llm_args.py``: ``KvCacheConfig(free_gpu_memory_fraction=...)``,
  ``max_batch_size``, ``max_num_tokens``; ``TorchLlmArgs.enable_iter_perf_stats`` (default
  False: no stats at all without it) and, in 1.0 only, ``enable_mixed_sampler`` (default
  False: the sampler's fast path takes the argmax for every request, ignoring temperature;
  the field went away in PR #7294). Optional kwargs are passed only where the installed
  args class has the field.
* Stats keys (``tests/unittest/llmapi/test_llm.py``, ``docs/.../trtllm-serve``):
  ``iterLatencyMS``, ``numActiveRequests``, ``numQueuedRequests``,
  ``maxNumActiveRequests``, ``numCompletedRequests``, ``gpuMemUsage``,
  ``kvCacheStats.{maxNumBlocks,freeNumBlocks,usedNumBlocks,tokensPerBlock,reusedBlocks,
  missedBlocks,cacheHitRate}`` (reused/missed are running totals),
  ``inflightBatchingStats.{numScheduledRequests,numContextRequests,numGenRequests,
  numPausedRequests,numCtxTokens}``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference.backends.base import Engine
from inference.errors import EngineError, EngineOverloadedError, InvalidRequestError
from inference.prompts import encode_prompt
from inference.types import Completion, GenerationRequest, Sampling

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install sluice[tensorrt] from NVIDIA's index on a GPU host: "
    "pip install --extra-index-url https://pypi.nvidia.com 'sluice[tensorrt]'"
)

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")
#: Words in a per-request error that mean "busy now", not "this request is bad".
_OVERLOAD_MARKERS = ("queue is full", "queue full", "too many requests", "at capacity")
#: Longest wait for the next stats record in one poll (the loop sleeps between polls).
_STATS_WAIT_S = 0.1


class TensorRTLLMEngine(Engine):
    """One TensorRT-LLM ``LLM`` in this process, fed request by request (in-flight batching)."""

    inflight_batching = True

    def __init__(
        self,
        model: str | Path,
        *,
        model_name: str,
        model_version: str,
        max_batch_size: int = 64,
        max_num_tokens: int = 8192,
        kv_cache_free_gpu_memory_fraction: float = 0.85,
        registry: CollectorRegistry | None = None,
        stats_interval_s: float = 1.0,
        iteration_stats: bool = True,
        llm_kwargs: Mapping[str, Any] | None = None,
        llm_factory: Callable[..., Any] | None = None,
    ) -> None:
        if stats_interval_s <= 0:
            raise ValueError("stats_interval_s must be > 0")
        self.model = str(model)
        self.model_name = model_name
        self.model_version = model_version
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.kv_cache_free_gpu_memory_fraction = kv_cache_free_gpu_memory_fraction
        #: Where the ``sluice_trt_*`` metrics live (a private registry unless one is given).
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = _TrtMetrics(self.registry)
        self._stats_interval_s = stats_interval_s
        self._iteration_stats = iteration_stats
        self._extra_kwargs = dict(llm_kwargs or {})
        self._llm_factory = llm_factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trt-llm")
        self._llm: Any = None
        self._tokenizer: Any = None
        self._sampling_cls: Any = None
        self._request_error: type[BaseException] | None = None
        self._end_of_turn_ids: list[int] = []
        self._stats_task: asyncio.Task[None] | None = None
        self._first_request = asyncio.Event()
        self._dead: BaseException | None = None
        self._stopped = False
        #: The kwargs the ``LLM`` was built with (for logs and tests).
        self.llm_kwargs: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._llm is not None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self._stopped = False
        if self._iteration_stats:
            self._stats_task = asyncio.create_task(self._stats_loop(), name="trt-llm-stats")

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        task, self._stats_task = self._stats_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        llm, self._llm = self._llm, None
        if llm is not None:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, llm.shutdown)
            except Exception:
                logger.exception("TensorRT-LLM shutdown failed")
        self._executor.shutdown(wait=False)

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def _load(self) -> None:
        """Import TensorRT-LLM and build the ``LLM`` (runs on the engine's thread)."""
        trt = _import_tensorrt_llm()
        try:
            llm = self._build(trt)
        except Exception as exc:
            raise EngineError(f"TensorRT-LLM could not load {self.model}: {exc}") from exc
        tokenizer = getattr(llm, "tokenizer", None)
        if tokenizer is None:
            _shutdown_quietly(llm)
            raise EngineError(f"TensorRT-LLM loaded {self.model} without a tokenizer")
        self._tokenizer = _hf_tokenizer(tokenizer)
        self._end_of_turn_ids = _end_of_turn_ids(self._tokenizer)
        self._llm = llm
        logger.info(
            "TensorRT-LLM %s loaded %s (%s); LLM kwargs %s",
            getattr(trt, "__version__", "?"),
            self.model_name,
            self.model_version,
            sorted(self.llm_kwargs),
        )

    def _build(self, trt: Any) -> Any:
        """``LLM(model=..., max_batch_size=..., max_num_tokens=..., kv_cache_config=...)``."""
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        self._sampling_cls = getattr(trt, "SamplingParams", None) or llmapi.SamplingParams
        self._request_error = getattr(llmapi, "RequestError", None)
        llm_cls, args_cls = self._llm_class(trt)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "kv_cache_config": llmapi.KvCacheConfig(
                free_gpu_memory_fraction=self.kv_cache_free_gpu_memory_fraction
            ),
        }
        # Optional kwargs only where the installed args class has the field (the LLM
        # refuses unknown ones): enable_mixed_sampler exists in 1.0 only.
        fields = set(getattr(args_cls, "model_fields", None) or ())
        wanted = {"enable_mixed_sampler": True}
        if self._iteration_stats:
            wanted["enable_iter_perf_stats"] = True
        kwargs.update({k: v for k, v in wanted.items() if k in fields})
        kwargs.update(self._extra_kwargs)
        self.llm_kwargs = kwargs
        return (self._llm_factory or llm_cls)(**kwargs)

    def _llm_class(self, trt: Any) -> tuple[Any, Any]:
        """``LLM`` and its args class: PyTorch backend, or the TensorRT one for an engine dir."""
        if _is_engine_dir(self.model):
            llm_cls = importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
            args_name = "TrtLlmArgs"
        else:
            llm_cls, args_name = trt.LLM, "TorchLlmArgs"
        try:
            args_cls = getattr(importlib.import_module("tensorrt_llm.llmapi.llm_args"), args_name)
        except (ImportError, AttributeError):
            args_cls = None
        return llm_cls, args_cls

    # -- prompts -----------------------------------------------------------------------
    def encode_prompt(self, prompt: str, *, system: str | None, raw: bool) -> list[int]:
        return encode_prompt(self._tokenizer, prompt, system=system, raw=raw)

    # -- generation --------------------------------------------------------------------
    async def generate(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        if self._llm is None:
            raise EngineError("engine not started")
        outcomes = await asyncio.gather(
            *(self.generate_one(r) for r in batch), return_exceptions=True
        )
        return list(outcomes)

    async def generate_one(self, request: GenerationRequest) -> Completion:
        if self._dead is not None:
            raise EngineError(f"TensorRT-LLM executor is dead: {self._dead}")
        llm = self._llm
        if llm is None:
            raise EngineError("engine not started")
        prompt_ids = list(request.prompt_ids) or self.encode_prompt(
            request.prompt, system=request.system, raw=request.raw
        )
        params = self._sampling_params(request.sampling)
        self._first_request.set()
        try:
            output = llm.generate_async(prompt_ids, sampling_params=params)
        except Exception as exc:
            raise self._submit_error(request, exc) from exc
        try:
            result = await _final(output)
        except asyncio.CancelledError:
            _abort_quietly(output)
            raise
        except Exception as exc:
            raise self._result_error(request, exc) from exc
        return self._completion(request, prompt_ids, result)

    def _sampling_params(self, sampling: Sampling) -> Any:
        """Our settings as TensorRT-LLM ``SamplingParams`` (``max_tokens`` always explicit)."""
        kwargs: dict[str, Any] = {"max_tokens": sampling.max_new_tokens}
        if sampling.temperature <= 0:
            kwargs["top_k"] = 1  # greedy in every 1.x version
        else:
            kwargs["temperature"] = sampling.temperature
            kwargs["top_p"] = sampling.top_p
            # Unset, the C++ runtime seeds every request with 0: identical prompts would
            # then sample identically. A fresh seed keeps unseeded requests independent.
            kwargs["seed"] = sampling.seed if sampling.seed is not None else _fresh_seed()
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)
        if self._end_of_turn_ids:
            kwargs["stop_token_ids"] = list(self._end_of_turn_ids)
        try:
            return self._sampling_cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise EngineError(f"TensorRT-LLM rejected sampling settings {kwargs}: {exc}") from exc

    def _completion(
        self, request: GenerationRequest, prompt_ids: list[int], result: Any
    ) -> Completion:
        outputs = getattr(result, "outputs", None)
        if not outputs:
            raise EngineError(f"TensorRT-LLM returned no output for {request.request_id}")
        out = outputs[0]
        reason = getattr(out, "finish_reason", None)
        if reason not in ("stop", "length"):
            raise EngineError(
                f"TensorRT-LLM ended {request.request_id} with finish_reason={reason!r}"
            )
        text = out.text or ""
        # TensorRT-LLM matches stop strings on tokens; a stop string that tokenizes
        # differently inside the text is still cut here, as the torch backend does.
        cut = min((i for s in request.sampling.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Completion(
            text=text,
            finish_reason=reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(out.token_ids or ()),
        )

    # -- errors ------------------------------------------------------------------------
    def _submit_error(self, request: GenerationRequest, exc: Exception) -> Exception:
        """``generate_async`` refused the request."""
        if isinstance(exc, EngineError | InvalidRequestError):
            return exc
        if self._is_request_error(exc):
            return self._request_failure(request, exc)
        if isinstance(exc, ValueError | TypeError):
            return InvalidRequestError(
                f"TensorRT-LLM refused {request.request_id}: {exc}", reason_code="invalid_request"
            )
        return self._die(exc)

    def _result_error(self, request: GenerationRequest, exc: Exception) -> Exception:
        """Waiting for the result raised: a per-request error, or the executor died."""
        if self._is_request_error(exc):
            return self._request_failure(request, exc)
        return self._die(exc)

    def _is_request_error(self, exc: BaseException) -> bool:
        return self._request_error is not None and isinstance(exc, self._request_error)

    def _request_failure(self, request: GenerationRequest, exc: BaseException) -> EngineError:
        message = str(exc)
        if any(m in message.lower() for m in _OVERLOAD_MARKERS):
            return EngineOverloadedError(f"TensorRT-LLM is at capacity: {message}")
        return EngineError(f"TensorRT-LLM failed {request.request_id}: {message}")

    def _die(self, exc: BaseException) -> EngineError:
        """A non-request error: TensorRT-LLM shuts its executor down after these."""
        if self._dead is None:
            self._dead = exc
            logger.error("TensorRT-LLM executor failed; engine is dead: %r", exc)
        return EngineError(f"TensorRT-LLM executor failed: {exc!r}")

    # -- stats -------------------------------------------------------------------------
    async def _stats_loop(self) -> None:
        """Polls ``get_stats_async`` and exports what the iterations report."""
        await self._first_request.wait()
        wait = min(_STATS_WAIT_S, self._stats_interval_s)
        failures = 0
        while True:
            llm = self._llm
            if llm is None:
                return
            try:
                async for stat in llm.get_stats_async(wait):
                    self._metrics.observe(stat)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._metrics.stats_errors.inc()
                level = logging.WARNING if failures == 1 else logging.DEBUG
                logger.log(level, "TensorRT-LLM stats poll failed: %r", exc)
            await asyncio.sleep(self._stats_interval_s)


class _TrtMetrics:
    """``sluice_trt_*``: what TensorRT-LLM's iteration stats report, nothing derived."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.inflight = Gauge(
            "sluice_trt_inflight_requests", "Requests active in the engine.", registry=r
        )
        self.queued = Gauge(
            "sluice_trt_queued_requests", "Requests queued in the engine.", registry=r
        )
        self.max_inflight = Gauge(
            "sluice_trt_max_inflight_requests", "The engine's active-request limit.", registry=r
        )
        self.scheduled = Gauge(
            "sluice_trt_scheduled_requests",
            "Requests scheduled in the last iteration, by phase.",
            ["phase"],
            registry=r,
        )
        self.paused = Gauge(
            "sluice_trt_paused_requests", "Requests paused in the last iteration.", registry=r
        )
        self.gpu_memory = Gauge(
            "sluice_trt_gpu_memory_used_bytes", "GPU memory in use.", registry=r
        )
        self.kv_used = Gauge(
            "sluice_trt_kv_cache_used_blocks", "KV-cache blocks in use.", registry=r
        )
        self.kv_free = Gauge("sluice_trt_kv_cache_free_blocks", "Free KV-cache blocks.", registry=r)
        self.kv_max = Gauge("sluice_trt_kv_cache_max_blocks", "KV-cache blocks in all.", registry=r)
        self.kv_tokens_per_block = Gauge(
            "sluice_trt_kv_cache_tokens_per_block", "Tokens per KV-cache block.", registry=r
        )
        self.kv_hit_ratio = Gauge(
            "sluice_trt_kv_cache_hit_ratio", "KV-cache block reuse hit rate (0..1).", registry=r
        )
        self.kv_reused = Counter(
            "sluice_trt_kv_cache_reused_blocks_total", "KV-cache blocks reused.", registry=r
        )
        self.kv_missed = Counter(
            "sluice_trt_kv_cache_missed_blocks_total", "KV-cache block lookups missed.", registry=r
        )
        self.completed = Counter(
            "sluice_trt_completed_requests_total", "Requests the engine completed.", registry=r
        )
        self.context_tokens = Counter(
            "sluice_trt_context_tokens_total", "Prompt (context) tokens processed.", registry=r
        )
        self.iteration_latency = Histogram(
            "sluice_trt_iteration_latency_seconds",
            "Time of one engine iteration.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.stats_errors = Counter(
            "sluice_trt_stats_errors_total", "Failed polls of the engine's stats.", registry=r
        )
        self._last_reused: float | None = None
        self._last_missed: float | None = None

    def observe(self, stat: Any) -> None:
        if isinstance(stat, str | bytes):
            stat = json.loads(stat)
        if not isinstance(stat, Mapping):
            return
        _set(self.inflight, stat.get("numActiveRequests"))
        _set(self.queued, stat.get("numQueuedRequests"))
        _set(self.max_inflight, stat.get("maxNumActiveRequests"))
        _set(self.gpu_memory, stat.get("gpuMemUsage"))
        _inc(self.completed, stat.get("numCompletedRequests"))
        latency_ms = _number(stat.get("iterLatencyMS"))
        if latency_ms is not None:
            self.iteration_latency.observe(latency_ms / 1000.0)
        ifb = stat.get("inflightBatchingStats")
        if isinstance(ifb, Mapping):
            _set(self.scheduled.labels(phase="context"), ifb.get("numContextRequests"))
            _set(self.scheduled.labels(phase="generation"), ifb.get("numGenRequests"))
            _set(self.paused, ifb.get("numPausedRequests"))
            _inc(self.context_tokens, ifb.get("numCtxTokens"))
        kv = stat.get("kvCacheStats")
        if isinstance(kv, Mapping):
            _set(self.kv_used, kv.get("usedNumBlocks"))
            _set(self.kv_free, kv.get("freeNumBlocks"))
            _set(self.kv_max, kv.get("maxNumBlocks"))
            _set(self.kv_tokens_per_block, kv.get("tokensPerBlock"))
            _set(self.kv_hit_ratio, kv.get("cacheHitRate"))
            self._last_reused = _inc_by_delta(
                self.kv_reused, kv.get("reusedBlocks"), self._last_reused
            )
            self._last_missed = _inc_by_delta(
                self.kv_missed, kv.get("missedBlocks"), self._last_missed
            )


# -- helpers -----------------------------------------------------------------------------
def _import_tensorrt_llm() -> Any:
    try:
        return importlib.import_module("tensorrt_llm")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "tensorrt_llm":
            raise EngineError(f"TensorRT-LLM is not installed; {INSTALL_HINT}") from exc
        raise EngineError(f"TensorRT-LLM could not be imported ({exc}); {INSTALL_HINT}") from exc
    except (ImportError, OSError) as exc:
        raise EngineError(f"TensorRT-LLM could not be imported ({exc}); {INSTALL_HINT}") from exc


def _is_engine_dir(model: str) -> bool:
    """A folder of prebuilt TensorRT engines (``rank0.engine``...) rather than HF weights."""
    path = Path(model)
    return path.is_dir() and any(path.glob("rank*.engine"))


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside TensorRT-LLM's ``TransformersTokenizer`` wrapper."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "encode"):
        return inner
    return tokenizer


def _end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Chat end-of-turn tokens other than EOS (EOS is TensorRT-LLM's ``end_id`` already)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return []
    vocab = get_vocab()
    eos = getattr(tokenizer, "eos_token_id", None)
    return sorted({vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab} - {eos})


def _fresh_seed() -> int:
    return random.getrandbits(31)


async def _final(output: Any) -> Any:
    """Wait for a ``RequestOutput`` to finish (``aresult()``, else ``await`` it)."""
    aresult = getattr(output, "aresult", None)
    if aresult is not None:
        return await aresult()
    return await output


def _abort_quietly(output: Any) -> None:
    try:
        output.abort()
    except Exception:
        logger.debug("abort of a cancelled TensorRT-LLM request failed", exc_info=True)


def _shutdown_quietly(llm: Any) -> None:
    try:
        llm.shutdown()
    except Exception:
        logger.debug("TensorRT-LLM shutdown failed", exc_info=True)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _set(gauge: Any, value: Any) -> None:
    number = _number(value)
    if number is not None:
        gauge.set(number)


def _inc(counter: Counter, value: Any) -> None:
    number = _number(value)
    if number is not None and number > 0:
        counter.inc(number)


def _inc_by_delta(counter: Counter, value: Any, last: float | None) -> float | None:
    """Running totals become counter increments; a smaller total means it restarted."""
    number = _number(value)
    if number is None:
        return last
    if last is not None and number > last:
        counter.inc(number - last)
    elif last is None and number > 0:
        counter.inc(number)
    elif last is not None and number < last:
        counter.inc(number)
    return number
