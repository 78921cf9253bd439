"""Builds the engine the settings ask for."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
        )
    if settings.backend == "benchmark":
        from inference.backends.benchmark import BenchmarkEngine

        return BenchmarkEngine(
            model_name=settings.model_name,
            completion_tokens=settings.benchmark_completion_tokens,
            max_batch_size=settings.batch_max_size,
            delay_s=settings.benchmark_delay_ms / 1000.0,
        )
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


VersionLoader = Callable[[str], Awaitable[Engine]]


def version_loader(settings: Settings) -> VersionLoader:
    """Loads (and starts) a registry version when a rollout command asks for one."""

    async def load_version(version: str) -> Engine:
        from inference.registry import ModelRegistry

        folder = ModelRegistry(settings.registry_path).path(version)
        versioned = settings.model_copy(update={"model_path": folder, "model_version": version})
        candidate = build_engine(versioned)
        await candidate.start()
        return candidate

    return load_version
