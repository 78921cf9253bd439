"""Fine-tune a model on human feedback and measure whether it got better.

``retrain()`` reads training examples (JSONL or Parquet rows with the ``TrainingExample``
fields, as ``sluice replay`` writes them), fine-tunes the base model on the *preferred*
answers, evaluates base and new model on a held-out split, and writes a plain Hugging Face
folder that :class:`inference.backends.torch.TorchEngine` loads unchanged.

Which rows teach what
    The target text is the human ``correction`` when there is one, else the model's own
    ``response`` when the feedback ``score > 0``. Rows with ``score <= 0`` and no correction
    say only "not this"; plain supervised fine-tuning cannot learn from that, so they are
    skipped and counted (``rows_skipped_no_target``). Rows without a prompt or a non-empty
    target are skipped and counted (``rows_skipped_invalid``). Exact duplicates (same
    request_id, system, prompt and target) are kept once.

Inputs and loss
    Each example is formatted with the base tokenizer's chat template exactly as the engine
    formats a request (system message if present, the user prompt, the assistant header),
    followed by the target and the template's end-of-turn token, so the model also learns
    to stop. Only target tokens count in the loss; the prompt tokens are masked (-100).
    Examples longer than ``max_length`` tokens keep the end of the prompt and the start of
    the target (``truncated`` counts them).

Held-out split
    A row is held out when ``sha256(request_id)`` maps below ``holdout_fraction``; the split
    therefore depends only on the request ids (not on the seed or the file order), and
    every re-run and every later retrain on a superset of the data agrees on it. With very
    few rows at least one example lands on each side.

Metric and gate
    The metric is the mean per-token negative log-likelihood (nats) of the preferred
    targets given their prompts, and its perplexity ``exp(nll)``, on the held-out split and
    on the training split, for the base and the new model. It moves as soon as the model
    moves toward the preferred answers, unlike exact-match scores on a few dozen rows. The
    new model passes when ``heldout NLL(new) <= heldout NLL(base) - min_improvement``.
    A refused model is still written (so a person can inspect it), but its ``retrain.json``
    and ``MODEL_CARD.md`` say REJECTED, and :meth:`inference.registry.ModelRegistry.register`
    refuses such a folder unless forced. :func:`gate` raises :class:`GateRefused` with the
    numbers, for callers that want an exception.

LoRA or full fine-tune: LoRA (the default), measured for SmolLM2-135M on 2 CPU cores
    Setup: float32, 40 rows of "What is a plus b?" -> "Answer: <sum>. Computed by Sluice."
    (30 train / 10 held out, ~50 tokens each with the default system message), batch 8,
    3 epochs = 12 optimizer steps, ``torch.set_num_threads(2)``, one fresh process per run,
    peak RSS from ``getrusage`` (about 1 GB of it is Python + torch + transformers + the
    model before any training).

    ===========  ======  ==================  ==================  =========================
    method       lr      train / total s     train / total s     peak RSS    held-out NLL
                         (2 pinned Xeon      (this dev box,      (dev box)   (nats/token,
                         cores, quiet)       shared, load 4-13)              base -> new)
    ===========  ======  ==================  ==================  =========================
    LoRA r=8     1e-3    19.6 / 35.7         27.7 / 51.4         2.94 GB     4.256 -> 0.136
    full         5e-5    29.9 / 48.8         247 / 290           4.13 GB     4.256 -> 0.088
    ===========  ======  ==================  ==================  =========================

    (The quiet timings ran the same code pinned to two cores with ``taskset`` on another
    machine, on a randomly initialised model of the same architecture, which costs the same
    compute; this box was shared with other test runs and its times are noisy upper bounds.)
    Full fine-tuning needs about 1.2 GB more memory (a gradient and two AdamW moments for
    each of the 135M parameters) and about 1.5x the compute per step (weight gradients
    everywhere), and every weight of the served model moves. LoRA (rank 8, alpha
    16, on every attention and MLP projection: 2.44M trainable parameters, 1.8%) reaches a
    comparable held-out NLL on these data, and its optimizer memory stays small as models
    grow. After training the adapter is merged into the base weights (``merge_and_unload``),
    so the saved folder is a plain model with no peft dependency at serving time.
    ``method="full"`` remains available. To save compute the output head (49k vocabulary)
    runs only on positions that predict a target token.

Determinism
    ``torch.manual_seed(seed)`` before adapter initialisation and a seeded generator for
    the shuffling; with the same data, settings, seed and thread count a re-run yields the
    same weights and metrics up to float rounding. The new version
    ``<base-version>-ft-<hash>`` hashes the data file's sha256 and the settings, so the
    same inputs always name the same version.

torch, transformers and peft are imported only inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from inference.backends.model_files import VERSION_FILE, model_version
from schemas.errors import SluiceError

MODEL_CARD_FILE = "MODEL_CARD.md"
REPORT_FILE = "retrain.json"
DEFAULT_LEARNING_RATES = {"lora": 1e-3, "full": 5e-5}
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARQUET_MAGIC = b"PAR1"
_IGNORE = -100

Progress = Callable[[str, float], None]


# -- errors ----------------------------------------------------------------------------
class RetrainError(SluiceError):
    """Retraining could not run."""

    reason_code = "retrain_failed"


class RetrainDataError(RetrainError):
    """The examples file is missing, unreadable or has no usable rows."""

    reason_code = "retrain_bad_data"


class GateRefused(SluiceError):
    """The new model did not beat the base model on the held-out examples."""

    reason_code = "gate_refused"

    def __init__(self, message: str, *, report: RetrainReport) -> None:
        super().__init__(message)
        self.report = report


# -- report ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitMetrics:
    """Mean per-token NLL (nats) of the preferred targets, and its perplexity."""

    examples: int
    tokens: int
    base_nll: float
    new_nll: float

    @property
    def base_perplexity(self) -> float:
        return _perplexity(self.base_nll)

    @property
    def new_perplexity(self) -> float:
        return _perplexity(self.new_nll)

    @property
    def improvement(self) -> float:
        """How much the NLL went down (positive is better)."""
        return self.base_nll - self.new_nll

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "base_perplexity": self.base_perplexity,
            "new_perplexity": self.new_perplexity,
            "improvement": self.improvement,
        }


@dataclass(frozen=True)
class DataCounts:
    rows_total: int
    rows_used: int
    rows_from_correction: int
    rows_from_positive_response: int
    rows_skipped_no_target: int
    rows_skipped_invalid: int
    rows_other_schema: int
    rows_duplicate: int
    rows_over_max_examples: int
    train_examples: int
    heldout_examples: int
    truncated: int


@dataclass(frozen=True)
class RetrainReport:
    """Everything about one retrain; also written as ``retrain.json`` next to the model."""

    version: str
    base_version: str
    base_model: str
    model_dir: Path
    method: str
    passed: bool
    min_improvement: float
    heldout: SplitMetrics
    train: SplitMetrics
    data_file: str
    data_sha256: str
    counts: DataCounts
    settings: dict[str, Any]
    trainable_parameters: int
    total_parameters: int
    steps: int
    losses: tuple[float, ...]
    train_seconds: float
    duration_seconds: float
    peak_rss_mb: float
    created_at: str
    library_versions: dict[str, str] = field(default_factory=dict)

    @property
    def base_heldout_nll(self) -> float:
        return self.heldout.base_nll

    @property
    def new_heldout_nll(self) -> float:
        return self.heldout.new_nll

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "base_version": self.base_version,
            "base_model": self.base_model,
            "model_dir": str(self.model_dir),
            "method": self.method,
            "gate": {
                "passed": self.passed,
                "metric": "heldout mean per-token NLL (nats), lower is better",
                "min_improvement": self.min_improvement,
                "base_heldout_nll": self.heldout.base_nll,
                "new_heldout_nll": self.heldout.new_nll,
            },
            "metrics": {"heldout": self.heldout.to_dict(), "train": self.train.to_dict()},
            "data": {"file": self.data_file, "sha256": self.data_sha256, **asdict(self.counts)},
            "settings": dict(self.settings),
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "steps": self.steps,
            "losses": list(self.losses),
            "train_seconds": self.train_seconds,
            "duration_seconds": self.duration_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "created_at": self.created_at,
            "library_versions": dict(self.library_versions),
        }


def gate(report: RetrainReport) -> None:
    """Raise :class:`GateRefused` unless the new model beat the base on held-out data."""
    if report.passed:
        return
    h = report.heldout
    raise GateRefused(
        f"model {report.version} refused: held-out NLL {h.new_nll:.4f} "
        f"(perplexity {h.new_perplexity:.2f}) vs base {h.base_nll:.4f} "
        f"(perplexity {h.base_perplexity:.2f}); improvement {h.improvement:+.4f} nats/token, "
        f"required >= {report.min_improvement:.4f} on {h.examples} held-out examples "
        f"({h.tokens} target tokens)",
        report=report,
    )


# -- data ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One usable row: what the user asked and the answer we want the model to give."""

    request_id: str
    prompt: str
    system: str | None
    target: str
    source: Literal["correction", "response"]

    @property
    def heldout_key(self) -> float:
        """Where sha256(request_id) falls in [0, 1): below the holdout fraction = held out."""
        digest = hashlib.sha256(self.request_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class LoadedData:
    examples: tuple[Example, ...]
    rows_total: int
    rows_skipped_no_target: int
    rows_skipped_invalid: int
    rows_other_schema: int
    rows_duplicate: int


def read_rows(path: Path) -> list[Any]:
    """The rows of a JSONL or Parquet file (Parquet is recognised by its magic bytes)."""
    path = Path(path)
    if not path.is_file():
        raise RetrainDataError(
            f"examples file {path} does not exist (write one with sluice replay)"
        )
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == _PARQUET_MAGIC:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise RetrainDataError(
                f"{path} is Parquet, which needs pyarrow (pip install pyarrow); "
                "or give a JSONL file"
            ) from exc
        try:
            return list(pq.read_table(path).to_pylist())
        except Exception as exc:
            raise RetrainDataError(f"cannot read Parquet file {path}: {exc}") from exc
    rows: list[Any] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RetrainDataError(
                        f"{path} line {number} is not JSON ({exc.msg}); "
                        "expected one TrainingExample object per line"
                    ) from exc
    except UnicodeDecodeError as exc:
        raise RetrainDataError(f"{path} is neither UTF-8 JSONL nor Parquet") from exc
    return rows


def load_examples(path: Path) -> LoadedData:
    """Read the file and keep the rows that name a preferred answer (see module doc)."""
    rows = read_rows(path)
    examples: list[Example] = []
    seen: set[tuple[str, str | None, str, str]] = set()
    no_target = invalid = other = duplicate = 0
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            invalid += 1
            continue
        schema = row.get("_schema")  # replay's metadata column: a mixed dump of topics
        if isinstance(schema, str) and schema and not schema.endswith("TrainingExample"):
            other += 1
            continue
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            invalid += 1
            continue
        system = row.get("system")
        system = system if isinstance(system, str) and system.strip() else None
        correction = row.get("correction")
        response = row.get("response")
        score = row.get("score", 0)
        try:
            score = int(score) if score is not None else 0
        except (TypeError, ValueError):
            invalid += 1
            continue
        source: Literal["correction", "response"]
        if isinstance(correction, str) and correction.strip():
            target, source = correction, "correction"
        elif score > 0 and isinstance(response, str) and response.strip():
            target, source = response, "response"
        elif score > 0:
            invalid += 1  # positive feedback on an empty answer: nothing to learn
            continue
        else:
            no_target += 1
            continue
        request_id = row.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            request_id = f"row-{index}-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"
        key = (request_id, system, prompt, target)
        if key in seen:
            duplicate += 1
            continue
        seen.add(key)
        examples.append(Example(request_id, prompt, system, target, source))
    return LoadedData(tuple(examples), len(rows), no_target, invalid, other, duplicate)


def split_examples(
    examples: Sequence[Example], holdout_fraction: float
) -> tuple[list[Example], list[Example]]:
    """(train, held out), by hash of request_id; both sides non-empty when len >= 2."""
    train = [e for e in examples if e.heldout_key >= holdout_fraction]
    heldout = [e for e in examples if e.heldout_key < holdout_fraction]
    if not heldout and len(train) >= 2:
        first = min(train, key=lambda e: e.heldout_key)
        train.remove(first)
        heldout.append(first)
    elif not train and len(heldout) >= 2:
        last = max(heldout, key=lambda e: e.heldout_key)
        heldout.remove(last)
        train.append(last)
    return train, heldout


# -- tokenization ----------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # _IGNORE on prompt tokens
    truncated: bool

    @property
    def target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != _IGNORE)


