"""Draws a :class:`~connectors.top.snapshot.Snapshot` with ``rich``. Pure: a snapshot in,
a renderable out (no I/O, no clock).

Monitor fields of ``MetricsWindow`` are optional: the known ones (drift p-value, refusal,
empty and length-finish rates, response length drift) are shown when a window has them,
and so is any other numeric field the schema gains that this module does not know.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from rich.console import Group as RenderGroup
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from connectors.top.snapshot import PartitionLag, Snapshot

#: The MetricsWindow fields that are not monitors (shown in their own columns, or internal).
BASE_FIELDS = frozenset(
    {
        "window_id",
        "window_start",
        "window_end",
        "length_s",
        "model",
        "model_version",
        "tenant",
        "correction",
        "records",
        "late_records",
        "requests",
        "requests_total",
        "dead_letters",
        "dead_letters_total",
        "latency",
        "prompt_tokens",
        "completion_tokens",
        "tokens_per_s",
        "batches",
        "batch_size_mean",
        "batch_size_max",
        "feedback_count",
        "feedback_score_sum",
        "feedback_mean_score",
        "closed_at",
        "worker",
    }
)
#: Monitor fields with a short label, in display order; rates are shown as percentages.
MONITORS = (
    ("prompt_drift_p_value", "drift p"),
    ("prompt_drift", "drift"),
    ("response_length_drift", "len drift"),
    ("refusal_rate", "refusal"),
    ("empty_rate", "empty"),
    ("length_finish_rate", "len-finish"),
)


def render(snapshot: Snapshot, *, drift_alpha: float = 0.01) -> RenderableType:
    """The whole screen: header, rollout, workers, partitions and lag, windows."""
    parts: list[RenderableType] = [_header(snapshot), _rollout(snapshot)]
    parts.append(_workers(snapshot))
    parts.append(_partitions(snapshot))
    parts.append(_windows(snapshot, drift_alpha))
    for error in snapshot.errors:
        parts.append(Text(f"! {error}", style="yellow"))
    return RenderGroup(*parts)


def _header(snapshot: Snapshot) -> Text:
    at = datetime.fromtimestamp(snapshot.taken_at_ms / 1000, tz=UTC).strftime("%H:%M:%SZ")
    members = sum(len(g.members) for g in snapshot.groups)
    lag = sum(p.lag for p in snapshot.partitions if p.group_id == _inference_group(snapshot))
    return Text.assemble(
        ("sluice top", "bold"),
        f"  {snapshot.bootstrap}  {at}  workers {members}  request lag {lag}",
    )


def _inference_group(snapshot: Snapshot) -> str | None:
    for group in snapshot.groups:
        if group.role == "inference":
            return group.group_id
    return None


def _version(version: str | None) -> str:
    return "base" if version is None else version


def _rollout(snapshot: Snapshot) -> RenderableType:
    state = snapshot.rollout
    if state is None:
        return Text("rollout: llm.control not read (every worker serves its configured model)")
    line = f"rollout: current {_version(state.current)}"
    if state.candidate is not None:
        line += (
            f", candidate {state.candidate} at {state.canary_percent}% "
            f"(base {100 - state.canary_percent}%)"
        )
    else:
        line += ", no candidate"
    if state.previous:
        line += ", previous " + ", ".join(_version(v) for v in state.previous)
    line += f"  [{snapshot.control_commands} commands]"
    text = Text(line)
    decision = snapshot.last_decision
    if decision is not None:
        text.append("\nlast auto decision: ", style="bold")
        text.append(_decision(decision))
    return text


def _decision(command: Mapping[str, Any]) -> str:
    try:
        evidence = json.loads(command.get("evidence") or "{}")
    except ValueError:
        return f"{command.get('command')} (evidence not JSON)"
    candidate = evidence.get("candidate") or {}
    base = evidence.get("base") or {}
    return (
        f"{command.get('command')} {candidate.get('version') or '?'} vs "
        f"{base.get('version') or 'base'}: {evidence.get('reason', '')} "
        f"(candidate {candidate.get('requests', '?')} results, "
        f"base {base.get('requests', '?')})"
    )


def _workers(snapshot: Snapshot) -> Table:
    table = Table(title="Workers (consumer groups)", title_justify="left", expand=False)
    for column in ("role", "group", "state", "member", "host", "partitions"):
        table.add_column(column)
    if not snapshot.groups:
        table.add_row("-", "-", "no groups", "", "", "")
    for group in snapshot.groups:
        if not group.members:
            table.add_row(group.role, group.group_id, group.state, "-", "", "")
        for member in group.members:
            owned = owned_partitions(member.partitions, internal_prefix=f"{group.group_id}-")
            table.add_row(group.role, group.group_id, group.state, member.label, member.host, owned)
    return table


def owned_partitions(partitions: Iterable[tuple[str, int]], internal_prefix: str = "") -> str:
    """``topic 0,1 · other 3`` for a member's partitions; Faust's internal topics (named
    after the group) are left out."""
    by_topic: dict[str, list[int]] = {}
    for topic, partition in partitions:
        if internal_prefix and topic.startswith(internal_prefix):
            continue
        by_topic.setdefault(topic, []).append(partition)
    return (
        " · ".join(
            f"{topic} {','.join(str(p) for p in sorted(parts))}"
            for topic, parts in sorted(by_topic.items())
        )
        or "-"
    )


def _partitions(snapshot: Snapshot) -> Table:
    table = Table(title="Partitions and lag", title_justify="left")
    for column, justify in (
        ("group", "left"),
        ("topic", "left"),
        ("partition", "right"),
        ("end", "right"),
        ("committed", "right"),
        ("lag", "right"),
        ("owner", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    rows: list[PartitionLag] = sorted(
        snapshot.partitions, key=lambda p: (p.group_id, p.topic, p.partition)
    )
    for p in rows:
        table.add_row(
            p.group_id,
            p.topic,
            str(p.partition),
            str(p.end_offset),
            "-" if p.committed is None else str(p.committed),
            Text(str(p.lag), style="red" if p.lag > 100 else ""),
            p.owner or "-",
        )
    if not rows:
        table.add_row("-", "-", "", "", "", "", "")
    return table


def _windows(snapshot: Snapshot, drift_alpha: float) -> Table:
    table = Table(title="Latest windows (llm.metrics)", title_justify="left")
    for column, justify in (
        ("window", "left"),
        ("model/version", "left"),
        ("share", "right"),
        ("req", "right"),
        ("req/s", "right"),
        ("tok/s", "right"),
        ("p50", "right"),
        ("p99", "right"),
        ("batch", "right"),
        ("errors", "right"),
        ("dlq", "right"),
        ("feedback", "right"),
        ("monitors", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    served = [w for w in snapshot.windows if w.get("model")]
    total = sum(int(w.get("requests_total") or 0) for w in served)
    for window in snapshot.windows:
        requests = int(window.get("requests_total") or 0)
        length = int(window.get("length_s") or 1)
        latency = (window.get("latency") or {}).get("total") or {}
        by_status = window.get("requests") or {}
        bad = sum(int(by_status.get(s, 0)) for s in ("ERROR", "EXPIRED"))
        mean = window.get("batch_size_mean")
        score = window.get("feedback_mean_score")
        name = f"{window.get('model') or '(no model)'}/{window.get('model_version') or '-'}"
        if window.get("tenant"):
            name += f" [{window['tenant']}]"
        table.add_row(
            f"{_clock(window.get('window_start'))} {length}s",
            name,
            f"{requests / total:.0%}" if window.get("model") and total else "",
            str(requests),
            f"{requests / length:.1f}",
            f"{float(window.get('tokens_per_s') or 0.0):.1f}",
            _ms(latency.get("p50_ms")),
            _ms(latency.get("p99_ms")),
            "-" if mean is None else f"{mean:.1f}/{window.get('batch_size_max', 0)}",
            Text(str(bad), style="red" if bad else ""),
            str(window.get("dead_letters_total") or 0),
            f"{window.get('feedback_count', 0)}" + ("" if score is None else f" ({score:+.2f})"),
            monitors(window, drift_alpha),
        )
    if not snapshot.windows:
        table.add_row("no closed window yet", "", "", "", "", "", "", "", "", "", "", "", "")
    return table


def monitors(window: Mapping[str, Any], drift_alpha: float = 0.01) -> Text:
    """The monitor readings a window has (known fields first, then unknown numeric ones);
    a prompt drift p-value below ``drift_alpha`` is flagged DRIFT."""
    text = Text()
    for name, label in MONITORS:
        value = window.get(name)
        if value is None:
            continue
        if name == "prompt_drift_p_value":
            flagged = value < drift_alpha
            _add(text, f"{label} {value:.3f}" + (" DRIFT" if flagged else ""), flagged)
        elif name.endswith("_rate"):
            _add(text, f"{label} {value:.1%}", False)
        else:
            _add(text, f"{label} {value:.3g}", False)
    known = BASE_FIELDS | {name for name, _ in MONITORS}
    for name in sorted(set(window) - known):
        value = window[name]
        if isinstance(value, bool):
            _add(text, f"{name} {'yes' if value else 'no'}", value)
        elif isinstance(value, int | float):
            _add(text, f"{name} {value:.3g}", False)
    return text if text.plain else Text("-")


def _add(text: Text, part: str, alarm: bool) -> None:
    if text.plain:
        text.append("  ")
    text.append(part, style="bold red" if alarm else "")


def _clock(start: Any) -> str:
    if start is None:
        return "-"
    if not isinstance(start, int):
        start = int(start.timestamp() * 1000)
    return datetime.fromtimestamp(start / 1000, tz=UTC).strftime("%H:%M:%S")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f}s"
    return f"{value:.0f}ms" if value >= 10 else f"{value:.1f}ms"
