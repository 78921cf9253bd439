"""The on-disk model registry: versions and metadata (no rollout state), persistence, atomic
writes, errors, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from inference.backends.model_files import VERSION_FILE, model_version
from inference.registry import (
    DuplicateVersionError,
    InvalidModelFolderError,
    ModelRegistry,
    ModelRegistryError,
    RegistryError,
    RejectedModelError,
    UnknownVersionError,
)
from schemas.errors import SluiceError


def fake_model(parent: Path, name: str, version: str | None = None) -> Path:
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "name": name}))
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "tokenizer.json").write_text("{}")
    if version is not None:
        (folder / VERSION_FILE).write_text(version + "\n")
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


def test_errors_are_sluice_errors() -> None:
    assert RegistryError is ModelRegistryError
    for error in (
        UnknownVersionError,
        DuplicateVersionError,
        RejectedModelError,
        InvalidModelFolderError,
    ):
        assert issubclass(error, ModelRegistryError)
        assert issubclass(error, SluiceError)


def test_empty_registry(registry: ModelRegistry) -> None:
    assert registry.versions() == []
    assert "anything" not in registry
    assert not registry.state_file.exists()  # reading never writes


def test_register_copies_folder_and_reads_version(tmp_path: Path, registry: ModelRegistry) -> None:
    source = fake_model(tmp_path, "base", version="base-v1")
    version = registry.register(source, metadata={"note": "hello"})
    assert version == "base-v1"
    stored = registry.path(version)
    assert stored == registry.root / "versions" / "base-v1"
    weights = "model.safetensors"
    assert (stored / weights).read_bytes() == (source / weights).read_bytes()
    assert model_version(stored) == "base-v1"
    assert "base-v1" in (stored / "MODEL_CARD.md").read_text()
    assert source.is_dir()  # copied, not moved
    [info] = registry.versions()
    assert info.version == "base-v1" and info.metadata == {"note": "hello"}
    assert info.source == str(source.resolve())
    assert "base-v1" in registry


def test_register_with_given_version_and_move(tmp_path: Path, registry: ModelRegistry) -> None:
    source = fake_model(tmp_path, "ft", version="ignored")
    (source / "MODEL_CARD.md").write_text("# my own card\n")
    version = registry.register(source, "ft-1", move=True)
    assert version == "ft-1"
    assert not source.exists()
    stored = registry.path("ft-1")
    assert (stored / VERSION_FILE).read_text().strip() == "ft-1"
    assert (stored / "MODEL_CARD.md").read_text() == "# my own card\n"  # kept as written


def test_register_without_sluice_version_uses_digest(
    tmp_path: Path, registry: ModelRegistry
) -> None:
    source = fake_model(tmp_path, "plain")
    version = registry.register(source)
    assert version == model_version(source)
    assert version.startswith("plain-")


def test_duplicate_version_refused(tmp_path: Path, registry: ModelRegistry) -> None:
    registry.register(fake_model(tmp_path, "a", version="v1"))
    moved = fake_model(tmp_path, "b", version="v1")
    with pytest.raises(DuplicateVersionError, match="v1.*already registered"):
        registry.register(moved, move=True)
    assert moved.is_dir()  # a refused move leaves the caller's folder where it was
    assert len(registry.versions()) == 1
    leftovers = [p.name for p in registry.versions_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 201, "sp ace"])
def test_invalid_version_names(tmp_path: Path, registry: ModelRegistry, bad: str) -> None:
    with pytest.raises(ModelRegistryError, match="invalid model version"):
        registry.register(fake_model(tmp_path, "m"), bad)


def test_invalid_folders(tmp_path: Path, registry: ModelRegistry) -> None:
    with pytest.raises(InvalidModelFolderError, match="not a folder"):
        registry.register(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidModelFolderError, match="no config.json"):
        registry.register(empty)


def test_rejected_retrain_output_needs_force(tmp_path: Path, registry: ModelRegistry) -> None:
    folder = fake_model(tmp_path, "ft", version="ft-bad")
    gate = {"passed": False, "base_heldout_nll": 1.0, "new_heldout_nll": 1.5, "min_improvement": 0}
    (folder / "retrain.json").write_text(json.dumps({"gate": gate}))
    with pytest.raises(RejectedModelError, match=r"1\.5 vs base 1\.0"):
        registry.register(folder)
    assert registry.register(folder, force=True) == "ft-bad"


def test_ensure_base_once(tmp_path: Path, registry: ModelRegistry) -> None:
    base = fake_model(tmp_path, "base", version="base-v1")
    assert registry.ensure_base(base) == "base-v1"
    assert registry.info("base-v1").metadata == {"role": "base"}
    stamp = registry.state_file.stat().st_mtime_ns
    copied = registry.path("base-v1") / "model.safetensors"
    inode = copied.stat().st_ino
    # Second call: no new copy, the index not even rewritten.
    assert registry.ensure_base(base) == "base-v1"
    assert copied.stat().st_ino == inode
    assert len(registry.versions()) == 1
    assert registry.state_file.stat().st_mtime_ns == stamp
    assert not copied.is_symlink()


def test_registry_has_no_rollout_state(tmp_path: Path, registry: ModelRegistry) -> None:
    """Which version serves is the control topic's fold (streams/rollout.py), not ours."""
    for name in ("state", "set_candidate", "set_canary", "promote", "rollback"):
        assert not hasattr(registry, name), name
    registry.ensure_base(fake_model(tmp_path, "base", version="v0"))
    registry.register(fake_model(tmp_path, "one", version="v1"), metadata={"k": 1})
    on_disk = json.loads(registry.state_file.read_text())
    assert set(on_disk) == {"versions"}
    assert set(on_disk["versions"]) == {"v0", "v1"}
    assert not hasattr(registry.info("v1"), "role")


