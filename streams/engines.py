"""Builds the engine the settings ask for."""

from __future__ import annotations

from inference.backends.base import Engine
from inference.backends.model_files import model_version, resolve_model_dir
from streams.settings import Settings


def build_engine(settings: Settings) -> Engine:
    """The configured backend, not yet started (call ``await engine.start()``)."""
    if settings.backend == "torch":
        from inference.backends.torch import TorchEngine

        folder = resolve_model_dir(settings.model_path, settings.model_cache_dir)
        return TorchEngine(
            folder,
            model_name=settings.model_name,
            model_version=settings.model_version or model_version(folder),
            device=settings.device,
            max_batch_size=settings.batch_max_size,
            threads=settings.torch_threads,
        )
    raise ValueError(f"unknown backend {settings.backend!r}")
