"""``sluice demo``: the main job on the embedded default, end to end, with a summary."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from connectors.client import RequestRejected, SluiceClient
from connectors.processes import WORKER_READY, WorkerProcess
from schemas.errors import SluiceError
from streams.bootstrap import local_kafka
from streams.settings import Settings
from streams.topics import ensure_topics

SAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Explain in one sentence what Apache Kafka is.",
    "Name three primary colors.",
    "Write a haiku about a river.",
    "What is 12 times 12?",
    "Give me a synonym for 'happy'.",
    "What does a CPU do?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer briefly.",
    "Suggest a name for a pet goldfish.",
    "List two benefits of regular exercise.",
    "What is the boiling point of water in Celsius?",
]


class DemoError(SluiceError):
    """The demo could not run to the end."""


@dataclass
class DemoReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        latencies = sorted(r["latency_ms"] for r in self.rows)
        tokens = sum(r["completion_tokens"] for r in self.rows)
        return {
            "requests": len(self.rows) + len(self.rejected),
            "answers": len(self.rows),
            "dlq": len(self.rejected),
            "p50_ms": _quantile(latencies, 0.50),
            "p99_ms": _quantile(latencies, 0.99),
            "tokens": tokens,
            "tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
        }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def _worker_running(settings: Settings, bootstrap: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **settings.kafka_client_options())
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([settings.app_id])
        for response in described:
            for group in response.groups:
                # (error_code, group_id, state, protocol_type, protocol, members, ...)
                if group[1] == settings.app_id and group[2] == "Stable" and group[5]:
                    return True
        return False
    except Exception:
        return False
    finally:
        await admin.close()


def run_demo(
    settings: Settings,
    console: Console,
    *,
    max_new_tokens: int = 48,
    keep_running: bool = False,
    timeout_s: float = 600.0,
) -> DemoReport:
    """Bring up what is missing, send the sample prompts, show answers and a summary."""
    broker = None
    if not settings.kafka_bootstrap:
        kafka = local_kafka(settings)
        if kafka.status() is None:
            with console.status("Starting the local Apache Kafka broker…") as status:
                info = kafka.up(progress=lambda msg: status.update(msg))
            broker = kafka
            console.print(f"[green]Kafka {info.kafka_version}[/] on {info.bootstrap}")
        bootstrap = kafka.status().bootstrap  # type: ignore[union-attr]
    else:
        bootstrap = settings.kafka_bootstrap
    asyncio.run(ensure_topics(settings, bootstrap))
    worker = None
    if not asyncio.run(_worker_running(settings, bootstrap)):
        log = settings.home / "logs" / "demo-worker.log"
        worker = WorkerProcess(log, env={"SLUICE_KAFKA_BOOTSTRAP": bootstrap}).start()
        console.print(f"Started a worker (pid {worker.pid}, log {log})")
        with console.status("Waiting for the worker (the first run converts the model, ~30 s)"):
            if not worker.wait_for_log(WORKER_READY, timeout=timeout_s):
                tail = worker.log_tail()
                worker.stop()
                if broker is not None:
                    broker.down()
                raise DemoError(f"the worker did not become ready:\n{tail}")
    try:
        report = asyncio.run(
            _send_samples(settings, bootstrap, console, worker, max_new_tokens, timeout_s)
        )
    finally:
        if not keep_running:
            if worker is not None:
                with console.status("Stopping the worker…"):
                    worker.stop()
            if broker is not None:
                with console.status("Stopping the local broker…"):
                    broker.down()
    _print_report(console, report)
    return report


async def _send_samples(
    settings: Settings,
    bootstrap: str,
    console: Console,
    worker: WorkerProcess | None,
    max_new_tokens: int,
    timeout_s: float,
) -> DemoReport:
    report = DemoReport()
    async with SluiceClient(settings, bootstrap=bootstrap) as client:
        started = time.monotonic()
        ids: dict[str, str] = {}
        for prompt in SAMPLE_PROMPTS:
            rid = await client.publish(prompt, max_new_tokens=max_new_tokens)
            ids[rid] = prompt
        # One request that breaks a rule, to show the dead-letter path.
        bad = await client.publish("This asks for zero tokens.", max_new_tokens=0)
        ids[bad] = "This asks for zero tokens."
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.elapsed:.0f}s"),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(
                "Waiting for answers (first run converts the model)", total=len(ids)
            )

            async def one(rid: str) -> None:
                try:
                    result = await client.result(rid, timeout=timeout_s)
                    report.rows.append(
                        {
                            "prompt": ids[rid],
                            "text": result["text"],
                            "status": result["status"],
                            "latency_ms": result["timings"]["total_ms"],
                            "completion_tokens": result["completion_tokens"],
                            "batch_size": result["batch_size"],
                        }
                    )
                except RequestRejected as exc:
                    report.rejected.append(
                        f"{ids[rid]!r}: {exc.reason_code}: {exc.dead_letter['reason']}"
                    )
                progress.advance(task)

            waiters = [asyncio.create_task(one(rid)) for rid in ids]
            while not all(w.done() for w in waiters):
                await asyncio.sleep(0.2)
                if worker is not None and not worker.alive():
                    for w in waiters:
                        w.cancel()
                    raise DemoError(f"the worker exited:\n{worker.log_tail()}")
            await asyncio.gather(*waiters)
        report.wall_s = time.monotonic() - started
    return report


def _print_report(console: Console, report: DemoReport) -> None:
    table = Table(title="Answers from the model", show_lines=True)
    table.add_column("prompt", max_width=34)
    table.add_column("answer", max_width=60)
    table.add_column("latency ms", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("batch", justify="right")
    for row in sorted(report.rows, key=lambda r: r["latency_ms"]):
        answer = row["text"].strip() or f"({row['status']})"
        table.add_row(
            row["prompt"],
            answer,
            f"{row['latency_ms']:.0f}",
            str(row["completion_tokens"]),
            str(row["batch_size"]),
        )
    console.print(table)
    for line in report.rejected:
        console.print(f"[yellow]dead-lettered[/] {escape(line)}")
    s = report.summary()
    console.print(
        f"[bold]Summary[/]: requests {s['requests']}, answers {s['answers']}, DLQ {s['dlq']}, "
        f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, "
        f"{s['tokens']} tokens in {report.wall_s:.1f}s = {s['tokens_per_s']:.1f} tokens/s"
    )
