"""llama.cpp backend: the GGUF runs natively, many sequences decoded together.

Built on the low-level bindings of ``llama-cpp-python`` 0.3.x (``llama_batch_init``,
``llama_decode``, ``llama_memory_seq_rm``, ``llama_sampler_*``), not on its ``Llama`` class,
which decodes one sequence at a time. One scheduler thread owns the llama.cpp context and
runs continuous (in-flight) batching:

* every request gets a sequence id (a *slot*, at most ``max_batch_size`` at once) and its
  own sampler chain (greedy, or temperature -> top-p -> seeded draw);
* each step builds one ``llama_batch``: first one token for every sequence that is
  decoding, then prompt tokens of newly admitted sequences (chunked prefill) up to
  ``step_tokens``; one ``llama_decode`` runs them all, each sequence is sampled from its own
  logits row;
* a sequence retires as soon as it ends (end-of-turn token, a stop string,
  ``max_new_tokens``, or its context is full), its KV cells are dropped and its completion
  is handed back at once; a queued request takes the slot at the next step.

The KV cache has one stream per slot (``kv_unified=False``): a sequence's attention then
sees only its own cells in its own order, so a greedy output does not depend on its batch
mates (tested). With the unified cache (one buffer, masked per sequence) the same prompts
gave different greedy tokens in a batch than alone. The price: llama.cpp splits a step into
ubatches of consecutive sequence ids with equal token counts, so the lowest free slot is
always taken first and a step that mixes prefill with decoding runs as several ubatches.
Requests that can never run (empty prompt, token ids outside the vocabulary, a prompt that
does not fit the context) fail alone before they reach a batch.

Prompts: the chat template stored in the GGUF (the same template the torch engine gets from
the converted folder) rendered with jinja2 the way transformers renders it, then tokenized
by llama.cpp with special tokens parsed; ``raw`` prompts are tokenized as they are. The
contract tests check these ids equal the torch engine's.

``llama_cpp`` is imported only inside this module's methods; its log output goes to this
module's logger (llama.cpp's own info lines at DEBUG).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.backends.base import Engine
from inference.errors import EngineDeadError, EngineError
from inference.types import Completion, GenerationRequest

logger = logging.getLogger(__name__)

INSTALL_HINT = 'llama-cpp-python is not installed; install it with: pip install "sluice[llamacpp]"'
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")
_STOP_WINDOW_BYTES = 32
_LOG_CALLBACK: Any = None  # the ctypes callback must outlive every llama.cpp call


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` bindings, or an :class:`EngineError` with the install hint."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineError(INSTALL_HINT) from exc
    return llama_cpp


def gguf_version(path: Path) -> str:
    """A version label for a GGUF file: its name and a digest of its bytes."""
    from inference.backends.model_files import file_digest

    return f"{Path(path).stem.lower()}-{file_digest(Path(path))}+llama.cpp"


class LlamaCppEngine(Engine):
    """A GGUF model on llama.cpp, batched in flight on one scheduler thread."""

    inflight_batching = True

    def __init__(
        self,
        gguf_file: Path,
        *,
        model_name: str,
        model_version: str,
        max_batch_size: int = 16,
        context_tokens: int = 2048,
        step_tokens: int = 512,
        threads: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if context_tokens < 16:
            raise ValueError("context_tokens must be >= 16")
        if step_tokens < max_batch_size:
            raise ValueError("step_tokens must be >= max_batch_size (one token per sequence)")
        self.gguf_file = Path(gguf_file)
        self.model_name = model_name
        self.model_version = model_version
        self.max_batch_size = max_batch_size
        self.context_tokens = context_tokens
        self.step_tokens = step_tokens
        # Unset: half the usable cores (llama-cpp-python's own default). ggml's threads spin
        # at their barriers, so on a busy machine more threads than free cores collapses
        # throughput (measured on 2 shared cores: 2 threads ran 10-50x slower than 1).
        self.threads = threads or max(1, len(os.sched_getaffinity(0)) // 2)
        self.device = "cpu"
        self.dtype = "gguf"
        self._runtime: _Runtime | None = None
        self._scheduler: _Scheduler | None = None
        self._dead: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._runtime is not None:
            return
        if not self.gguf_file.is_file():
            raise EngineError(f"GGUF file not found: {self.gguf_file}")
        runtime = await asyncio.to_thread(
            _Runtime.load,
            self.gguf_file,
            slots=self.max_batch_size,
            context_tokens=self.context_tokens,
            step_tokens=self.step_tokens,
            threads=self.threads,
        )
        self.dtype = runtime.weight_type
        self._runtime = runtime
        self._scheduler = _Scheduler(runtime, on_fatal=self._on_fatal)
        self._scheduler.start()
        logger.info(
            "loaded %s (%s) with llama.cpp: %d slots x %d tokens, %d threads, end tokens %s",
            self.gguf_file.name,
            self.model_version,
            self.max_batch_size,
            self.context_tokens,
            self.threads,
            sorted(runtime.end_ids),
        )

    async def stop(self) -> None:
        scheduler, runtime = self._scheduler, self._runtime
        self._scheduler = None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop)
        if runtime is not None:
            runtime.close()
        self._runtime = None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def _on_fatal(self, error: BaseException) -> None:
        self._dead = error

    # -- prompts -----------------------------------------------------------------------
    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The GGUF vocabulary's control tokens (``<|im_start|>``, ``<repo_name>``, ...)."""
        return self._runtime.special_tokens if self._runtime else ()

    def encode_prompt(self, prompt: str, *, system: str | None, raw: bool) -> list[int]:
        runtime = self._runtime
        if runtime is None:
            raise EngineError("engine not started")
        if raw or runtime.chat_template is None:
            return runtime.tokenize(prompt, add_special=True)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return runtime.tokenize(runtime.render_chat(messages), add_special=False)

    def tokenize_text(self, text: str) -> list[int]:
        runtime = self._runtime
        if runtime is None:
            raise EngineError("engine not started")
        return runtime.tokenize(text, add_special=False)

    def decode_tokens(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` as the engine renders completions (special tokens left out)."""
        runtime = self._runtime
        if runtime is None:
            raise EngineError("engine not started")
        return runtime.detokenize(ids)

    # -- generation --------------------------------------------------------------------
    def _submit(self, request: GenerationRequest) -> concurrent.futures.Future[Completion]:
        if self._dead is not None:
            raise EngineDeadError(f"llama.cpp engine is dead: {self._dead}")
        if self._scheduler is None:
            raise EngineError("engine not started")
        return self._scheduler.submit(request)

    async def generate_one(self, request: GenerationRequest) -> Completion:
        return await asyncio.wrap_future(self._submit(request))

    async def generate(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        futures = [asyncio.wrap_future(self._submit(r)) for r in batch]
        return list(await asyncio.gather(*futures, return_exceptions=True))


# ------------------------------------------------------------------------------ runtime


class _Runtime:
    """The llama.cpp handles (model, context, vocabulary) and the calls made on them.

    Only the scheduler thread decodes; tokenizing and rendering are safe from any thread
    (they read the vocabulary only)."""

    def __init__(
        self, lib: Any, model: Any, ctx: Any, *, slots: int, context_tokens: int, step_tokens: int
    ) -> None:
        self.lib = lib
        self.model = model
        self.ctx = ctx
        self.vocab = lib.llama_model_get_vocab(model)
        self.memory = lib.llama_get_memory(ctx)
        self.slots = slots
        self.step_tokens = step_tokens
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        # One stream of at least context_tokens cells per slot (llama.cpp pads to 256).
        self.context_per_slot = min(context_tokens, lib.llama_n_ctx_seq(ctx))
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self.chat_template = self._meta("tokenizer.chat_template")
        self.weight_type = self._weight_type()
        self.special_tokens = self._control_tokens()
        self.end_ids = self._end_ids()
        self._template: Any = None

    @classmethod
    def load(
        cls, gguf: Path, *, slots: int, context_tokens: int, step_tokens: int, threads: int
    ) -> _Runtime:
        lib = import_llama_cpp()
        _route_llama_logs(lib)
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not model:
            raise EngineError(f"llama.cpp could not load {gguf}")
        params = lib.llama_context_default_params()
        params.n_ctx = slots * context_tokens
        params.n_seq_max = slots
        params.n_batch = step_tokens
        params.n_ubatch = step_tokens
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False  # one KV stream per sequence: outputs batch-invariant
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            lib.llama_model_free(model)
            raise EngineError("llama.cpp could not create a context")
        return cls(
            lib, model, ctx, slots=slots, context_tokens=context_tokens, step_tokens=step_tokens
        )

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    # -- metadata ----------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        size = self.lib.llama_model_meta_val_str(self.model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8")

    def _weight_type(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.lib.llama_model_desc(self.model, buf, 256)
        desc = buf.value.decode("utf-8", "replace")  # e.g. "llama ?B Q4_1"
        return desc.rsplit(" ", 1)[-1] if desc else "gguf"

    def _control_tokens(self) -> tuple[str, ...]:
        lib, vocab = self.lib, self.vocab
        found = {
            lib.llama_vocab_get_text(vocab, t).decode("utf-8", "replace")
            for t in range(self.n_vocab)
            if lib.llama_vocab_get_attr(vocab, t) & lib.LLAMA_TOKEN_ATTR_CONTROL
        }
        return tuple(sorted(found))

    def _end_ids(self) -> frozenset[int]:
        """End-of-generation tokens: llama.cpp's own set plus the usual end-of-turn texts
        (the GGUF's metadata names ``<|im_start|>`` as EOS; ChatML ends a turn with
        ``<|im_end|>``)."""
        wanted = {t.encode() for t in _END_OF_TURN_TOKENS}
        ids = set()
        for t in range(self.n_vocab):
            attr = self.lib.llama_vocab_get_attr(self.vocab, t)
            if not attr & self.lib.LLAMA_TOKEN_ATTR_CONTROL:
                continue
            if self.lib.llama_vocab_is_eog(self.vocab, t):
                ids.add(t)
            elif self.lib.llama_vocab_get_text(self.vocab, t) in wanted:
                ids.add(t)
        return frozenset(ids)

    # -- text --------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The GGUF's chat template rendered as transformers renders it."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(self.chat_template or "")
        return self._template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self._token_text(self.lib.llama_vocab_bos(self.vocab)),
            eos_token=self._token_text(self.lib.llama_vocab_eos(self.vocab)),
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = (self.lib.llama_token * room)()
        n = self.lib.llama_tokenize(
            self.vocab, data, len(data), tokens, room, add_special and self.add_bos, True
        )
        if n < 0:  # more tokens than bytes (never for BPE); try once with the exact room
            room = -n
            tokens = (self.lib.llama_token * room)()
            n = self.lib.llama_tokenize(
                self.vocab, data, len(data), tokens, room, add_special and self.add_bos, True
            )
        if n < 0:
            raise EngineError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        """Bytes of one generated token; control tokens render as nothing."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", "replace")

    # -- sampling ----------------------------------------------------------------------
    def new_sampler(self, temperature: float, top_p: float, seed: int | None) -> Any:
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
        if top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(top_p, 1))
        draw_seed = lib.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(draw_seed))
        return chain


def _route_llama_logs(lib: Any) -> None:
    """llama.cpp logs through this module's logger (its info chatter at DEBUG)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml: 1 debug, 2 info, 5 continued

    def forward(level: int, text: bytes, _user: Any) -> None:
        with contextlib.suppress(Exception):
            line = text.decode("utf-8", "replace").rstrip("\n")
            if line:
                logger.log(levels.get(level, logging.DEBUG), "llama.cpp: %s", line)

    _LOG_CALLBACK = lib.llama_log_callback(forward)
    lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


# ---------------------------------------------------------------------------- sequences


@dataclass
class _Sequence:
    """One request in a slot: its prompt still to prefill, what it produced, its sampler."""

    request: GenerationRequest
    future: concurrent.futures.Future[Completion]
    slot: int
    sampler: Any
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    next_token: int | None = None
    finished: bool = False
    reason: str = "length"

    @property
    def position(self) -> int:
        """Position of ``next_token`` (the last sampled token, fed back in)."""
        return self.prefilled + len(self.tokens) - 1

    def push(self, token: int, runtime: _Runtime) -> None:
        """Take a sampled token; decide whether (and why) the sequence ends."""
        sampling = self.request.sampling
        if token in runtime.end_ids:
            self.finished, self.reason = True, "stop"
            return
        self.tokens.append(token)
        self.text += runtime.piece(token)
        if sampling.stop and self._hit_stop():
            self.finished, self.reason = True, "stop"
        elif len(self.tokens) >= sampling.max_new_tokens:
            self.finished, self.reason = True, "length"
        elif len(self.request.prompt_ids) + len(self.tokens) >= runtime.context_per_slot:
            self.finished, self.reason = True, "length"  # the context is full
        else:
            self.next_token = token

    def _hit_stop(self) -> bool:
        window = max(len(s.encode()) for s in self.request.sampling.stop) + _STOP_WINDOW_BYTES
        tail = bytes(self.text[-window:]).decode("utf-8", "ignore")
        return any(s in tail for s in self.request.sampling.stop)

    def completion(self) -> Completion:
        text = bytes(self.text).decode("utf-8", "replace")
        reason = self.reason
        stops = self.request.sampling.stop
        if stops:
            cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        return Completion(
            text=text,
            finish_reason=reason,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=len(self.tokens),
        )


def check_request(request: GenerationRequest, *, n_vocab: int, context: int) -> None:
    """Raise :class:`EngineError` for a request that can never run in this context."""
    ids = request.prompt_ids
    if not ids:
        raise EngineError(f"request {request.request_id}: no prompt tokens")
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise EngineError(
            f"request {request.request_id}: token id {bad} is outside the vocabulary "
            f"(0..{n_vocab - 1})"
        )
    if len(ids) >= context:
        raise EngineError(
            f"request {request.request_id}: a prompt of {len(ids)} tokens does not fit the "
            f"context of {context} tokens per sequence"
        )


# ---------------------------------------------------------------------------- scheduler

_STOP = object()


class _Scheduler:
    """The decode loop on its own thread: admits queued requests into free slots at step
    boundaries, decodes all live sequences in one ``llama_batch`` per step, retires each
    sequence as soon as it ends."""

    def __init__(self, runtime: _Runtime, *, on_fatal: Any) -> None:
        self._rt = runtime
        self._on_fatal = on_fatal
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._free = list(range(runtime.slots))
        self._live: list[_Sequence] = []
        self._pending: list[tuple[GenerationRequest, concurrent.futures.Future[Completion]]] = []
        self._batch: Any = None
        self._thread = threading.Thread(target=self._run, name="llama-cpp-engine", daemon=True)
        self._stopping = False
        self._dead: BaseException | None = None
        self.steps = 0

    def start(self) -> None:
        self._batch = self._rt.lib.llama_batch_init(self._rt.step_tokens, 0, 1)
        self._thread.start()

    def stop(self) -> None:
        """Finish the sequences in flight, fail what is still queued, free the batch."""
        self._inbox.put(_STOP)
        self._thread.join()
        if self._batch is not None:
            self._rt.lib.llama_batch_free(self._batch)
            self._batch = None

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future[Completion]:
        future: concurrent.futures.Future[Completion] = concurrent.futures.Future()
        if self._dead is not None:
            future.set_exception(EngineDeadError(f"llama.cpp engine is dead: {self._dead}"))
            return future
        try:
            check_request(request, n_vocab=self._rt.n_vocab, context=self._rt.context_per_slot)
        except EngineError as exc:
            future.set_exception(exc)
            return future
        self._inbox.put((request, future))
        return future

    # -- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self._live:
                    item = self._inbox.get()  # idle: wait for work
                    if not self._take(item):
                        break
                self._admit()
                if self._live:
                    self._step()
                elif self._stopping:
                    break
        except BaseException as exc:  # the loop itself broke: nothing more can run
            logger.exception("llama.cpp scheduler stopped")
            self._die(EngineDeadError(f"llama.cpp scheduler failed: {exc!r}"))
        finally:
            self._drain_inbox(EngineError("the llama.cpp engine stopped"))

    def _take(self, item: Any) -> bool:
        """Queue one inbox item for admission; False on the stop signal."""
        if item is _STOP:
            self._stopping = True
            return False
        self._pending.append(item)
        return True

    def _admit(self) -> None:
        """Move queued requests into free slots (at a step boundary)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True
                break
            self._pending.append(item)
        while self._pending and self._free:
            request, future = self._pending.pop(0)
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up while it waited
            s = request.sampling
            seq = _Sequence(
                request=request,
                future=future,
                slot=self._free.pop(0),
                sampler=self._rt.new_sampler(s.temperature, s.top_p, s.seed),
            )
            self._live.append(seq)
        if self._stopping:
            failure = EngineError("the llama.cpp engine is stopping")
            for _, future in self._pending:
                if future.set_running_or_notify_cancel():
                    future.set_exception(failure)
            self._pending.clear()

    def _step(self) -> None:
        """One ``llama_decode`` over every live sequence; sample, push, retire."""
        rt, batch = self._rt, self._batch
        n = 0
        outputs: list[tuple[_Sequence, int]] = []

        def add(token: int, pos: int, slot: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot
            batch.logits[n] = int(logits)
            n += 1

        for seq in self._live:  # decoding sequences: one token each
            if seq.next_token is not None:
                add(seq.next_token, seq.position, seq.slot, True)
                outputs.append((seq, n - 1))
        for seq in self._live:  # then prompt chunks while the step has room
            ids = seq.request.prompt_ids
            if seq.prefilled >= len(ids):
                continue
            room = rt.step_tokens - n
            if room <= 0:
                break
            end = min(len(ids), seq.prefilled + room)
            for pos in range(seq.prefilled, end):
                add(ids[pos], pos, seq.slot, pos == len(ids) - 1)
            seq.prefilled = end
            if end == len(ids):
                outputs.append((seq, n - 1))
        batch.n_tokens = n
        rc = rt.lib.llama_decode(rt.ctx, batch)
        self.steps += 1
        if rc != 0:
            self._failed_step(rc)
            return
        for seq, index in outputs:
            seq.next_token = None
            token = rt.lib.llama_sampler_sample(seq.sampler, rt.ctx, index)
            seq.push(int(token), rt)
        for seq in [s for s in self._live if s.finished]:
            self._retire(seq, seq.completion())

    def _failed_step(self, rc: int) -> None:
        message = f"llama_decode returned {rc}"
        if rc < -1:  # fatal: the context may be inconsistent
            self._die(EngineDeadError(message))
            return
        for seq in list(self._live):  # the step is rolled back; its sequences fail
            self._retire(seq, EngineError(f"{message} on a step of {len(self._live)} sequences"))

    def _retire(self, seq: _Sequence, outcome: Completion | BaseException) -> None:
        self._rt.lib.llama_memory_seq_rm(self._rt.memory, seq.slot, -1, -1)
        self._rt.lib.llama_sampler_free(seq.sampler)
        self._live.remove(seq)
        self._free.append(seq.slot)
        self._free.sort()
        if not self._live:  # idle: a fresh cache layout for whatever comes next
            self._rt.lib.llama_memory_clear(self._rt.memory, True)
        if isinstance(outcome, BaseException):
            seq.future.set_exception(outcome)
        else:
            seq.future.set_result(outcome)

    def _die(self, error: BaseException) -> None:
        self._dead = error
        self._on_fatal(error)
        for seq in list(self._live):
            self._retire(seq, error)
        self._stopping = True

    def _drain_inbox(self, error: BaseException) -> None:
        items = list(self._pending)
        self._pending.clear()
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is _STOP:
                continue
            _, future = item
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
