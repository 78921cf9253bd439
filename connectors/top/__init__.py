"""``sluice top``: a live terminal view of a Sluice deployment for an operator without
Grafana: worker groups and their members, partitions and lag, the latest windows of
``llm.metrics`` (throughput, latency, batch sizes, errors, feedback, monitors) and the
rollout on ``llm.control``. :mod:`.gather` reads the broker, :mod:`.render` draws (pure),
:func:`run_top` loops."""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.live import Live

from connectors.top.gather import gather
from connectors.top.render import render
from connectors.top.snapshot import Snapshot
from schemas.codec import AvroCodec
from streams.settings import Settings


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
    snapshot = asyncio.run(gather(settings, bootstrap, codec))
    if once:
        console.print(render(snapshot, drift_alpha=alpha))
        return snapshot

    async def loop() -> Snapshot:
        nonlocal snapshot
        with Live(render(snapshot, drift_alpha=alpha), console=console, screen=False) as live:
            while True:
                await asyncio.sleep(interval_s)
                snapshot = await gather(settings, bootstrap, codec)
                live.update(render(snapshot, drift_alpha=alpha))

    try:
        return asyncio.run(loop())
    except KeyboardInterrupt:
        return snapshot
