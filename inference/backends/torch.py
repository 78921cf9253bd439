"""Reference backend: any Hugging Face causal LM on torch, CPU or CUDA, batching in flight.

Requests are submitted one by one (``generate_one``; ``inflight_batching`` is True). A
dedicated decode thread owns the model and runs the loop the scheduler
(:mod:`inference.backends.torch_scheduler`) decides:

* **Admission** at step boundaries, batched (see the scheduler). The admitted prompts are
  prefilled together *packed* into one row: no padding, a block-diagonal causal mask,
  positions restarting per prompt, and logits computed only at each prompt's last position.
* **KV cache**: :class:`SlotKVCache`, preallocated, one slot per running sequence (row =
  slot, rows kept contiguous by the scheduler). A decode step writes each row's new K/V at
  that row's own position and attends over one slice of the cache with a per-row length
  mask; nothing is concatenated per step. Slots grow by doubling up to ``max_seq_len``.
* **Sampling** on the device, batched: greedy rows take the argmax of the raw logits (exact);
  sampled rows get temperature, top-p and noise from a counter-based hash of (seed, step,
  token), so a row's draws depend on its own seed only, whatever its batch-mates.
* **Retirement** as soon as a sequence ends; its completion goes back to the event loop at
  once with ``loop.call_soon_threadsafe``.

On CUDA (``device == "cuda"``) the decode step runs with static shapes (batch padded to a
power-of-two bucket, the whole cache attended, cache tensors at fixed addresses) and is
compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); bf16 weights. The
static-shape logic also runs on CPU (``static_shapes=True``), which is how it is tested.

torch and transformers are imported only inside this module's methods.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.backends.base import Engine
from inference.backends.torch_scheduler import (
    InflightScheduler,
    RowMove,
    SchedulerLimits,
    SequenceState,
    StopWatcher,
)
from inference.errors import EngineDeadError, EngineError
from inference.prompts import encode_prompt
from inference.types import Completion, GenerationRequest, Sampling

logger = logging.getLogger(__name__)

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_HEADS = ("exact", "rescored")
_KERNELS = ("auto", "fused", "transformers")
_QUANTIZE = ("none", "int8", "int8-weight", "int4-weight")
_WEIGHT_ONLY = {"int8-weight": ("int8", "+int8w"), "int4-weight": ("int4", "+int4w")}
_RESCORE_K = 8
_MASK32 = 0xFFFFFFFF


@dataclass(eq=False)
class _Job:
    """One submitted request: what the decode thread needs, and where its answer goes."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completion]
    temperature: float
    top_p: float
    key: int
    cancelled: bool = False
    seq: SequenceState | None = field(default=None, repr=False)


