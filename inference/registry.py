"""A model registry on disk: the model versions that exist, their folders and metadata.

It holds no rollout state: which version serves, which is on trial and with what share is
the fold of the ``llm.control`` topic (``streams/rollout.py``, ``docs/rollout.md``).

Layout under ``root``::

    root/registry.json            the index (below), replaced atomically on every change
    root/registry.lock            fcntl lock file: one writer at a time across processes
    root/versions/<version>/      a plain HF model folder + SLUICE_VERSION + MODEL_CARD.md

``registry.json``::

    {"versions": {"v1": {"registered_at": ..., "source": ..., "metadata": {...}}, ...}}

Files written by earlier releases also carry rollout fields (``current``, ``candidate``,
``canary_percent``, ``previous``, ``history``); they are read without complaint, ignored,
and dropped at the next write.

Writers take an exclusive ``flock`` on ``registry.lock``, re-read the json, change it and
write it to a temporary file in ``root`` that is fsynced and ``os.replace``-d over the old
one; readers need no lock, since they see either the old or the new file, never half of one.
Model folders are copied into a hidden staging folder *outside* the lock (copying 500 MB
takes a while) and renamed into ``versions/`` under it, so a version folder is either
complete or absent.

A folder written by ``sluice retrain`` whose ``retrain.json`` says the evaluation gate
refused it is not registered unless ``force=True``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.backends.model_files import VERSION_FILE, model_version
from schemas.errors import SluiceError

STATE_FILE = "registry.json"
LOCK_FILE = "registry.lock"
VERSIONS_DIR = "versions"
MODEL_CARD_FILE = "MODEL_CARD.md"
RETRAIN_REPORT_FILE = "retrain.json"
#: Rollout fields of registry files from earlier releases: ignored, dropped on write.
LEGACY_KEYS = ("current", "candidate", "canary_percent", "previous", "history")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,199}$")


# -- errors ----------------------------------------------------------------------------
class ModelRegistryError(SluiceError):
    """Base of model-registry errors (not the Avro schema registry's ``RegistryError``)."""

    reason_code = "model_registry_error"


# The name the rest of the code base uses; schemas.errors.RegistryError is the unrelated
# (and retriable) Confluent Schema Registry error.
RegistryError = ModelRegistryError


class UnknownVersionError(ModelRegistryError):
    reason_code = "unknown_model_version"


class DuplicateVersionError(ModelRegistryError):
    reason_code = "duplicate_model_version"


class InvalidModelFolderError(ModelRegistryError):
    reason_code = "invalid_model_folder"


class RejectedModelError(ModelRegistryError):
    """The folder's retrain report says the evaluation gate refused it."""

    reason_code = "model_rejected"


# -- values ----------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path
    registered_at: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _empty_doc() -> dict[str, Any]:
    return {"versions": {}}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# -- the registry ----------------------------------------------------------------------
class ModelRegistry:
    """Model versions on disk, safe for several processes at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS_DIR
        self.state_file = self.root / STATE_FILE
        self.lock_file = self.root / LOCK_FILE

    # -- reading -----------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """Every registered version, oldest first."""
        doc = self._read()
        return [self._info(doc, v) for v in doc["versions"]]

    def info(self, version: str) -> VersionInfo:
        doc = self._read()
        self._require(doc, version)
        return self._info(doc, version)

    def path(self, version: str) -> Path:
        """The model folder of a registered version (which must still be on disk)."""
        self._require(self._read(), version)
        folder = self.versions_dir / version
        if not folder.is_dir():
            raise InvalidModelFolderError(
                f"model version {version!r} is registered but its folder {folder} is gone"
            )
        return folder

    def __contains__(self, version: object) -> bool:
        return isinstance(version, str) and version in self._read()["versions"]

    # -- registering -------------------------------------------------------------------
    def register(
        self,
        folder: Path,
        version: str | None = None,
        *,
        move: bool = False,
        metadata: dict[str, Any] | None = None,
        force: bool = False,
    ) -> str:
        """Copy (or with ``move``, move) a model folder in; returns its version.

        The version is ``version`` if given, else the folder's ``SLUICE_VERSION`` (or
        :func:`model_version`'s digest). The stored folder gets ``SLUICE_VERSION`` set to
        it and a ``MODEL_CARD.md`` if it has none. ``force`` registers a folder whose
        retrain report says the evaluation gate refused it.
        """
        folder = Path(folder)
        self._check_folder(folder, force=force)
        version = version if version is not None else model_version(folder)
        _check_version_name(version)
        if version in self:
            raise DuplicateVersionError(
                f"model version {version!r} is already registered at {self.versions_dir / version}"
            )
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=self.versions_dir))
        try:
            target = staging / "model"
            if move:
                shutil.move(str(folder), target)
            else:
                shutil.copytree(folder, target, symlinks=False)
            (target / VERSION_FILE).write_text(version + "\n")
            meta = dict(metadata or {})
            if not (target / MODEL_CARD_FILE).is_file():
                (target / MODEL_CARD_FILE).write_text(_minimal_card(version, folder, meta))
            with self._locked() as doc:
                if version in doc["versions"] or (self.versions_dir / version).exists():
                    raise DuplicateVersionError(
                        f"model version {version!r} is already registered "
                        f"at {self.versions_dir / version}"
                    )
                target.rename(self.versions_dir / version)
                doc["versions"][version] = {
                    "registered_at": _now(),
                    "source": str(folder.resolve()),
                    "metadata": meta,
                }
        except BaseException:
            if move and (staging / "model").exists() and not folder.exists():
                shutil.move(str(staging / "model"), folder)  # give the caller its folder back
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    def ensure_base(self, folder: Path) -> str:
        """Register the base model once (so it can be LOADed by name); returns its version.

        Cheap when already done: only the folder's ``SLUICE_VERSION`` is read.
        """
        version = model_version(Path(folder))
        if version not in self:
            try:
                self.register(folder, version, metadata={"role": "base"})
            except DuplicateVersionError:
                pass  # another process registered it meanwhile
        return version

    # -- internals ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Exclusive lock; yields the current document and writes it back on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.lock_file.open("a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                doc = self._read()
                yield doc
                self._write(doc)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return _empty_doc()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelRegistryError(f"{self.state_file} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("versions", {}), dict):
            raise ModelRegistryError(f"{self.state_file} is not a model registry index")
        merged = _empty_doc()
        merged.update({k: v for k, v in doc.items() if k not in LEGACY_KEYS})
        return merged

    def _write(self, doc: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=self.root)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=2)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _require(self, doc: dict[str, Any], version: str) -> None:
        if version not in doc["versions"]:
            known = ", ".join(doc["versions"]) or "none"
            raise UnknownVersionError(
                f"unknown model version {version!r} in {self.root} (registered: {known})"
            )

    def _info(self, doc: dict[str, Any], version: str) -> VersionInfo:
        entry = doc["versions"][version]
        return VersionInfo(
            version=version,
            path=self.versions_dir / version,
            registered_at=entry.get("registered_at", ""),
            source=entry.get("source", ""),
            metadata=dict(entry.get("metadata", {})),
        )

    def _check_folder(self, folder: Path, *, force: bool) -> None:
        if not folder.is_dir():
            raise InvalidModelFolderError(f"{folder} is not a folder")
        if not (folder / "config.json").is_file():
            raise InvalidModelFolderError(
                f"{folder} is not a Hugging Face model folder (no config.json)"
            )
        report = folder / RETRAIN_REPORT_FILE
        if force or not report.is_file():
            return
        try:
            gate = json.loads(report.read_text()).get("gate", {})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise InvalidModelFolderError(f"{report} is not valid JSON") from exc
        if gate.get("passed") is False:
            raise RejectedModelError(
                f"{folder} failed its evaluation gate (held-out NLL "
                f"{gate.get('new_heldout_nll')} vs base {gate.get('base_heldout_nll')}, "
                f"min improvement {gate.get('min_improvement')}); pass force=True to register "
                "it anyway"
            )


def _check_version_name(version: str) -> None:
    if not isinstance(version, str) or not _VERSION_RE.match(version) or ".." in version:
        raise ModelRegistryError(
            f"invalid model version {version!r}: use letters, digits, '.', '_', '+' and '-' "
            "(up to 200 characters, starting with a letter or digit)"
        )


def _minimal_card(version: str, folder: Path, metadata: dict[str, Any]) -> str:
    lines = [
        f"# {version}",
        "",
        f"Registered from `{folder.resolve()}` on {_now()}.",
    ]
    if metadata:
        lines += ["", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metadata.items()]
    return "\n".join(lines) + "\n"
