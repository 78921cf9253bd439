"""A model registry on disk: which versions exist, which one serves, which one is on trial.

Layout under ``root``::

    root/registry.json            the state (below), replaced atomically on every change
    root/registry.lock            fcntl lock file: one writer at a time across processes
    root/versions/<version>/      a plain HF model folder + SLUICE_VERSION + MODEL_CARD.md

``registry.json``::

    {"current": "v1", "candidate": "v2" | null, "canary_percent": 0..100,
     "previous": ["v0", ...],                 # stack of earlier currents, newest last
     "versions": {"v1": {"registered_at": ..., "source": ..., "metadata": {...}}, ...},
     "history": [{"at": ..., "event": "register" | "candidate" | "canary" | "promote"
                  | "rollback", "version": ..., ...}, ...]}

Writers take an exclusive ``flock`` on ``registry.lock``, re-read the json, change it and
write it to a temporary file in ``root`` that is fsynced and ``os.replace``-d over the old
one; readers need no lock, since they see either the old or the new file, never half of one.
Model folders are copied into a hidden staging folder *outside* the lock (copying 500 MB
takes a while) and renamed into ``versions/`` under it, so a version folder is either
complete or absent.

Life cycle: ``register`` a folder, ``set_candidate`` it, ``set_canary(percent)`` to send
it part of the traffic, then ``promote`` it (it becomes current; the old current goes on
the ``previous`` stack) or ``rollback`` (drops the candidate; with no candidate, restores
the previous current). Which requests a canary receives is the worker's business.

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
MAX_HISTORY = 1000
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


class NoCandidateError(ModelRegistryError):
    reason_code = "no_candidate"


class NothingToRollBackError(ModelRegistryError):
    reason_code = "nothing_to_roll_back"


# -- values ----------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path
    registered_at: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    role: str = "registered"  # "current" | "candidate" | "previous" | "registered"


@dataclass(frozen=True)
class RegistryState:
    current: str | None = None
    candidate: str | None = None
    canary_percent: int = 0
    previous: tuple[str, ...] = ()
    history: tuple[dict[str, Any], ...] = ()

    @property
    def empty(self) -> bool:
        return self.current is None and self.candidate is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "candidate": self.candidate,
            "canary_percent": self.canary_percent,
            "previous": list(self.previous),
            "history": [dict(h) for h in self.history],
        }


def _empty_doc() -> dict[str, Any]:
    return {
        "current": None,
        "candidate": None,
        "canary_percent": 0,
        "previous": [],
        "versions": {},
        "history": [],
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# -- the registry ----------------------------------------------------------------------
class ModelRegistry:
    """Versions on disk plus the serving state, safe for several processes at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS_DIR
        self.state_file = self.root / STATE_FILE
        self.lock_file = self.root / LOCK_FILE

    # -- reading -----------------------------------------------------------------------
    def state(self) -> RegistryState:
        doc = self._read()
        return RegistryState(
            current=doc["current"],
            candidate=doc["candidate"],
            canary_percent=int(doc["canary_percent"]),
            previous=tuple(doc["previous"]),
            history=tuple(doc["history"]),
        )

    def versions(self) -> list[VersionInfo]:
        """Every registered version, oldest first."""
        doc = self._read()
        return [self._info(doc, v) for v in doc["versions"]]

    def info(self, version: str) -> VersionInfo:
        doc = self._read()
        self._require(doc, version)
        return self._info(doc, version)

    def path(self, version: str) -> Path:
        """The model folder of a registered version."""
        self._require(self._read(), version)
        return self.versions_dir / version

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
                _event(doc, "register", version, source=str(folder.resolve()))
        except BaseException:
            if move and (staging / "model").exists() and not folder.exists():
                shutil.move(str(staging / "model"), folder)  # give the caller its folder back
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    def ensure_base(self, folder: Path) -> str:
        """Register the base model once; it becomes current if nothing is current.

        Cheap when already done: only the folder's ``SLUICE_VERSION`` is read.
        """
        version = model_version(Path(folder))
        doc = self._read()
        if version in doc["versions"] and doc["current"] is not None:
            return version
        if version not in doc["versions"]:
            try:
                self.register(folder, version, metadata={"role": "base"})
            except DuplicateVersionError:
                pass  # another process registered it meanwhile
        with self._locked() as doc:
            if doc["current"] is None:
                doc["current"] = version
                _event(doc, "base", version)
        return version

    # -- life cycle --------------------------------------------------------------------
    def set_candidate(self, version: str) -> RegistryState:
        """Put a registered version on trial (canary 0% until ``set_canary``)."""
        with self._locked() as doc:
            self._require(doc, version)
            if version == doc["current"]:
                raise ModelRegistryError(f"{version!r} is already the current version")
            if doc["current"] is None:
                raise ModelRegistryError(
                    "no current version yet; register the base model first (ensure_base)"
                )
            doc["candidate"] = version
            doc["canary_percent"] = 0
            _event(doc, "candidate", version)
        return self.state()

    def set_canary(self, percent: int) -> RegistryState:
        """Send ``percent`` % of traffic to the candidate (0 stops the canary)."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise ModelRegistryError(f"canary percent must be an integer 0..100, not {percent!r}")
        with self._locked() as doc:
            if doc["candidate"] is None and percent:
                raise NoCandidateError("no candidate version; set one before starting a canary")
            doc["canary_percent"] = percent
            _event(doc, "canary", doc["candidate"], percent=percent)
        return self.state()

    def promote(self) -> RegistryState:
        """The candidate becomes current; the old current goes on the ``previous`` stack."""
        with self._locked() as doc:
            candidate = doc["candidate"]
            if candidate is None:
                raise NoCandidateError("no candidate version to promote")
            old = doc["current"]
            if old is not None:
                doc["previous"].append(old)
            doc["current"] = candidate
            doc["candidate"] = None
            doc["canary_percent"] = 0
            _event(doc, "promote", candidate, replaced=old)
        return self.state()

    def rollback(self) -> RegistryState:
        """Drop the candidate (and its canary); with none, restore the previous current."""
        with self._locked() as doc:
            if doc["candidate"] is not None:
                dropped = doc["candidate"]
                doc["candidate"] = None
                doc["canary_percent"] = 0
                _event(doc, "rollback", doc["current"], dropped_candidate=dropped)
            elif doc["previous"]:
                replaced = doc["current"]
                doc["current"] = doc["previous"].pop()
                _event(doc, "rollback", doc["current"], replaced=replaced)
            else:
                raise NothingToRollBackError(
                    "nothing to roll back: no candidate and no previous version "
                    f"(current is {doc['current']!r})"
                )
        return self.state()

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
        merged = _empty_doc()
        merged.update(doc)
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
        if version == doc["current"]:
            role = "current"
        elif version == doc["candidate"]:
            role = "candidate"
        elif version in doc["previous"]:
            role = "previous"
        else:
            role = "registered"
        return VersionInfo(
            version=version,
            path=self.versions_dir / version,
            registered_at=entry.get("registered_at", ""),
            source=entry.get("source", ""),
            metadata=dict(entry.get("metadata", {})),
            role=role,
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


def _event(doc: dict[str, Any], event: str, version: str | None, **extra: Any) -> None:
    doc["history"].append({"at": _now(), "event": event, "version": version, **extra})
    del doc["history"][:-MAX_HISTORY]


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