class TorchEngine(Engine):
    """In-flight batching over a per-slot KV cache, on one dedicated decode thread."""

    inflight_batching = True

    def __init__(
        self,
        model_dir: Path,
        *,
        model_name: str,
        model_version: str,
        device: str = "auto",
        max_batch_size: int = 16,
        threads: int | None = None,
        quantize: str = "none",
        dtype: str = "auto",
        compile: bool = False,
        static_shapes: bool | None = None,
        max_seq_len: int = 1_536,
        max_batch_tokens: int = 16_384,
        max_prefill_tokens: int = 512,
        admit_batch: int = 4,
        admit_wait_steps: int = 4,
        lm_head: str = "exact",
        kernel: str = "auto",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
        if lm_head not in _HEADS:
            raise ValueError(f"lm_head must be one of {_HEADS}, not {lm_head!r}")
        if kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {_KERNELS}, not {kernel!r}")
        if quantize not in _QUANTIZE:
            raise ValueError(f"quantize must be one of {_QUANTIZE}, not {quantize!r}")
        if max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.model_version = model_version
        self.max_batch_size = max_batch_size
        self.quantize = quantize
        self.max_seq_len = max_seq_len
        self.compile = compile
        self.lm_head = lm_head
        self.kernel = kernel
        self.fused: Any = None  # a torch_fused.FusedLlama when the fused forward runs
        self.limits = SchedulerLimits(
            max_slots=max_batch_size,
            max_tokens=max(max_batch_tokens, max_seq_len),
            max_prefill_tokens=max_prefill_tokens,
            admit_batch=admit_batch,
            admit_wait_steps=admit_wait_steps,
        )
        self._device_setting = device
        self._dtype_setting = dtype
        self._static_setting = static_shapes
        self._threads = threads
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._vocab_size = 0
        self.device = "cpu"
        self.dtype = "float32"
        self.static_shapes = False
        self._dead: BaseException | None = None
        self._inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: _DecodeLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        # The model is loaded on the decode thread itself: with torch's OpenMP pool, once
        # a second thread has run parallel torch work (a load in asyncio.to_thread), every
        # step on the decode thread ran ~2x slower on 2 cores (12 vs 25-30 ms at batch 1).
        self._stopping, self._dead = False, None  # an engine can be started again
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="torch-decode", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:  # the load failed, or start() was cancelled
            self._stopping = True
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        warm = GenerationRequest(
            "warm-up",
            "Hi",
            Sampling(max_new_tokens=2),
            prompt_ids=self.encode_prompt("Hi", system=None, raw=False),
        )
        await self.generate_one(warm)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._fail_inbox(EngineError("the engine stopped"))
        self._model = None

    def _thread_main(self, ready: asyncio.Future[None]) -> None:
        """The decode thread: load, build the loop, say so, run it until stopped."""
        loop = ready.get_loop()
        try:
            self._load()
            self._loop = _DecodeLoop(self)
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, ready, exc)
            return
        loop.call_soon_threadsafe(_settle, ready, None)
        self._loop.run()

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._threads:
            torch.set_num_threads(self._threads)
        want_cuda = self._device_setting in ("auto", "cuda")
        if self._device_setting == "cuda" and not torch.cuda.is_available():
            raise EngineError("device=cuda was asked for but torch sees no CUDA device")
        self.device = "cuda" if want_cuda and torch.cuda.is_available() else "cpu"
        dtype = _pick_dtype(torch, self._dtype_setting, self.device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.static_shapes = (
            self.device == "cuda" if self._static_setting is None else self._static_setting
        )
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=dtype, attn_implementation="sdpa"
        )
        _check_full_attention(model.config)
        self._model = model.to(self.device).eval()
        self._vocab_size = int(model.config.vocab_size)
        if self.quantize == "int8":
            self._quantize_int8()
        elif self._use_fused(model.config):
            self._build_fused(torch)
        elif self.quantize in _WEIGHT_ONLY:
            raise EngineError(
                f"quantize={self.quantize} needs the fused forward (kernel auto or fused)"
            )
        elif self.lm_head == "rescored":
            self._rescore_head(torch)
        self._eos_ids = self._end_token_ids()
        pad = self._tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._eos_ids, default=0)
        logger.info(
            "loaded %s (%s) on %s/%s; forward %s; end tokens %s; static shapes %s; compile %s",
            self.model_name,
            self.model_version,
            self.device,
            self.dtype,
            "fused" if self.fused is not None else "transformers",
            sorted(self._eos_ids),
            self.static_shapes,
            self.compile or self.device == "cuda",
        )

    def _use_fused(self, config: Any) -> bool:
        from inference.backends.torch_fused import unsupported_reason

        if self.kernel == "transformers":
            return False
        reason = unsupported_reason(config)
        if reason is None and str(self._model.dtype) == "torch.float16":
            reason = "float16 weights (the fused forward runs float32, bfloat16 or int8)"
        if reason is None:
            return True
        if self.kernel == "fused":
            raise EngineError(f"kernel=fused: {reason}")
        logger.info("the fused forward does not cover this model (%s); using transformers", reason)
        return False

    def _build_fused(self, torch: Any) -> None:
        """The hand-written forward (``torch_fused.py``) in the configured weight format;
        the transformers decoder layers are dropped (their weights live on in the fused
        copy), the embeddings stay (fp32 rows, and the exact head for rescoring)."""
        from inference.backends.torch_fused import FusedLlama

        exact_fp32 = self._model.dtype == torch.float32
        if self.quantize in _WEIGHT_ONLY:
            if self.device != "cpu":
                raise EngineError(f"quantize={self.quantize} runs on CPU only")
            weights, suffix = _WEIGHT_ONLY[self.quantize]
            self.dtype = self.quantize
            self.model_version = f"{self.model_version}{suffix}"
        else:
            weights = "float32" if exact_fp32 else "bfloat16"
        rescore = self.lm_head == "rescored" and exact_fp32
        if self.lm_head == "rescored" and not rescore:
            logger.info("lm_head=rescored needs fp32 weights to rescore from; kept the exact head")
            self.lm_head = "exact"
        self.fused = FusedLlama(
            self._model,
            weights=weights,
            rescore_k=_RESCORE_K if rescore else 0,
            max_positions=self.max_seq_len,
            device=self.device,
        )
        del self._model.model.layers[:]

    def _rescore_head(self, torch: Any) -> None:
        """bf16 output projection with the top-k logits recomputed in fp32
        (``torch_head.py``); only where it helps: fp32 weights on CPU."""
        from inference.backends.torch_head import rescored_head

        if self.device != "cpu" or self._model.dtype != torch.float32:
            logger.info("lm_head=rescored applies to fp32 on CPU only; kept the exact head")
            self.lm_head = "exact"
            return
        self._model.lm_head = rescored_head(self._model.lm_head)

    def _quantize_int8(self) -> None:
        """Dynamic int8 quantization of every Linear layer (weights int8, activations
        quantized on the fly). CPU only; the version says so on every result."""
        import torch

        if self.device != "cpu":
            raise EngineError("int8 dynamic quantization runs on CPU only")
        self._model = torch.ao.quantization.quantize_dynamic(
            self._model, {torch.nn.Linear}, dtype=torch.qint8
        )
        self.dtype = "int8-dynamic"
        self.model_version = f"{self.model_version}+int8"

    def _end_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        configured = getattr(self._model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        vocab = self._tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab)
        if self._tokenizer.eos_token_id is not None and not ids:
            ids.add(self._tokenizer.eos_token_id)
        return frozenset(ids)

    # -- prompts -----------------------------------------------------------------------
    @property
    def special_tokens(self) -> tuple[str, ...]:
        """``all_special_tokens`` plus the added tokens marked special (SmolLM2's
        ``<repo_name>``, ``<filename>``, ... are only there)."""
        tokenizer = self._tokenizer
        if tokenizer is None:
            return ()
        found = set(getattr(tokenizer, "all_special_tokens", None) or ())
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        found.update(t.content for t in added.values() if getattr(t, "special", False))
        return tuple(sorted(found))

    def encode_prompt(self, prompt: str, *, system: str | None, raw: bool) -> list[int]:
        return encode_prompt(self._tokenizer, prompt, system=system, raw=raw)

    def tokenize_text(self, text: str) -> list[int]:
        if self._tokenizer is None:
            raise EngineError("engine not started")
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- generation --------------------------------------------------------------------
    async def generate(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        """Every request submitted at once; they batch in flight. One outcome each."""
        self._check_usable()
        return list(
            await asyncio.gather(*(self.generate_one(r) for r in batch), return_exceptions=True)
        )

    async def generate_one(self, request: GenerationRequest) -> Completion:
        self._check_usable()
        temperature, top_p = self._check_request(request)
        loop = asyncio.get_running_loop()
        seed = request.sampling.seed
        job = _Job(
            request=request,
            loop=loop,
            future=loop.create_future(),
            temperature=temperature,
            top_p=top_p,
            key=_fold_seed(seed if seed is not None else random.getrandbits(64)),
        )
        self._inbox.put(job)
        self._wake.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the decode thread drops it at the next step
            self._wake.set()
            raise

    def _check_usable(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the torch engine is dead: {self._dead}") from self._dead
        if self._model is None or self._loop is None or self._stopping:
            raise EngineError("engine not started")

    def _check_request(self, request: GenerationRequest) -> tuple[float, float]:
        """What can fail one request alone, before it reaches the device."""
        ids = request.prompt_ids
        if not ids:
            raise EngineError(f"{request.request_id}: no prompt token ids")
        if min(ids) < 0 or max(ids) >= self._vocab_size:
            raise EngineError(f"{request.request_id}: a prompt token id is outside the vocabulary")
        sampling = request.sampling
        if sampling.max_new_tokens < 1:
            raise EngineError(f"{request.request_id}: max_new_tokens must be >= 1")
        if len(ids) + sampling.max_new_tokens > self.max_seq_len:
            raise EngineError(
                f"{request.request_id}: prompt ({len(ids)}) + max_new_tokens "
                f"({sampling.max_new_tokens}) exceeds max_seq_len {self.max_seq_len}"
            )
        temperature, top_p = float(sampling.temperature), float(sampling.top_p)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise EngineError(f"{request.request_id}: temperature {temperature} is not >= 0")
        if not (math.isfinite(top_p) and top_p > 0):
            raise EngineError(f"{request.request_id}: top_p {top_p} is not > 0")
        return temperature, min(top_p, 1.0)

    def _fail_inbox(self, error: BaseException) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            _hand_back(job, error=error)


class _DecodeLoop:
    """The decode thread: admissions, packed prefill, decode steps, retirements."""

    def __init__(self, engine: TorchEngine) -> None:
        import torch

        self.torch = torch
        self.engine = engine
        self.model = engine._model
        self.tokenizer = engine._tokenizer
        self.scheduler = InflightScheduler(engine.limits)
        self.device = engine.device
        cfg = self.model.config
        heads = int(cfg.num_attention_heads)
        capacity = engine.max_seq_len if engine.static_shapes else min(256, engine.max_seq_len)
        self.cache = _slot_cache_class()(
            layers=int(cfg.num_hidden_layers),
            slots=engine.max_batch_size,
            capacity=capacity,
            max_capacity=engine.max_seq_len,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
            dtype=engine.fused.cache_dtype if engine.fused else _cache_dtype(torch, self.model),
            device=self.device,
            static=engine.static_shapes,
        )
        self.step = self._build_step()

    # -- the thread ----------------------------------------------------------------------
    def run(self) -> None:
        torch = self.torch
        engine = self.engine
        error: BaseException = EngineError("the engine stopped")
        try:
            with torch.inference_mode():
                while not engine._stopping:
                    self._take_inbox()
                    if self.scheduler.idle:
                        engine._wake.wait(timeout=0.5)
                        engine._wake.clear()
                        continue
                    self._drop_cancelled()
                    self._iteration()
        except BaseException as exc:  # the loop never dies silently: the engine is dead
            logger.exception("the torch decode loop died")
            engine._dead = exc
            error = EngineDeadError(f"the torch engine is dead: {exc}")
        for seq in self.scheduler.clear():
            _hand_back(seq.handle, error=error)
        engine._fail_inbox(error)

    def _take_inbox(self) -> None:
        while True:
            try:
                job = self.engine._inbox.get_nowait()
            except queue.Empty:
                return
            if job.cancelled:
                continue
            request = job.request
            watcher = None
            if request.sampling.stop:
                watcher = StopWatcher(request.sampling.stop, self._decode_text)
            seq = SequenceState(
                handle=job,
                prompt_len=len(request.prompt_ids),
                max_new_tokens=request.sampling.max_new_tokens,
                end_ids=self.engine._eos_ids,
                watcher=watcher,
            )
            job.seq = seq
            try:
                self.scheduler.add(seq)
            except ValueError as exc:
                _hand_back(job, error=EngineError(f"{request.request_id}: {exc}"))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.scheduler.waiting if s.handle.cancelled]:
            self.scheduler.drop_waiting(seq)
        for seq in [s for s in self.scheduler.running if s.handle.cancelled]:
            self._retire(seq)

    def _iteration(self) -> None:
        admitted = self.scheduler.admit()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:
                self._fail(admitted, exc, "prefill")
        if self.scheduler.running:
            try:
                self._decode_step()
            except Exception as exc:
                self._fail(list(self.scheduler.running), exc, "decode step")
        self.scheduler.step_done()

    def _fail(self, seqs: list[SequenceState], exc: Exception, where: str) -> None:
        """A step failed: its sequences fail (alone); a sticky device error kills the engine."""
        torch = self.torch
        if _is_fatal_device_error(torch, exc):
            raise exc
        logger.warning("%s failed for %d sequence(s): %r", where, len(seqs), exc)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        error = EngineError(f"{where} failed: {exc}")
        for seq in sorted(seqs, key=lambda s: -s.row):
            if seq.row >= 0:
                self._retire(seq)
            _hand_back(seq.handle, error=error)

    # -- model steps ---------------------------------------------------------------------
    def _prefill(self, seqs: list[SequenceState]) -> None:
        torch, device = self.torch, self.device
        self.cache.ensure_capacity(max(s.cost for s in self.scheduler.running))
        ids: list[int] = []
        rows: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        for seq in seqs:
            prompt = seq.handle.request.prompt_ids
            ids.extend(prompt)
            rows.extend([seq.row] * len(prompt))
            positions.extend(range(len(prompt)))
            last.append(len(ids) - 1)
        pos = torch.tensor(positions, device=device)
        seg = torch.tensor(rows, device=device)
        fused = self.engine.fused
        if fused is not None:
            spans = [(end + 1 - s.prompt_len, end + 1) for s, end in zip(seqs, last, strict=True)]
            ids_t = torch.tensor(ids, device=device)
            keys, values = self.cache.keys, self.cache.values
            self._push(seqs, fused.prefill(ids_t, pos, seg, spans, keys, values))
            return
        mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
        self.cache.prepare_prefill(seg, pos)
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=pos[None],
            attention_mask=mask[None, None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=torch.tensor(last, device=device),
        )
        self._push(seqs, out.logits[0])

    def _decode_step(self) -> None:
        torch, device = self.torch, self.device
        seqs = list(self.scheduler.running)
        n = len(seqs)
        tokens = [s.generated[-1] for s in seqs]
        positions = [s.length - 1 for s in seqs]
        if self.cache.static:
            width = bucket_size(n, self.engine.max_batch_size)
            tokens += [self.engine._pad_id] * (width - n)
            positions += [0] * (width - n)  # padding rows write position 0 of a free slot
            kv_len = self.cache.capacity
        else:
            width, kv_len = n, max(positions) + 1
        ids = torch.tensor(tokens, device=device)[:, None]
        pos = torch.tensor(positions, device=device)[:, None]
        mask = (torch.arange(kv_len, device=device)[None, :] <= pos)[:, None, None, :]
        logits = self.step(ids, pos, mask, self.cache.rows(width))
        self._push(seqs, logits[:n])

    def _forward_decode(self, ids: Any, pos: Any, mask: Any, rows: Any) -> Any:
        fused = self.engine.fused
        if fused is not None:
            keys, values = self.cache.keys, self.cache.values
            return fused.decode(ids[:, 0], pos[:, 0], rows, mask, keys, values)
        self.cache.prepare_decode(rows, pos[:, 0], mask.shape[-1])
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _build_step(self) -> Any:
        torch = self.torch
        if self.device == "cuda" and self.cache.static:
            compiled = torch.compile(self._forward_decode, mode="reduce-overhead", dynamic=False)

            def cuda_step(ids: Any, pos: Any, mask: Any, rows: Any) -> Any:
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(ids, pos, mask, rows).clone()

            return cuda_step
        if self.engine.compile:
            if self.engine.fused is not None and self.engine.fused.batch_invariant:
                # row-by-row attention is not traced (a compiled step would recompile for
                # every new set of lengths): compiled, the fused step attends batched
                logger.info("compile: batched attention; greedy output may vary with batch")
                self.engine.fused.batch_invariant = False
            return torch.compile(self._forward_decode, dynamic=not self.cache.static)
        return self._forward_decode

    # -- tokens out ----------------------------------------------------------------------
    def _push(self, seqs: list[SequenceState], logits: Any) -> None:
        jobs = [s.handle for s in seqs]
        chosen = sample_next(
            self.torch,
            logits,
            temperature=[j.temperature for j in jobs],
            top_p=[j.top_p for j in jobs],
            keys=[j.key for j in jobs],
            steps=[len(s.generated) for s in seqs],
        )
        for seq, token in zip(seqs, chosen, strict=True):
            if seq.push(token):
                self._finish(seq)

    def _finish(self, seq: SequenceState) -> None:
        self._retire(seq)
        job: _Job = seq.handle
        text = self._decode_text(seq.generated)
        reason = seq.finish_reason
        stops = job.request.sampling.stop
        if stops:
            cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        completion = Completion(
            text=text,
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.generated),
        )
        _hand_back(job, completion=completion)

    def _retire(self, seq: SequenceState) -> None:
        move = self.scheduler.retire(seq)
        if move is not None:
            self.cache.move(move)

    def _decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _hand_back(
    job: _Job, *, completion: Completion | None = None, error: BaseException | None = None
) -> None:
    """Resolve a job's future on its event loop (from any thread)."""

    def resolve() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(completion)  # type: ignore[arg-type]

    try:
        job.loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # that event loop is closed: nobody is waiting any more
        pass


