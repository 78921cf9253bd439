"""Builds the engine the settings ask for, and the engine of a registered model version.

Each backend reads its model from its own setting: torch from ``model_path``, llama.cpp
from ``llama_model`` (the folder's one ``.gguf`` file), TensorRT-LLM from ``trt_model``,
the benchmark engine from none (it only carries a version label).
:func:`settings_for_version` is the one place that knows this, so a rollout LOAD gives
every backend the version's folder where that backend looks for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from inference.backends.base import Engine
from streams.settings import Settings


def build_engine(settings: Settings, registry: Any = None) -> Engine:
    """The configured backend, not yet started (call ``await engine.start()``).

    ``registry`` (a prometheus ``CollectorRegistry``) receives engine-level metrics where
    the backend has them (TensorRT-LLM iteration stats)."""
    if settings.backend == "torch":
        from inference.backends.model_files import model_version, resolve_model_dir
        from inference.backends.torch import TorchEngine

        folder = resolve_model_dir(settings.model_path, settings.model_cache_dir)
        return TorchEngine(
            folder,
            model_name=settings.model_name,
            model_version=settings.model_version or model_version(folder),
            device=settings.device,
            max_batch_size=settings.batch_max_size,
            threads=settings.torch_threads,
            quantize=settings.torch_quantize,
            dtype=settings.torch_dtype,
            compile=settings.torch_compile,
            lm_head=settings.torch_lm_head,
            kernel=settings.torch_kernel,
            max_seq_len=settings.torch_max_seq_len,
            max_batch_tokens=settings.batch_max_tokens,
            max_prefill_tokens=settings.torch_max_prefill_tokens,
            admit_batch=settings.torch_admit_batch,
            admit_wait_steps=settings.torch_admit_wait_steps,
        )
    if settings.backend == "llama_cpp":
        from inference.backends.llama_cpp import LlamaCppEngine, gguf_version
        from inference.backends.model_files import find_smollm2_gguf

        gguf = settings.llama_model or find_smollm2_gguf()
        return LlamaCppEngine(
            gguf,
            model_name=settings.model_name,
            model_version=settings.model_version or gguf_version(gguf),
            max_batch_size=settings.batch_max_size,
            context_tokens=settings.max_prompt_tokens + settings.max_new_tokens_limit,
            step_tokens=max(settings.llama_step_tokens, settings.batch_max_size),
            threads=settings.llama_threads,
        )
    if settings.backend == "benchmark":
        from inference.backends.benchmark import BenchmarkEngine

        engine = BenchmarkEngine(
            model_name=settings.model_name,
            completion_tokens=settings.benchmark_completion_tokens,
            max_batch_size=settings.batch_max_size,
            delay_s=settings.benchmark_delay_ms / 1000.0,
            dead_after=settings.benchmark_dead_after,
            overloaded_s=settings.benchmark_overloaded_s,
            broken=settings.benchmark_broken_answer
            if settings.model_version
            and settings.model_version in settings.benchmark_broken_versions.split(",")
            else None,
        )
        if settings.model_version:
            engine.model_version = settings.model_version  # the label results carry
        return engine
    if settings.backend == "tensorrt_llm":
        from inference.backends.tensorrt_llm import TensorRTLLMEngine

        if not settings.trt_model:
            raise ValueError("SLUICE_TRT_MODEL must name the model for the tensorrt_llm backend")
        return TensorRTLLMEngine(
            settings.trt_model,
            model_name=settings.model_name,
            model_version=settings.model_version or settings.trt_model,
            max_batch_size=settings.trt_max_batch_size,
            max_num_tokens=settings.trt_max_num_tokens,
            kv_cache_free_gpu_memory_fraction=settings.trt_kv_cache_free_gpu_memory_fraction,
            registry=registry,
        )
    raise ValueError(f"unknown backend {settings.backend!r}")


def settings_for_version(settings: Settings, version: str, folder: Path) -> Settings:
    """``settings`` with the model source of ``settings.backend`` pointed at ``folder``
    and the version label set to ``version``."""
    if settings.backend == "torch":
        update: dict[str, Any] = {"model_path": Path(folder)}
    elif settings.backend == "llama_cpp":
        from inference.backends.model_files import find_gguf

        update = {"llama_model": find_gguf(Path(folder))}
    elif settings.backend == "tensorrt_llm":
        update = {"trt_model": str(folder)}
    elif settings.backend == "benchmark":
        update = {}  # it reads no model; results carry the version label
    else:
        raise ValueError(f"unknown backend {settings.backend!r}")
    return settings.model_copy(update={**update, "model_version": version})


VersionLoader = Callable[[str], Awaitable[Engine]]


def version_loader(settings: Settings) -> VersionLoader:
    """Loads (and starts) a registered version when the rollout state needs it.

    A version the registry does not have raises ``UnknownVersionError`` (a registered
    version whose folder is gone, ``InvalidModelFolderError``): never the base model under
    the new label."""

    async def load_version(version: str) -> Engine:
        from inference.registry import ModelRegistry

        folder = ModelRegistry(settings.registry_path).path(version)
        candidate = build_engine(settings_for_version(settings, version, folder))
        await candidate.start()
        return candidate

    return load_version
