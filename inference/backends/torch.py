"""Reference backend: any Hugging Face causal LM on torch, CPU or CUDA.

Batched generation with our own decode loop over the model's KV cache, so every request in
a batch keeps its own ``max_new_tokens``, temperature, top-p, seed and stop strings (the
stock ``generate()`` takes one setting for the whole batch). Prompts are left-padded;
position ids follow the attention mask so padding does not shift positions.

torch and transformers are imported only inside this module's methods.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from inference.backends.base import Engine
from inference.errors import EngineError
from inference.prompts import encode_prompt
from inference.types import Completion, GenerationRequest, Sampling

logger = logging.getLogger(__name__)

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")


class TorchEngine(Engine):
    """Runs one batch at a time on a single worker thread (the event loop stays free)."""

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
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.model_version = model_version
        self.max_batch_size = max_batch_size
        self._device_setting = device
        self._threads = threads
        self.quantize = quantize
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self.device = "cpu"
        self.dtype = "float32"
        self._dead: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    async def stop(self) -> None:
        self._executor.shutdown(wait=True)
        self._model = None

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
        if want_cuda and torch.cuda.is_available():
            self.device = "cuda"
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.device, dtype = "cpu", torch.float32
        self.dtype = str(dtype).removeprefix("torch.")
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self._model = model.to(self.device).eval()
        if self.quantize == "int8":
            self._quantize_int8()
        self._eos_ids = self._end_token_ids()
        pad = self._tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._eos_ids, default=0)
        self._warm_up()
        logger.info(
            "loaded %s (%s) on %s/%s; end tokens %s",
            self.model_name,
            self.model_version,
            self.device,
            self.dtype,
            sorted(self._eos_ids),
        )

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

    def _warm_up(self) -> None:
        """One tiny generation, so the first real batch does not pay for lazy init."""
        import torch

        ids = self.encode_prompt("Hi", system=None, raw=False)
        warm = GenerationRequest("warm-up", "Hi", Sampling(max_new_tokens=2), prompt_ids=ids)
        with torch.inference_mode():
            self._decode([warm])

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

    # -- generation --------------------------------------------------------------------
    async def generate(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        if self._model is None:
            raise EngineError("engine not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate, list(batch))

    def _generate(self, batch: list[GenerationRequest]) -> list[Completion | BaseException]:
        import torch

        try:
            with torch.inference_mode():
                return self._decode(batch)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise EngineError(f"CUDA out of memory on a batch of {len(batch)}") from exc

    def _decode(self, batch: list[GenerationRequest]) -> list[Completion | BaseException]:
        import torch

        device = self.device
        size = len(batch)
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((size, width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for row, request in enumerate(batch):
            n = len(request.prompt_ids)
            input_ids[row, width - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        sampler = _Sampler(batch, device)
        rows = [_RowState(r, self._tokenizer) for r in batch]
        out = self._model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        for _ in range(max(r.sampling.max_new_tokens for r in batch)):
            next_tokens = sampler.sample(out.logits[:, -1, :])
            for row, token in zip(rows, next_tokens.tolist(), strict=True):
                row.push(token, self._eos_ids)
            if all(r.finished for r in rows):
                break
            live = torch.tensor([not r.finished for r in rows], device=device)
            feed = torch.where(live, next_tokens, torch.full_like(next_tokens, self._pad_id))
            mask = torch.cat([mask, torch.ones((size, 1), dtype=mask.dtype, device=device)], 1)
            positions = positions[:, -1:] + 1
            out = self._model(
                input_ids=feed[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return [row.completion() for row in rows]


class _Sampler:
    """Greedy rows take the argmax; sampled rows get temperature, top-p and their own seed."""

    def __init__(self, batch: list[GenerationRequest], device: str) -> None:
        import torch

        self._torch = torch
        temps = [r.sampling.temperature for r in batch]
        self._sampled = [i for i, t in enumerate(temps) if t > 0]
        self._temps = torch.tensor([temps[i] for i in self._sampled], device=device)
        self._top_p = torch.tensor([batch[i].sampling.top_p for i in self._sampled], device=device)
        self._generators: list[Any] = []
        for i in self._sampled:
            seed = batch[i].sampling.seed
            gen = None
            if seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed)
            self._generators.append(gen)

    def sample(self, logits: Any) -> Any:
        torch = self._torch
        chosen = logits.argmax(dim=-1)
        if not self._sampled:
            return chosen
        index = torch.tensor(self._sampled, device=logits.device)
        scaled = logits.index_select(0, index).float() / self._temps[:, None]
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before > self._top_p[:, None], 0.0)
        for j, row in enumerate(self._sampled):
            pick = torch.multinomial(sorted_probs[j], 1, generator=self._generators[j])
            chosen[row] = sorted_ids[j, pick[0]]
        return chosen


class _RowState:
    """Tokens produced for one request and whether (and why) it has finished."""

    def __init__(self, request: GenerationRequest, tokenizer: Any) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.finished = False
        self.reason = "length"
        self._tokenizer = tokenizer
        self._stops = request.sampling.stop
        self._stop_window = max((len(s) for s in self._stops), default=0) + 8

    def push(self, token: int, eos_ids: frozenset[int]) -> None:
        if self.finished:
            return
        if token in eos_ids:
            self.finished, self.reason = True, "stop"
            return
        self.tokens.append(token)
        if self._stops and self._hit_stop():
            self.finished, self.reason = True, "stop"
        elif len(self.tokens) >= self.request.sampling.max_new_tokens:
            self.finished, self.reason = True, "length"

    def _hit_stop(self) -> bool:
        tail = self._tokenizer.decode(self.tokens[-self._stop_window :], skip_special_tokens=True)
        return any(s in tail for s in self._stops)

    def completion(self) -> Completion:
        text = self._tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self._stops:
            cut = min((i for s in self._stops if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text, self.reason = text[:cut], "stop"
        return Completion(
            text=text,
            finish_reason=self.reason,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=len(self.tokens),
        )