# -- the KV cache ------------------------------------------------------------------------


_SLOT_CACHE: type | None = None


def _slot_cache_class() -> type:
    """:class:`SlotKVCache` as a transformers ``Cache`` (built on first use, so importing
    this module imports neither torch nor transformers)."""
    global _SLOT_CACHE
    if _SLOT_CACHE is None:
        from transformers.cache_utils import Cache

        _SLOT_CACHE = type("SlotKVCache", (SlotKVCache, Cache), {})
    return _SLOT_CACHE


class SlotKVCache:
    """Preallocated K/V per layer, shaped ``(slots, kv_heads, capacity, head_dim)``.

    Used as a transformers ``Cache`` (through :func:`_slot_cache_class`): the model calls
    :meth:`update` from every attention layer. Before each forward the engine says where
    the new K/V go: :meth:`prepare_prefill` (packed prompts: one slot and position per
    token; attention runs over the new K/V only, with the engine's block-diagonal mask) or
    :meth:`prepare_decode` (one token per row at that row's position; attention runs over
    ``[:rows, :, :kv_len]`` with a per-row length mask).
    """

    def __init__(
        self,
        *,
        layers: int,
        slots: int,
        capacity: int,
        max_capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: Any,
        device: str,
        static: bool = False,
    ) -> None:
        import torch

        super().__init__(layers=[])  # type: ignore[call-arg]
        self._torch = torch
        self.slots, self.capacity, self.max_capacity = slots, capacity, max_capacity
        self.static = static
        self._shape = (slots, kv_heads, capacity, head_dim)
        self._dtype, self._device = dtype, device
        self.keys = [torch.zeros(self._shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(self._shape, dtype=dtype, device=device) for _ in range(layers)]
        if static and device == "cuda":
            for t in (*self.keys, *self.values):
                torch._dynamo.mark_static_address(t)
        self._rows = {n: torch.arange(n, device=device) for n in range(1, slots + 1)}
        self._mode = "decode"
        self._tok_rows: Any = None
        self._tok_pos: Any = None
        self._row_index: Any = None
        self._row_pos: Any = None
        self._kv_len = 0

    def rows(self, n: int) -> Any:
        return self._rows[n]

    def ensure_capacity(self, need: int) -> None:
        """Grow every slot to hold ``need`` positions (doubling, at most ``max_capacity``)."""
        if need <= self.capacity:
            return
        if self.static or need > self.max_capacity:
            raise ValueError(f"{need} positions exceed the cache capacity {self.capacity}")
        torch = self._torch
        new = min(self.max_capacity, max(need, 2 * self.capacity))
        shape = (self._shape[0], self._shape[1], new, self._shape[3])
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = torch.zeros(shape, dtype=self._dtype, device=self._device)
                grown[:, :, : self.capacity] = old
                store[i] = grown
        self.capacity, self._shape = new, shape

    def move(self, move: RowMove) -> None:
        """Copy slot ``src`` into slot ``dst`` (the scheduler compacted its rows)."""
        length = min(move.length, self.capacity)
        for store in (self.keys, self.values):
            for t in store:
                t[move.dst, :, :length] = t[move.src, :, :length]

    def prepare_prefill(self, token_rows: Any, token_positions: Any) -> None:
        self._mode, self._tok_rows, self._tok_pos = "prefill", token_rows, token_positions

    def prepare_decode(self, rows: Any, positions: Any, kv_len: int) -> None:
        self._mode, self._row_index, self._row_pos, self._kv_len = "decode", rows, positions, kv_len

    def update(
        self, key_states: Any, value_states: Any, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[Any, Any]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._mode == "prefill":
            rows, pos = self._tok_rows, self._tok_pos
            k[rows, :, pos] = key_states[0].transpose(0, 1)
            v[rows, :, pos] = value_states[0].transpose(0, 1)
            return key_states, value_states
        rows, pos = self._row_index, self._row_pos
        k[rows, :, pos] = key_states[:, :, 0]
        v[rows, :, pos] = value_states[:, :, 0]
        n = key_states.shape[0]
        return k[:n, :, : self._kv_len], v[:n, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len


# -- sampling ----------------------------------------------------------------------------


def sample_next(
    torch: Any,
    logits: Any,
    *,
    temperature: Sequence[float],
    top_p: Sequence[float],
    keys: Sequence[int],
    steps: Sequence[int],
) -> list[int]:
    """The next id of every row. Greedy rows (temperature 0): argmax of the raw logits.
    Sampled rows, batched: logits shifted by their max and divided by the temperature
    (so any positive temperature, however small, gives finite probabilities), the top-p
    nucleus (always at least the most likely id), then an exponential race with noise from
    :func:`hash_uniform` of (key, step, id)."""
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, t in enumerate(temperature) if t > 0]
    if not sampled:
        return chosen.tolist()
    device = logits.device
    index = torch.tensor(sampled, device=device)
    temps = torch.tensor([temperature[i] for i in sampled], device=device, dtype=torch.float32)
    x = logits.index_select(0, index).float()
    x = (x - x.max(dim=-1, keepdim=True).values) / temps[:, None]
    probs = torch.softmax(x, dim=-1)
    ps = [top_p[i] for i in sampled]
    if any(p < 1.0 for p in ps):
        nucleus = torch.tensor(ps, device=device, dtype=torch.float32)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before > nucleus[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    u = hash_uniform(
        torch,
        torch.tensor([keys[i] for i in sampled], device=device, dtype=torch.int64),
        torch.tensor([steps[i] for i in sampled], device=device, dtype=torch.int64),
        probs.shape[-1],
    )
    picks = (probs / -torch.log(u)).argmax(dim=-1)
    chosen = chosen.index_copy(0, index, picks)
    return chosen.tolist()


def _mix32(torch: Any, x: Any) -> Any:
    """A 32-bit integer hash in int64 arithmetic (constant < 2**31, so no overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def hash_uniform(torch: Any, keys: Any, steps: Any, vocab: int) -> Any:
    """Uniform noise in (0, 1), shape ``(rows, vocab)``, a pure function of each row's
    (key, step) and the id: batch-mates never change a row's draws, and no generator
    state is carried between steps."""
    base = _mix32(torch, (keys ^ _mix32(torch, (steps * 0x2545F49 + 0x3C6EF372) & _MASK32)))
    ids = torch.arange(vocab, device=keys.device, dtype=torch.int64) * 0x27D4EB2F
    bits = _mix32(torch, (base[:, None] + ids[None, :]) & _MASK32)
    return ((bits >> 8).float() + 0.5) / 16_777_216.0


def _fold_seed(seed: int) -> int:
    """Any integer seed as a 32-bit key."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & _MASK32


# -- small helpers -----------------------------------------------------------------------


def bucket_size(n: int, max_slots: int) -> int:
    """Batch width of a static-shape decode step: the next power of two, at most
    ``max_slots`` (each width is one compiled graph)."""
    if n < 1 or n > max_slots:
        raise ValueError(f"{n} rows do not fit {max_slots} slots")
    width = 1
    while width < n:
        width *= 2
    return min(width, max_slots)


def _pick_dtype(torch: Any, setting: str, device: str) -> Any:
    if setting == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, setting)


def _cache_dtype(torch: Any, model: Any) -> Any:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _check_full_attention(config: Any) -> None:
    """The per-slot cache and masks assume every layer attends to the whole prefix."""
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        raise EngineError(
            f"the torch engine supports full-attention models only (layer types {set(layer_types)})"
        )


def _is_fatal_device_error(torch: Any, exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory leaves the context unusable."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(exc, accelerator):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)
