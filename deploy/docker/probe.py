"""Health probes for a Sluice worker container, read from its own Prometheus endpoint.

Standard library only: it runs inside the CPU and the GPU images, as a Docker HEALTHCHECK and
as Kubernetes exec probes.

    python probe.py ready   # /metrics answers and a model is being served (sluice_model_info 1)
    python probe.py live    # /metrics answers and the intake is not stalled

``live`` is what "agents can die without a sound" (docs/delivery.md) calls for: a Faust agent
that stopped leaves the process, and its /metrics thread, running. The probe remembers
``sluice_commits_total`` between runs (in ``--state``); when the worker reports consumer lag
but has not committed anything for ``--stall-seconds``, the worker is declared dead and the
orchestrator restarts it (a restart is safe: uncommitted requests are re-read and the
answered index recognises those already answered).

Known false positive: ``sluice_consumer_lag`` keeps its last value for a partition this
worker lost in a rebalance, so a worker left with idle partitions can look stalled and get
one unnecessary restart. Keep ``--stall-seconds`` well above your longest batch.

The port comes from ``SLUICE_METRICS_PORT`` (default 9464). Exit status 0 = healthy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_PORT = 9464


def scrape(url: str, timeout: float) -> dict[str, float]:
    """``{"name{labels}": value}`` for every sample of the text exposition at ``url``."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    return parse_samples(text)


def parse_samples(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        # name{labels} value [timestamp]; label values may hold spaces, so split after "}"
        cut = line.rfind("}") + 1 or line.find(" ")
        series, fields = line[:cut].strip(), line[cut:].split()
        try:
            samples[series] = float(fields[0])
        except (IndexError, ValueError):
            continue
    return samples


def total(samples: dict[str, float], name: str) -> float | None:
    """Sum of the samples of metric ``name`` (any labels); None when it has none."""
    values = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


def check_ready(samples: dict[str, float]) -> tuple[bool, str]:
    serving = [k for k, v in samples.items() if k.startswith("sluice_model_info{") and v == 1]
    if not serving:
        return False, "no model served yet (no sluice_model_info sample with value 1)"
    return True, "serving " + ", ".join(serving)


def check_live(
    samples: dict[str, float], state_file: Path, stall_seconds: float, now: float
) -> tuple[bool, str]:
    """Stalled = lag > 0 and ``sluice_commits_total`` unchanged for ``stall_seconds``."""
    lag = total(samples, "sluice_consumer_lag") or 0.0
    commits = total(samples, "sluice_commits_total") or 0.0
    # The counter's creation time tells a restarted worker (commits back at 0) from the one
    # the state was saved for: /tmp survives a container restart.
    epoch = total(samples, "sluice_commits_created")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    moved = state.get("commits") != commits or state.get("epoch") != epoch
    if lag <= 0 or moved or "since" not in state:
        state = {"commits": commits, "epoch": epoch, "since": now}
        try:
            state_file.write_text(json.dumps(state))
        except OSError as exc:  # a read-only /tmp must not make the worker look dead
            return True, f"progress (state not saved: {exc})"
        return True, f"progress: lag {lag:.0f}, commits {commits:.0f}"
    stalled_for = now - float(state["since"])
    if stalled_for > stall_seconds:
        return False, (
            f"intake stalled: lag {lag:.0f} and no offset commit for {stalled_for:.0f}s "
            f"(limit {stall_seconds:.0f}s)"
        )
    return True, f"no commit for {stalled_for:.0f}s with lag {lag:.0f} (limit {stall_seconds:.0f}s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("live", "ready"))
    parser.add_argument("--url", help="Default: http://127.0.0.1:$SLUICE_METRICS_PORT/metrics")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--stall-seconds", type=float, default=300.0)
    parser.add_argument("--state", type=Path, default=Path("/tmp/sluice-probe.json"))
    args = parser.parse_args(argv)
    port = int(os.environ.get("SLUICE_METRICS_PORT") or DEFAULT_PORT)
    url = args.url or f"http://127.0.0.1:{port}/metrics"
    try:
        samples = scrape(url, args.timeout)
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if args.check == "ready":
        ok, message = check_ready(samples)
    else:
        ok, message = check_live(samples, args.state, args.stall_seconds, time.time())
    print(("ok: " if ok else "unhealthy: ") + message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