def _messages(example: Example) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": example.system}] if example.system else []
    messages.append({"role": "user", "content": example.prompt})
    return messages


def _as_ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def encode_example(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """Prompt ids as the engine builds them, then the target and the end-of-turn marker."""
    if getattr(tokenizer, "chat_template", None):
        messages = _messages(example)
        prompt_ids = _as_ids(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        )
        prompt_text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        full_text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": example.target}],
            add_generation_prompt=False,
            tokenize=False,
        )
        if full_text.startswith(prompt_text):
            # The template's own closing of the turn (ChatML: "<|im_end|>\n"), minus the
            # whitespace after it: generation stops at the end-of-turn token.
            target_text = full_text[len(prompt_text) :].rstrip()
        else:  # a template that rewrites earlier turns; fall back to target + EOS
            target_text = example.target + (tokenizer.eos_token or "")
    else:
        prompt_ids = _as_ids(tokenizer(example.prompt, add_special_tokens=True))
        target_text = example.target + (tokenizer.eos_token or "")
    target_ids = _as_ids(tokenizer(target_text, add_special_tokens=False))
    truncated = len(prompt_ids) + len(target_ids) > max_length
    if truncated:
        keep_target = min(len(target_ids), max(1, max_length // 2), max_length - 1)
        keep_target = max(keep_target, max_length - len(prompt_ids))
        target_ids = target_ids[:keep_target]
        room = max_length - len(target_ids)
        prompt_ids = prompt_ids[-room:] if room > 0 else []
    return Encoded(
        input_ids=prompt_ids + target_ids,
        labels=[_IGNORE] * len(prompt_ids) + target_ids,
        truncated=truncated,
    )


def _collate(batch: Sequence[Encoded], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded input ids, attention mask and labels (padding never counts)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), _IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    return ids, mask, labels


def _token_nll(model: Any, ids: Any, mask: Any, labels: Any) -> tuple[Any, int]:
    """Summed NLL of the labelled tokens (next-token prediction) and how many there are.

    The output head runs only on the positions that predict a target token: with a 49k
    vocabulary it is a large share of the compute, and most positions are prompt.
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != _IGNORE
    decoder, head = _decoder_and_head(model)
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1, :]
        logits = head(hidden[keep])
        wanted = targets[keep]
    else:  # a model without the usual decoder / head split: score every position
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :]
        logits, wanted = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    loss = F.cross_entropy(logits.float(), wanted, ignore_index=_IGNORE, reduction="sum")
    return loss, int(keep.sum())


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if decoder is model or getattr(model.config, "final_logit_softcapping", None):
        return None, None
    if float(getattr(model.config, "logit_scale", 1.0) or 1.0) != 1.0:
        return None, None
    return decoder, head


def evaluate_nll(model: Any, encoded: Sequence[Encoded], pad_id: int, batch_size: int) -> float:
    """Mean per-token NLL (nats) of the targets, weighted by target tokens."""
    import torch

    if not encoded:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            loss, n = _token_nll(model, *_collate(encoded[start : start + batch_size], pad_id))
            total += float(loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)


# -- the job ---------------------------------------------------------------------------
def retrain(
    examples: Path,
    base_model: Path,
    out_dir: Path,
    *,
    method: Literal["lora", "full"] = "lora",
    epochs: int = 3,
    learning_rate: float | None = None,
    lora_rank: int = 8,
    lora_alpha: int | None = None,
    batch_size: int = 8,
    max_examples: int | None = None,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    max_length: int = 256,
    min_improvement: float = 0.0,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> RetrainReport:
    """Fine-tune ``base_model`` on the preferred answers in ``examples``; write ``out_dir``.

    ``out_dir`` is the new model folder itself (weights, tokenizer, config, ``SLUICE_VERSION``,
    ``MODEL_CARD.md``, ``retrain.json``); it is written atomically (staged next to it, then
    renamed) and is refused if it exists unless ``overwrite``. ``learning_rate`` defaults to
    1e-3 for LoRA and 5e-5 for a full fine-tune; ``lora_alpha`` defaults to ``2 * lora_rank``.
    ``progress(message, fraction)`` is called after every optimizer step with
    ``message == f"step {step}/{total} loss {loss:.4f}"`` (the mean training loss of that
    step) and ``fraction == step / total`` (for a progress bar; the losses are also in
    ``RetrainReport.losses``).
    ``threads`` calls ``torch.set_num_threads`` (process-wide) before training.
    Raises :class:`RetrainDataError` for a missing/unreadable file or fewer than 2 usable
    rows, :class:`RetrainError` for bad settings or an existing ``out_dir``; a model that
    fails the gate is *returned* with ``passed=False`` (see :func:`gate`).
    """
    started = time.monotonic()
    examples, base_model, out_dir = Path(examples), Path(base_model), Path(out_dir)
    _check_settings(method, epochs, learning_rate, lora_rank, batch_size, holdout_fraction,
                    max_length, max_examples)  # fmt: skip
    lr = learning_rate if learning_rate is not None else DEFAULT_LEARNING_RATES[method]
    alpha = lora_alpha if lora_alpha is not None else 2 * lora_rank
    if not (base_model / "config.json").is_file():
        raise RetrainError(f"{base_model} is not a Hugging Face model folder (no config.json)")
    if out_dir.exists() and not overwrite:
        raise RetrainError(f"{out_dir} already exists; choose another folder or overwrite it")

    loaded = load_examples(examples)
    usable = list(loaded.examples)
    over_max = 0
    if max_examples is not None and len(usable) > max_examples:
        over_max = len(usable) - max_examples
        usable = usable[:max_examples]
    if len(usable) < 2:
        raise RetrainDataError(
            f"{examples} has {len(usable)} usable example(s) of {loaded.rows_total} rows; at "
            "least 2 are needed (a row is usable with a correction, or with score > 0 and a "
            f"response; skipped: {loaded.rows_skipped_no_target} with score <= 0 and no "
            f"correction, {loaded.rows_skipped_invalid} invalid, {loaded.rows_other_schema} of "
            "another record type)"
        )
    train_set, heldout_set = split_examples(usable, holdout_fraction)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)

    data_sha = _file_sha256(examples)
    base_version = model_version(base_model)
    settings: dict[str, Any] = {
        "method": method,
        "epochs": epochs,
        "learning_rate": lr,
        "lr_schedule": "linear decay to 0, no warm-up",
        "optimizer": "AdamW (weight_decay 0.0), grad clip 1.0",
        "batch_size": batch_size,
        "max_examples": max_examples,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "max_length": max_length,
        "min_improvement": min_improvement,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
    }
    if method == "lora":
        settings.update(lora_rank=lora_rank, lora_alpha=alpha, lora_dropout=0.0,
                        lora_target_modules=list(LORA_TARGET_MODULES))  # fmt: skip
    version = new_version_name(base_version, data_sha, settings)

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_enc = [encode_example(tokenizer, e, max_length) for e in train_set]
    heldout_enc = [encode_example(tokenizer, e, max_length) for e in heldout_set]
    train_enc_eval = [e for e in train_enc if e.target_tokens > 0]
    heldout_enc = [e for e in heldout_enc if e.target_tokens > 0]

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model.config.use_cache = False
    eval_batch = max(batch_size, 8)
    base_heldout = evaluate_nll(model, heldout_enc, pad_id, eval_batch)
    base_train = evaluate_nll(model, train_enc_eval, pad_id, eval_batch)

    total_params = sum(p.numel() for p in model.parameters())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=lora_rank,
                lora_alpha=alpha,
                lora_dropout=0.0,
                target_modules=list(LORA_TARGET_MODULES),
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_count = sum(p.numel() for p in trainable)

    train_started = time.monotonic()
    steps_per_epoch = math.ceil(len(train_enc) / batch_size)
    total_steps = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(total_steps, 1))
    )
    shuffler = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_enc), generator=shuffler).tolist()
        for start in range(0, len(order), batch_size):
            batch = [train_enc[i] for i in order[start : start + batch_size]]
            loss_sum, count = _token_nll(model, *_collate(batch, pad_id))
            loss = loss_sum / max(count, 1)
            optimizer.zero_grad(set_to_none=True)
            if count:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
            scheduler.step()
            step += 1
            value = float(loss.detach())
            losses.append(round(value, 6))
            if progress is not None:
                progress(f"step {step}/{total_steps} loss {value:.4f}", step / total_steps)
    train_seconds = time.monotonic() - train_started
    del optimizer

    if method == "lora":
        model = model.merge_and_unload()
    model.eval()
    model.config.use_cache = True
    new_heldout = evaluate_nll(model, heldout_enc, pad_id, eval_batch)
    new_train = evaluate_nll(model, train_enc_eval, pad_id, eval_batch)
    passed = bool(new_heldout <= base_heldout - min_improvement)

    counts = DataCounts(
        rows_total=loaded.rows_total,
        rows_used=len(usable),
        rows_from_correction=sum(1 for e in usable if e.source == "correction"),
        rows_from_positive_response=sum(1 for e in usable if e.source == "response"),
        rows_skipped_no_target=loaded.rows_skipped_no_target,
        rows_skipped_invalid=loaded.rows_skipped_invalid,
        rows_other_schema=loaded.rows_other_schema,
        rows_duplicate=loaded.rows_duplicate,
        rows_over_max_examples=over_max,
        train_examples=len(train_enc),
        heldout_examples=len(heldout_enc),
        truncated=sum(1 for e in [*train_enc, *heldout_enc] if e.truncated),
    )
    report = RetrainReport(
        version=version,
        base_version=base_version,
        base_model=str(base_model),
        model_dir=out_dir,
        method=method,
        passed=passed,
        min_improvement=min_improvement,
        heldout=SplitMetrics(
            len(heldout_enc), sum(e.target_tokens for e in heldout_enc), base_heldout, new_heldout
        ),
        train=SplitMetrics(
            len(train_enc_eval), sum(e.target_tokens for e in train_enc_eval), base_train, new_train
        ),
        data_file=str(examples),
        data_sha256=data_sha,
        counts=counts,
        settings=settings,
        trainable_parameters=trainable_count,
        total_parameters=total_params,
        steps=total_steps,
        losses=tuple(losses),
        train_seconds=round(train_seconds, 3),
        duration_seconds=0.0,
        peak_rss_mb=0.0,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        library_versions=_library_versions(),
    )
    return _save(model, tokenizer, report, out_dir, overwrite, started)


def _save(
    model: Any,
    tokenizer: Any,
    report: RetrainReport,
    out_dir: Path,
    overwrite: bool,
    started: float,
) -> RetrainReport:
    """Stage the folder next to ``out_dir`` and rename it into place."""
    from dataclasses import replace

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        report = replace(
            report,
            duration_seconds=round(time.monotonic() - started, 3),
            peak_rss_mb=round(_peak_rss_mb(), 1),
        )
        (staging / VERSION_FILE).write_text(report.version + "\n")
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (staging / MODEL_CARD_FILE).write_text(model_card(report))
        if out_dir.exists():
            if not overwrite:
                raise RetrainError(f"{out_dir} appeared while training; not overwriting it")
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def model_card(report: RetrainReport) -> str:
    h, t, c = report.heldout, report.train, report.counts
    verdict = "PASSED" if report.passed else "REJECTED (do not serve; see the gate below)"
    settings = "\n".join(f"| {k} | {v} |" for k, v in report.settings.items())
    return f"""# {report.version}

Fine-tuned from **{report.base_version}** (`{report.base_model}`) by `sluice retrain`
({report.method}) on {report.created_at}. Evaluation gate: **{verdict}**.

## Data

- file: `{report.data_file}`
- sha256: `{report.data_sha256}`
- rows: {c.rows_total} read, {c.rows_used} used ({c.rows_from_correction} corrections, \
{c.rows_from_positive_response} positively scored responses); skipped: \
{c.rows_skipped_no_target} with score <= 0 and no correction, {c.rows_skipped_invalid} \
invalid, {c.rows_other_schema} of another record type, {c.rows_duplicate} duplicate, \
{c.rows_over_max_examples} over max_examples
- split by sha256(request_id): {c.train_examples} train, {c.heldout_examples} held out; \
{c.truncated} truncated to max_length

## Metrics

Mean per-token negative log-likelihood (nats) of the preferred answers; lower is better.

| split | examples | target tokens | base NLL | new NLL | base ppl | new ppl |
|---|---|---|---|---|---|---|
| held out | {h.examples} | {h.tokens} | {h.base_nll:.4f} | {h.new_nll:.4f} \
| {h.base_perplexity:.2f} | {h.new_perplexity:.2f} |
| train | {t.examples} | {t.tokens} | {t.base_nll:.4f} | {t.new_nll:.4f} \
| {t.base_perplexity:.2f} | {t.new_perplexity:.2f} |

Gate: held-out NLL(new) <= NLL(base) - {report.min_improvement} -> \
{"passed" if report.passed else "refused"} (improvement {h.improvement:+.4f}).

## Training

| setting | value |
|---|---|
{settings}

- trainable parameters: {report.trainable_parameters:,} of {report.total_parameters:,}
- optimizer steps: {report.steps}; final step loss: \
{report.losses[-1] if report.losses else float("nan"):.4f}
- training time: {report.train_seconds:.1f} s; total: {report.duration_seconds:.1f} s; \
peak RSS of the process: {report.peak_rss_mb:.0f} MB
- libraries: {", ".join(f"{k} {v}" for k, v in report.library_versions.items())}
"""


def new_version_name(base_version: str, data_sha256: str, settings: dict[str, Any]) -> str:
    """``<base-version>-ft-<10 hex>``: a digest of the data and the training settings.

    The thread count and the gate threshold are left out: they do not change the weights,
    and the same data and settings name the same version on any machine.
    """
    hashed = {k: v for k, v in settings.items() if k not in ("threads", "min_improvement")}
    digest = hashlib.sha256()
    digest.update(base_version.encode())
    digest.update(data_sha256.encode())
    digest.update(json.dumps(hashed, sort_keys=True, default=str).encode())
    return f"{base_version}-ft-{digest.hexdigest()[:10]}"


def _check_settings(
    method: str,
    epochs: int,
    learning_rate: float | None,
    lora_rank: int,
    batch_size: int,
    holdout_fraction: float,
    max_length: int,
    max_examples: int | None,
) -> None:
    problems = []
    if method not in DEFAULT_LEARNING_RATES:
        problems.append(f"method must be 'lora' or 'full', not {method!r}")
    if epochs < 1:
        problems.append("epochs must be >= 1")
    if learning_rate is not None and learning_rate < 0:
        problems.append("learning_rate must be >= 0")
    if lora_rank < 1:
        problems.append("lora_rank must be >= 1")
    if batch_size < 1:
        problems.append("batch_size must be >= 1")
    if not 0.0 < holdout_fraction < 1.0:
        problems.append("holdout_fraction must be between 0 and 1 (exclusive)")
    if max_length < 8:
        problems.append("max_length must be >= 8")
    if max_examples is not None and max_examples < 2:
        problems.append("max_examples must be >= 2")
    if problems:
        raise RetrainError("; ".join(problems))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _perplexity(nll: float) -> float:
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
