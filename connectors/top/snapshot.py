"""What ``sluice top`` shows, as plain values: one :class:`Snapshot` per refresh.

Built by :mod:`connectors.top.gather` from the broker, drawn by :mod:`connectors.top.render`
(pure); tests build snapshots by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streams.rollout import RolloutState


@dataclass(frozen=True, slots=True)
class Member:
    """One consumer-group member (a worker process) and the partitions it owns."""

    client_id: str
    host: str
    partitions: tuple[tuple[str, int], ...] = ()
    member_id: str = ""

    @property
    def label(self) -> str:
        """The client id and the end of the member id (client ids repeat across workers)."""
        suffix = self.member_id[-6:]
        return f"{self.client_id}~{suffix}" if suffix else self.client_id


@dataclass(frozen=True, slots=True)
class Group:
    """A consumer group of one worker role (inference, join, metrics)."""

    group_id: str
    role: str
    state: str
    members: tuple[Member, ...] = ()


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """A partition a group reads: its end offset, the group's committed offset, the owner."""

    group_id: str
    topic: str
    partition: int
    end_offset: int
    committed: int | None
    owner: str | None = None

    @property
    def lag(self) -> int:
        """Records not yet committed by the group (all of them when nothing is)."""
        return max(self.end_offset - (self.committed or 0), 0)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one refresh of ``sluice top`` found."""

    taken_at_ms: int
    bootstrap: str
    groups: tuple[Group, ...] = ()
    partitions: tuple[PartitionLag, ...] = ()
    windows: tuple[dict[str, Any], ...] = ()  # the latest base window per model/version
    rollout: RolloutState | None = None  # None: llm.control not read (or missing)
    control_commands: int = 0
    last_decision: dict[str, Any] | None = None  # the last command with evidence
    errors: tuple[str, ...] = field(default_factory=tuple)


def latest_windows(windows: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    """The newest base window (the shortest ``length_s``; no corrections) of every
    model/version/tenant, sorted by model, version and tenant."""
    chosen = [w for w in windows if not w.get("correction")]
    if not chosen:
        return ()
    length = min(int(w.get("length_s") or 0) for w in chosen)
    newest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for window in chosen:
        if int(window.get("length_s") or 0) != length:
            continue
        key = (
            str(window.get("model") or ""),
            str(window.get("model_version") or ""),
            str(window.get("tenant") or ""),
        )
        if key not in newest or _start(window) >= _start(newest[key]):
            newest[key] = dict(window)
    return tuple(newest[key] for key in sorted(newest))


def _start(window: Mapping[str, Any]) -> int:
    start = window.get("window_start") or 0
    return start if isinstance(start, int) else int(start.timestamp() * 1000)
