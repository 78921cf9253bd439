"""``sluice top``: a live terminal view of a Sluice deployment for an operator without
Grafana: worker groups and their members, partitions and lag, the latest windows of
``llm.metrics`` (throughput, latency, batch sizes, errors, feedback, monitors) and the
rollout on ``llm.control``. :mod:`.gather` reads the broker, :mod:`.render` draws (pure),
:func:`run_top` loops."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from rich.console import Console
from rich.live import Live

from connectors.top.gather import TopError, take_snapshot
from connectors.top.render import render
from connectors.top.snapshot import Snapshot
from schemas.codec import AvroCodec
from streams.settings import Settings

__all__ = ["TopError", "run_top"]


def run_top(
    settings: Settings,
    bootstrap: str,
    codec: AvroCodec,
    console: Console,
    *,
    once: bool = False,
    interval_s: float = 2.0,
) -> Snapshot:
    """Print one snapshot (``once``) or refresh one every ``interval_s`` until Ctrl-C;
    returns the last snapshot."""
    alpha = settings.monitor_alpha
    if once:
        snapshot = asyncio.run(take_snapshot(settings, bootstrap, codec))  # TopError: exit 1
        console.print(render(snapshot, drift_alpha=alpha))
        return snapshot
    snapshot = Snapshot(int(time.time() * 1000), bootstrap, errors=("connecting…",))

    async def loop() -> Snapshot:
        nonlocal snapshot
        with Live(render(snapshot, drift_alpha=alpha), console=console, screen=False) as live:
            while True:
                try:
                    snapshot = await take_snapshot(settings, bootstrap, codec)
                    shown = snapshot
                except TopError as exc:  # the broker gone: keep the last view, say why
                    shown = replace(snapshot, errors=(*snapshot.errors, str(exc)))
                live.update(render(shown, drift_alpha=alpha))
                await asyncio.sleep(interval_s)

    try:
        return asyncio.run(loop())
    except KeyboardInterrupt:
        return snapshot
