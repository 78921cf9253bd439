"""``sluice demo``: the main job on the embedded default, end to end, with a summary.

Besides the inference worker it starts a metrics worker (``--role metrics``) when none
runs, and after the answers waits until the ``MetricsWindow`` records of the demo's traffic
are closed and published on ``llm.metrics`` (windows close ``SLUICE_METRICS_WINDOW_S`` plus
up to twice ``SLUICE_METRICS_LATENESS_S`` after their last record), then prints them: they
are what ``sluice tail llm.metrics -b --no-follow`` and ``sluice top`` show afterwards."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    windows: list[dict[str, Any]] = field(default_factory=list)

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


async def _worker_running(settings: Settings, bootstrap: str, group: str | None = None) -> bool:
    """Whether the consumer group ``group`` (default: the inference workers') has members."""
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.kafka_clients import group_state

    group_id = group or settings.app_id
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **settings.kafka_client_options())
    await admin.start()
    try:
        state = await group_state(admin, group_id)
        return state is not None and state[0] == "Stable" and state[1] > 0
    except Exception:
        return False
    finally:
        await admin.close()


def metrics_group(settings: Settings) -> str:
    """The metrics job's consumer group (``streams.app``: ``<app_id>-metrics``)."""
    return f"{settings.app_id}-metrics"


def _start_worker(console: Console, log: Path, env: dict[str, str], what: str) -> WorkerProcess:
    worker = WorkerProcess(log, env=env).start()
    console.print(f"Started {what} (pid {worker.pid}, log {log})")
    return worker


def _wait_ready(workers: list[WorkerProcess], timeout_s: float) -> WorkerProcess | None:
    """The first worker that did not become ready, or None."""
    for worker in workers:
        if not worker.wait_for_log(WORKER_READY, timeout=timeout_s):
            return worker
    return None


def run_demo(
    settings: Settings,
    console: Console,
    *,
    max_new_tokens: int = 48,
    keep_running: bool = False,
    timeout_s: float = 600.0,
    windows_timeout_s: float | None = None,
) -> DemoReport:
    """Bring up what is missing, send the sample prompts, show answers and a summary, then
    wait for the demo traffic's windows on ``llm.metrics`` and show them."""
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
    started: list[WorkerProcess] = []
    worker = None
    logs = settings.home / "logs"
    if not asyncio.run(_worker_running(settings, bootstrap)):
        worker = _start_worker(
            console,
            logs / "demo-worker.log",
            {"SLUICE_KAFKA_BOOTSTRAP": bootstrap},
            "a worker",
        )
        started.append(worker)
    if not asyncio.run(_worker_running(settings, bootstrap, metrics_group(settings))):
        env = {
            "SLUICE_KAFKA_BOOTSTRAP": bootstrap,
            "SLUICE_WORKER_ROLE": "metrics",
            "SLUICE_METRICS_PORT": "0",  # the inference worker has the default port
        }
        started.append(_start_worker(console, logs / "demo-metrics.log", env, "a metrics worker"))

    def stop_all() -> None:
        if keep_running:
            return
        if started:
            with console.status("Stopping the workers…"):
                for process in started:
                    process.stop()
        if broker is not None:
            with console.status("Stopping the local broker…"):
                broker.down()

    with console.status("Waiting for the workers (the first run converts the model, ~30 s)"):
        not_ready = _wait_ready(started, timeout_s)
    if not_ready is not None:
        tail = not_ready.log_tail()
        keep_running = False
        stop_all()
        raise DemoError(f"a worker did not become ready:\n{tail}")
    try:
        since = asyncio.run(_metrics_end_offsets(settings, bootstrap))
        started_ms = int(time.time() * 1000)
        report = asyncio.run(
            _send_samples(settings, bootstrap, console, worker, max_new_tokens, timeout_s)
        )
        _print_report(console, report)
        wait_s = windows_timeout_s or (
            settings.metrics_window_s + 2 * settings.metrics_lateness_s + 30
        )
        with console.status(
            f"Waiting for the demo traffic's windows on {settings.metrics_topic} (they close "
            f"{settings.metrics_window_s}-"
            f"{settings.metrics_window_s + 2 * settings.metrics_lateness_s:.0f} s after "
            "their last record)"
        ):
            report.windows = asyncio.run(
                _demo_windows(settings, bootstrap, since, started_ms, report, timeout_s=wait_s)
            )
        _print_windows(console, settings, report)
    finally:
        stop_all()
    return report


async def _metrics_end_offsets(settings: Settings, bootstrap: str) -> dict[int, int]:
    """Where llm.metrics ends now, per partition: the demo's windows come after."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka_clients import stop_consumer, topic_partitions

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, **settings.kafka_client_options()
    )
    await consumer.start()
    try:
        topic = settings.metrics_topic
        tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        ends = await consumer.end_offsets(tps) if tps else {}
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await stop_consumer(consumer)


async def _demo_windows(
    settings: Settings,
    bootstrap: str,
    since: dict[int, int],
    started_ms: int,
    report: DemoReport,
    *,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """The base windows published after ``since`` that end after ``started_ms`` (the demo's
    traffic): read until they count every answer and dead letter of the demo (or
    ``timeout_s`` passes)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from schemas.registry import adecode
    from streams.canary import window_start_ms
    from streams.codecs import codec_from_settings
    from streams.kafka_clients import stop_consumer, topic_partitions

    codec = codec_from_settings(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **settings.kafka_client_options(),
    )
    await consumer.start()
    windows: list[dict[str, Any]] = []
    wanted = len(report.rows) + len(report.rejected)
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        topic = settings.metrics_topic
        tps: list[TopicPartition] = []
        while not tps and loop.time() < give_up:
            tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
            if not tps:
                await asyncio.sleep(0.5)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, since.get(tp.partition, 0))
        counted = 0
        while counted < wanted and loop.time() < give_up:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    _, window = await adecode(codec, record.value, expected="MetricsWindow")
                    length_s = int(window.get("length_s") or 0)
                    if length_s != settings.metrics_window_s:
                        continue  # rollups repeat what the base windows hold
                    if window_start_ms(window) + length_s * 1000 <= started_ms:
                        continue  # older traffic (a metrics worker catching up)
                    windows.append(window)
                    counted += int(window.get("requests_total") or 0)
                    counted += int(window.get("dead_letters_total") or 0)
        return windows
    finally:
        await stop_consumer(consumer)


def _print_windows(console: Console, settings: Settings, report: DemoReport) -> None:
    from connectors.tail import format_window

    counted = sum(
        int(w.get("requests_total") or 0) + int(w.get("dead_letters_total") or 0)
        for w in report.windows
    )
    wanted = len(report.rows) + len(report.rejected)
    if counted < wanted:
        console.print(
            f"[yellow]only {counted} of the demo's {wanted} records are in closed windows "
            f"on {settings.metrics_topic} so far[/] (is a metrics worker running?)"
        )
    else:
        console.print(
            f"Metrics: {len(report.windows)} windows on {settings.metrics_topic} hold the "
            f"demo's {wanted} records:"
        )
    for window in report.windows:
        console.print(escape(format_window(window)), highlight=False, soft_wrap=True)
    console.print(
        f"[dim]see them again: sluice tail {settings.metrics_topic} -b --no-follow; "
        "live: sluice top[/]"
    )


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
