"""Print the requirements of Sluice that the running Python environment does not satisfy.

NVIDIA's TensorRT-LLM release image ships its own builds of torch, transformers and
tensorrt_llm (versions like ``2.8.0a0+5228986c39.nv25.6``). A plain ``pip install .`` could
swap them for PyPI builds and break the image. ``Dockerfile.gpu`` therefore installs Sluice
with ``--no-deps`` plus only what this script prints: requirements that are missing or at
a version outside Sluice's range. Installed pre-releases count as satisfying (the image's
builds are pre-release-numbered). A requirement on a package in ``--keep`` that the image
lacks or has at a wrong version is an error (exit status 2): the image tag does not match.

    python gpu_requirements.py pyproject.toml --extra tensorrt --keep torch tensorrt-llm
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirements(pyproject: Path, extras: list[str]) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += project.get("optional-dependencies", {})[extra]
    return [Requirement(line) for line in lines]


def unmet(reqs: list[Requirement], keep: set[str]) -> tuple[list[str], list[str]]:
    """(requirements to install, conflicts with packages the image must keep)."""
    to_install: list[str] = []
    conflicts: list[str] = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            if canonicalize_name(req.name) in keep:
                conflicts.append(f"{req.name} is not installed: the base image must provide {req}")
            else:
                to_install.append(str(req))
            continue
        if req.specifier.contains(installed, prereleases=True):
            continue
        if canonicalize_name(req.name) in keep:
            conflicts.append(f"{req.name} {installed} is installed but Sluice needs {req}")
        else:
            to_install.append(str(req))
    return to_install, conflicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="Optional extra to include.")
    parser.add_argument(
        "--keep", nargs="*", default=[], help="Packages the image provides and pip must not touch."
    )
    args = parser.parse_args(argv)
    keep = {canonicalize_name(name) for name in args.keep}
    to_install, conflicts = unmet(requirements(args.pyproject, args.extra), keep)
    if conflicts:
        for line in conflicts:
            print(f"error: {line}", file=sys.stderr)
        return 2
    for line in to_install:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