LEGACY_FILE = {
    "current": "v1",
    "candidate": "v2",
    "canary_percent": 20,
    "previous": ["v0"],
    "versions": {
        "v1": {"registered_at": "2026-11-01T00:00:00.000+00:00", "source": "/x", "metadata": {}},
        "v2": {"registered_at": "2026-11-02T00:00:00.000+00:00", "source": "/y", "metadata": {}},
    },
    "history": [{"at": "2026-11-01T00:00:00.000+00:00", "event": "register", "version": "v1"}],
}


def test_old_registry_files_are_read_and_their_rollout_fields_dropped(
    tmp_path: Path, registry: ModelRegistry
) -> None:
    registry.root.mkdir(parents=True)
    registry.state_file.write_text(json.dumps(LEGACY_FILE))
    for version in ("v1", "v2"):
        fake_model(registry.versions_dir, version, version=version)
    assert [v.version for v in registry.versions()] == ["v1", "v2"]
    assert registry.info("v2").registered_at.startswith("2026-11-02")
    assert registry.path("v1") == registry.versions_dir / "v1"
    assert registry.state_file.read_text() == json.dumps(LEGACY_FILE)  # reading never writes
    registry.register(fake_model(tmp_path, "three", version="v3"))
    on_disk = json.loads(registry.state_file.read_text())
    assert set(on_disk) == {"versions"}  # the old rollout fields are gone
    assert list(on_disk["versions"]) == ["v1", "v2", "v3"]
    assert on_disk["versions"]["v1"] == LEGACY_FILE["versions"]["v1"]


def test_lookups_fail_clearly(tmp_path: Path, registry: ModelRegistry) -> None:
    with pytest.raises(UnknownVersionError, match="unknown model version 'nope'.*registered: none"):
        registry.path("nope")
    registry.register(fake_model(tmp_path, "x", version="vx"))
    with pytest.raises(UnknownVersionError, match="registered: vx"):
        registry.info("nope")
    shutil.rmtree(registry.versions_dir / "vx")
    with pytest.raises(InvalidModelFolderError, match="'vx' is registered but its folder"):
        registry.path("vx")


def test_state_persists_across_instances(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    first = ModelRegistry(root)
    first.ensure_base(fake_model(tmp_path, "base", version="v0"))
    first.register(fake_model(tmp_path, "one", version="v1"), metadata={"k": 1})

    second = ModelRegistry(root)
    assert second.versions() == first.versions()
    assert [v.version for v in second.versions()] == ["v0", "v1"]
    assert second.info("v1").metadata == {"k": 1}


def test_writes_are_atomic(
    tmp_path: Path, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.ensure_base(fake_model(tmp_path, "base", version="v0"))
    before = registry.state_file.read_text()

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        registry.register(fake_model(tmp_path, "one", version="v1"))
    monkeypatch.undo()
    assert registry.state_file.read_text() == before  # old file untouched
    assert [p.name for p in registry.root.iterdir() if p.name.startswith(".registry-")] == []
    assert "v1" not in registry


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path, registry: ModelRegistry) -> None:
    registry.root.mkdir(parents=True)
    registry.state_file.write_text("{not json")
    with pytest.raises(ModelRegistryError, match="not valid JSON"):
        registry.versions()
    registry.state_file.write_text("[1, 2]")
    with pytest.raises(ModelRegistryError, match="not a model registry index"):
        registry.versions()


def _register_many(root: str, models: str, tag: str, count: int) -> None:
    reg = ModelRegistry(Path(root))
    for i in range(count):
        reg.register(Path(models) / f"{tag}{i}")


def test_concurrent_register_from_two_processes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    count = 6
    for tag in ("a", "b"):
        for i in range(count):
            fake_model(models, f"{tag}{i}", version=f"{tag}-v{i}")
    root = tmp_path / "reg"
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_register_many, args=(str(root), str(models), tag, count))
        for tag in ("a", "b")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    doc = json.loads((root / "registry.json").read_text())  # valid JSON
    expected = {f"{tag}-v{i}" for tag in ("a", "b") for i in range(count)}
    assert set(doc["versions"]) == expected
    assert {p.name for p in (root / "versions").iterdir()} == expected
    assert set(doc) == {"versions"}


def _register_same(root: str, folder: str, results: object) -> None:
    try:
        ModelRegistry(Path(root)).register(Path(folder))
        results.put("ok")  # type: ignore[attr-defined]
    except DuplicateVersionError:
        results.put("duplicate")  # type: ignore[attr-defined]


def test_concurrent_duplicate_register_only_one_wins(tmp_path: Path) -> None:
    folder = fake_model(tmp_path, "same", version="same-v")
    root = tmp_path / "reg"
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_register_same, args=(str(root), str(folder), results)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["duplicate", "duplicate", "ok"]
    assert [v.version for v in ModelRegistry(root).versions()] == ["same-v"]
