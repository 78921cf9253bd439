"""Retraining on feedback: data selection, prompt masking, the held-out gate, and a real
LoRA fine-tune of SmolLM2-135M that the TorchEngine then serves.

The slow tests train once for the module (40 rows, 3 epochs: about 40 s on two quiet CPU
cores) plus two one-step runs for the gate and determinism.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from inference.registry import ModelRegistry, RejectedModelError
from inference.retrain import (
    DEFAULT_LEARNING_RATES,
    Example,
    GateRefused,
    RetrainDataError,
    RetrainError,
    RetrainReport,
    encode_example,
    gate,
    load_examples,
    new_version_name,
    read_rows,
    retrain,
    split_examples,
)
from schemas.errors import SluiceError

FORMAT_TAIL = "Computed by Sluice."


def row(rid: str, prompt: str, *, response: str = "Not sure.", score: int = -1, **extra: object):
    base = {
        "_topic": "llm.training-examples",
        "_schema": "dev.sluice.TrainingExample",
        "request_id": rid,
        "prompt": prompt,
        "system": None,
        "response": response,
        "score": score,
        "label": None,
        "correction": None,
        "model": "smollm2-135m-instruct",
        "model_version": "base",
        "max_new_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "redactions": {},
    }
    base.update(extra)
    return base


def answer(a: int, b: int) -> str:
    return f"Answer: {a + b}. {FORMAT_TAIL}"


def synthetic_rows(count: int = 40, *, seed: int = 1) -> list[dict]:
    """A learnable house style: every preferred answer is "Answer: <sum>. Computed by Sluice."

    Most rows carry a human correction of a bad answer; every tenth is the model's own
    answer scored +1. Noise rows that must not become targets are appended.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        prompt = f"What is {a} plus {b}?"
        if i % 10 == 9:
            rows.append(row(f"req-{i:03d}", prompt, response=answer(a, b), score=1))
        else:
            rows.append(row(f"req-{i:03d}", prompt, correction=answer(a, b)))
    rows.append(row("neg-1", "What is 2 plus 2?", response="5", score=-1))  # no correction
    rows.append(row("neutral-1", "Say hi", response="hi", score=0))  # no correction
    rows.append(row("bad-1", "", correction="Answer: 0."))  # no prompt
    rows.append({"_schema": "dev.sluice.InferenceResult", "request_id": "x", "text": "y"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_base(tmp_path: Path) -> Path:
    """Enough of a model folder for checks that fail before any weights are read."""
    folder = tmp_path / "fake-base"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


# -- data (no model) ----------------------------------------------------------------------


def test_errors_are_sluice_errors() -> None:
    for error in (RetrainError, RetrainDataError, GateRefused):
        assert issubclass(error, SluiceError)


def test_target_selection_and_counts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ex.jsonl", synthetic_rows(40))
    loaded = load_examples(path)
    assert loaded.rows_total == 44
    assert len(loaded.examples) == 40
    assert loaded.rows_skipped_no_target == 2
    assert loaded.rows_skipped_invalid == 1
    assert loaded.rows_other_schema == 1
    sources = [e.source for e in loaded.examples]
    assert sources.count("response") == 4 and sources.count("correction") == 36
    assert all(e.target.endswith(FORMAT_TAIL) for e in loaded.examples)


def test_correction_wins_over_positive_response_and_duplicates_collapse(tmp_path: Path) -> None:
    rows = [
        row("a", "Q1", response="model answer", score=1, correction="human answer"),
        row("b", "Q2", response="good", score=1),
        row("b", "Q2", response="good", score=1),  # exact duplicate
        row("c", "Q3", response="   ", score=1),  # positive but empty: invalid
        row("d", "Q4", response="bad", score=0, correction=""),  # empty correction: no target
        row("e", "Q5", system="Be terse.", response="ok", score=2),
    ]
    loaded = load_examples(write_jsonl(tmp_path / "ex.jsonl", rows))
    got = {e.request_id: (e.target, e.source, e.system) for e in loaded.examples}
    assert got == {
        "a": ("human answer", "correction", None),
        "b": ("good", "response", None),
        "e": ("ok", "response", "Be terse."),
    }
    assert loaded.rows_duplicate == 1
    assert loaded.rows_skipped_invalid == 1
    assert loaded.rows_skipped_no_target == 1


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RetrainDataError, match=r"does not exist.*sluice replay"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(RetrainDataError, match="does not exist"):
        retrain(tmp_path / "nope.jsonl", fake_base(tmp_path), tmp_path / "out")


def test_broken_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "ex.jsonl"
    path.write_text(json.dumps(row("a", "Q", correction="A")) + "\n{oops\n")
    with pytest.raises(RetrainDataError, match="line 2 is not JSON"):
        read_rows(path)


def test_no_usable_rows_is_a_clear_error(tmp_path: Path) -> None:
    rows = [row(f"n{i}", f"Q{i}", score=-1) for i in range(5)]
    path = write_jsonl(tmp_path / "ex.jsonl", rows)
    with pytest.raises(
        RetrainDataError, match=r"0 usable example\(s\) of 5 rows.*5 with score <= 0"
    ):
        retrain(path, fake_base(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parquet_rows_are_read(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{k: v for k, v in r.items() if k != "redactions"} for r in synthetic_rows(10)[:10]]
    path = tmp_path / "ex.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded = load_examples(path)
    assert len(loaded.examples) == 10 and loaded.examples[0].request_id == "req-000"


def test_bad_settings_and_existing_output(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ex.jsonl", synthetic_rows(10))
    base = fake_base(tmp_path)
    with pytest.raises(RetrainError, match="method must be"):
        retrain(path, base, tmp_path / "o", method="qlora")  # type: ignore[arg-type]
    with pytest.raises(RetrainError, match="holdout_fraction"):
        retrain(path, base, tmp_path / "o", holdout_fraction=0.0)
    with pytest.raises(RetrainError, match="epochs"):
        retrain(path, base, tmp_path / "o", epochs=0)
    with pytest.raises(RetrainError, match="no config.json"):
        retrain(path, tmp_path, tmp_path / "o")
    (tmp_path / "taken").mkdir()
    with pytest.raises(RetrainError, match="already exists"):
        retrain(path, base, tmp_path / "taken")


def test_split_is_by_request_id_and_stable() -> None:
    examples = [Example(f"req-{i}", f"Q{i}", None, "A", "correction") for i in range(200)]
    train, heldout = split_examples(examples, 0.25)
    assert 30 < len(heldout) < 70 and len(train) + len(heldout) == 200
    # Order and neighbours do not matter: only the request id decides.
    shuffled = list(reversed(examples))[:150]
    train2, heldout2 = split_examples(shuffled, 0.25)
    assert {e.request_id for e in heldout2} <= {e.request_id for e in heldout}
    assert {e.request_id for e in train2} <= {e.request_id for e in train}


def test_tiny_sets_get_both_sides() -> None:
    two = [Example("x", "Q", None, "A", "correction"), Example("y", "Q", None, "B", "correction")]
    for fraction in (0.01, 0.99):
        train, heldout = split_examples(two, fraction)
        assert len(train) == 1 and len(heldout) == 1


def test_version_name_hashes_data_and_settings() -> None:
    settings = {"method": "lora", "epochs": 3, "seed": 0}
    a = new_version_name("base-v1", "ab" * 32, settings)
    assert a.startswith("base-v1-ft-") and len(a) == len("base-v1-ft-") + 10
    assert new_version_name("base-v1", "ab" * 32, dict(settings)) == a
    assert new_version_name("base-v1", "ab" * 32, {**settings, "seed": 1}) != a
    assert new_version_name("base-v1", "cd" * 32, settings) != a
    assert new_version_name("base-v1", "ab" * 32, {**settings, "threads": 16}) == a
    assert new_version_name("base-v1", "ab" * 32, {**settings, "min_improvement": 1.0}) == a


def test_default_learning_rates() -> None:
    assert DEFAULT_LEARNING_RATES == {"lora": 1e-3, "full": 5e-5}


# -- tokenization (tokenizer only) --------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_prompt_is_masked_and_matches_the_engine(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = Example("r", "What is 2 plus 3?", "Be brief.", "Answer: 5.", "correction")
    enc = encode_example(tokenizer, example, max_length=256)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
    ]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    n = len(prompt_ids)
    assert enc.input_ids[:n] == list(prompt_ids)  # exactly what the engine feeds
    assert enc.labels[:n] == [-100] * n
    target = enc.labels[n:]
    assert target == enc.input_ids[n:] and enc.target_tokens == len(target)
    assert tokenizer.decode(target) == "Answer: 5.<|im_end|>"  # learns to stop, too
    assert not enc.truncated


def test_long_examples_are_truncated(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = Example("r", "word " * 300, None, "Answer: yes. " * 50, "correction")
    enc = encode_example(tokenizer, example, max_length=64)
    assert enc.truncated
    assert len(enc.input_ids) == 64
    assert enc.target_tokens == 32  # half the window for the start of the target
    # the prompt keeps its end: the assistant header right before the target
    assert tokenizer.decode(enc.input_ids[:32]).endswith("<|im_start|>assistant\n")


# -- real fine-tune (slow) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("retrain")
    data = write_jsonl(work / "examples.jsonl", synthetic_rows(40))
    calls: list[tuple[str, float]] = []
    report = retrain(
        data,
        model_dir,
        work / "model",
        progress=lambda message, fraction: calls.append((message, fraction)),
    )
    print(
        f"\nretrain: {report.duration_seconds:.1f} s total, {report.train_seconds:.1f} s "
        f"training, peak RSS {report.peak_rss_mb:.0f} MB; held-out NLL "
        f"{report.heldout.base_nll:.3f} -> {report.heldout.new_nll:.3f}, train NLL "
        f"{report.train.base_nll:.3f} -> {report.train.new_nll:.3f}"
    )
    return report, calls, data


@pytest.mark.slow
def test_retrain_improves_heldout_nll_and_passes_the_gate(trained) -> None:  # type: ignore[no-untyped-def]
    report, calls, _ = trained
    assert isinstance(report, RetrainReport)
    assert report.method == "lora" and report.passed
    assert report.heldout.examples >= 5 and report.counts.train_examples >= 25
    assert report.counts.train_examples + report.counts.heldout_examples == 40
    assert report.heldout.new_nll < report.heldout.base_nll - 0.5
    assert report.train.new_nll < report.train.base_nll - 0.5
    assert report.heldout.new_perplexity < report.heldout.base_perplexity
    gate(report)  # does not raise
    # progress once per optimizer step, with the step loss
    assert len(calls) == report.steps == 12 == len(report.losses)
    assert re.fullmatch(r"step 1/12 loss \d+\.\d{4}", calls[0][0])
    assert calls[-1][0].startswith("step 12/12 loss ")
    assert [c[1] for c in calls] == pytest.approx([i / 12 for i in range(1, 13)])
    assert report.losses[-1] < report.losses[0]
    assert 0 < report.trainable_parameters < report.total_parameters / 10


@pytest.mark.slow
def test_output_folder_is_a_plain_model_with_card_and_report(trained, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from inference.backends.model_files import model_version

    report, _, data = trained
    folder = report.model_dir
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "SLUICE_VERSION"} <= names
    assert {"MODEL_CARD.md", "retrain.json"} <= names
    assert not any(n.startswith("adapter") for n in names)  # merged, not an adapter
    assert model_version(folder) == report.version
    assert report.version.startswith(model_version(model_dir) + "-ft-")
    facts = json.loads((folder / "retrain.json").read_text())
    assert facts["version"] == report.version and facts["gate"]["passed"] is True
    assert facts["data"]["sha256"] == report.data_sha256 and facts["data"]["rows_used"] == 40
    assert facts["metrics"]["heldout"]["new_nll"] == pytest.approx(report.heldout.new_nll)
    card = (folder / "MODEL_CARD.md").read_text()
    for needle in (report.version, report.base_version, report.data_sha256, str(data), "PASSED"):
        assert needle in card
    assert f"{report.heldout.new_nll:.4f}" in card
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tuned_engine(trained) -> AsyncIterator[object]:  # type: ignore[no-untyped-def]
    from inference.backends.torch import TorchEngine

    report = trained[0]
    engine = TorchEngine(report.model_dir, model_name="smollm2", model_version=report.version)
    await engine.start()
    yield engine
    await engine.stop()


@pytest.mark.slow
async def test_torch_engine_serves_the_new_model(tuned_engine) -> None:  # type: ignore[no-untyped-def]
    from inference.types import Completion, GenerationRequest, Sampling

    prompt = "What is 21 plus 17?"  # not in the training rows
    request = GenerationRequest(
        "r1",
        prompt,
        Sampling(max_new_tokens=16),
        prompt_ids=tuned_engine.encode_prompt(prompt, system=None, raw=False),
    )
    (completion,) = await tuned_engine.generate([request])
    assert isinstance(completion, Completion)
    print(f"\nfine-tuned answer: {completion.text!r}")
    assert completion.text.startswith("Answer:")  # the house style was learned
    assert FORMAT_TAIL in completion.text
    assert completion.finish_reason == "stop"  # and it stops at the end of the turn


@pytest.mark.slow
def test_registry_accepts_the_passed_model(trained, tmp_path: Path, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    report = trained[0]
    registry = ModelRegistry(tmp_path / "reg")
    base = registry.ensure_base(model_dir)
    assert registry.register(report.model_dir) == report.version
    assert [v.version for v in registry.versions()] == [base, report.version]
    assert registry.path(report.version).is_dir()


@pytest.mark.slow
def test_gate_refuses_and_runs_are_deterministic(model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "examples.jsonl", synthetic_rows(40))
    settings = dict(epochs=1, max_examples=10, batch_size=8, min_improvement=100.0, seed=3)
    first = retrain(data, model_dir, tmp_path / "one", **settings)  # type: ignore[arg-type]
    assert not first.passed
    with pytest.raises(GateRefused, match=r"refused: held-out NLL .* vs base .*required >= 100"):
        gate(first)
    try:
        gate(first)
    except GateRefused as exc:
        assert exc.report is first and exc.reason_code == "gate_refused"
    # The refused model is written for inspection, marked, and the registry will not take it.
    facts = json.loads((tmp_path / "one" / "retrain.json").read_text())
    assert facts["gate"]["passed"] is False
    assert "REJECTED" in (tmp_path / "one" / "MODEL_CARD.md").read_text()
    with pytest.raises(RejectedModelError):
        ModelRegistry(tmp_path / "reg").register(tmp_path / "one")

    second = retrain(data, model_dir, tmp_path / "two", **settings)  # type: ignore[arg-type]
    assert second.version == first.version
    assert second.losses == first.losses
    assert second.heldout.new_nll == pytest.approx(first.heldout.new_nll, rel=1e-5)
    assert second.heldout.base_nll == first.heldout.base_nll
