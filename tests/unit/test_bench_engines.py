"""The engine-side pieces the bench needs: ``Engine.tokenize_text`` (no private tokenizer
attributes), the backend-neutral ``inflight_factor`` (old env name still read) and a
registered GGUF version served by the llama_cpp backend."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest

from inference.backends.base import Engine
from inference.backends.model_files import ModelNotFoundError, file_digest, find_gguf
from inference.types import Completion, GenerationRequest
from streams.engines import build_engine, settings_for_version
from streams.settings import Settings

TEXT = "Summarize in one sentence: river stone light, window garden."


# -- tokenize_text -----------------------------------------------------------------------
class _Words(Engine):
    """An engine whose prompt encoding is visible (word lengths), for the default."""

    model_name = model_version = "w"

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def encode_prompt(self, prompt: str, *, system: str | None, raw: bool) -> list[int]:
        return ([] if raw else [0]) + [len(w) for w in prompt.split()]

    async def generate(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        return []


def test_tokenize_text_defaults_to_the_raw_encoding() -> None:
    assert _Words().tokenize_text("ab cde") == [2, 3]


async def test_torch_tokenize_text_is_the_tokenizer_without_specials(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    engine = build_engine(Settings(backend="torch", model_path=model_dir))
    with pytest.raises(Exception, match="not started"):
        engine.tokenize_text(TEXT)
    await engine.start()
    try:
        ids = engine.tokenize_text(TEXT)
    finally:
        await engine.stop()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert ids == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT


@pytest.mark.slow
async def test_llama_cpp_tokenize_text_matches_torch(model_dir: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    from transformers import AutoTokenizer

    engine = build_engine(Settings(backend="llama_cpp", llama_threads=1, batch_max_size=1))
    await engine.start()
    try:
        ids = engine.tokenize_text(TEXT)
        chat = engine.tokenize_text("<|im_start|>user")
    finally:
        await engine.stop()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert ids == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert chat == tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"]


# -- inflight_factor -----------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in ("SLUICE_INFLIGHT_FACTOR", "SLUICE_TRT_INFLIGHT_FACTOR"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_inflight_factor_new_and_deprecated_env_names(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().inflight_factor == 1.5
    clean_env.setenv("SLUICE_TRT_INFLIGHT_FACTOR", "2.5")
    assert Settings().inflight_factor == 2.5  # the deprecated name still works
    clean_env.setenv("SLUICE_INFLIGHT_FACTOR", "3")
    assert Settings().inflight_factor == 3.0  # the new name wins
    assert Settings(inflight_factor=4.0).inflight_factor == 4.0  # by name in code
    assert Settings().model_copy(update={"inflight_factor": 5.0}).inflight_factor == 5.0
    assert Settings(inflight_factor=2.0).trt_inflight_factor == 2.0  # old attribute, read-only
    assert "trt_inflight_factor" not in Settings.model_fields


def test_inflight_factor_round_trips_to_a_worker(clean_env: pytest.MonkeyPatch) -> None:
    from connectors.processes import settings_env

    env = settings_env(Settings(inflight_factor=2.0))
    assert env["SLUICE_INFLIGHT_FACTOR"] == "2.0" and "SLUICE_TRT_INFLIGHT_FACTOR" not in env
    clean_env.setenv("SLUICE_INFLIGHT_FACTOR", env["SLUICE_INFLIGHT_FACTOR"])
    assert Settings().inflight_factor == 2.0


def test_inflight_factor_is_validated(clean_env: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    clean_env.setenv("SLUICE_TRT_INFLIGHT_FACTOR", "0.5")
    with pytest.raises(ValidationError):
        Settings()


# -- a GGUF version on llama_cpp --------------------------------------------------------------
def test_settings_for_version_gives_llama_cpp_the_folders_gguf(tmp_path: Path) -> None:
    folder = tmp_path / "versions" / "v3"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.Q4_1.gguf").write_bytes(b"GGUF")
    settings = Settings(home=tmp_path, backend="llama_cpp")
    versioned = settings_for_version(settings, "v3", folder)
    assert versioned.llama_model == folder / "model.Q4_1.gguf"
    assert versioned.model_version == "v3" and versioned.backend == "llama_cpp"
    assert settings.llama_model is None, "the worker's own settings are not changed"


def test_find_gguf_needs_exactly_one(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no .gguf file"):
        find_gguf(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"a")
    assert find_gguf(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"b")
    with pytest.raises(ModelNotFoundError, match="2 .gguf files"):
        find_gguf(tmp_path)
    settings = Settings(home=tmp_path, backend="llama_cpp")
    with pytest.raises(ModelNotFoundError):
        settings_for_version(settings, "v", tmp_path)


def test_file_digest(tmp_path: Path) -> None:
    from inference.backends.llama_cpp import gguf_version

    data = bytes(range(256)) * 5000  # > 1 MiB: several chunks
    path = tmp_path / "M.gguf"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()[:12]
    assert gguf_version(path) == f"m-{file_digest(path)}+llama.cpp"
