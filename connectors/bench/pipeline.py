"""Runs through the whole pipeline: the broker, real ``sluice worker`` processes on fresh
topics and a :class:`SluiceClient` publishing and reading results."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from connectors.bench.options import BenchError, BenchOptions
from connectors.bench.stats import Sample, cpu_usage, latency_summary, load_figures, summarize
from connectors.bench.workload import (
    level_count,
    make_prompts,
    paced,
    poisson_offsets,
    rated_count,
    schedule_offsets,
)
from connectors.client import SluiceClient
from connectors.processes import WORKER_READY, WorkerProcess, settings_env
from streams.bootstrap import local_kafka
from streams.kafka_clients import group_state
from streams.settings import Settings
from streams.topics import ensure_topics

BENCHMARK_ENGINE = "benchmark engine (zero-cost fixed completion, not a model)"


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a worker process exactly these settings."""
    return settings_env(settings)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a live process has used; Linux only."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_settings(settings: Settings, bootstrap: str, tag: str, **overrides: Any) -> Settings:
    """Settings on their own topics (every ``*_topic`` setting gets a ``bench-<tag>.``
    prefix) and consumer group, so runs never mix."""
    fields: dict[str, Any] = {
        "home": Path(settings.home).resolve(),
        "kafka_bootstrap": bootstrap,
        "app_id": f"sluice-bench-{tag}",
        "metrics_port": 0,
    }
    for name in type(settings).model_fields:
        if name.endswith("_topic"):
            fields[name] = f"bench-{tag}.{getattr(settings, name)}"
    fields.update(overrides)
    return settings.model_copy(update=fields)


def run_topics(settings: Settings) -> list[str]:
    """Every topic the settings name (the per-run ones, after :func:`run_settings`)."""
    return [getattr(settings, n) for n in type(settings).model_fields if n.endswith("_topic")]


@dataclass
class PipelineRun:
    summary: dict[str, Any]
    samples: list[Sample]


class Broker:
    """The Kafka cluster of the run: the configured one, the running local broker, or a
    local broker started here (and stopped by :meth:`close`)."""

    def __init__(self, settings: Settings, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.started: Any = None
        self.bootstrap = ""
        self.kafka_version = "unknown (external cluster)"
        self.pid: int | None = None

    def open(self, progress: Progress) -> str:
        if self.settings.kafka_bootstrap:
            self.bootstrap = self.settings.kafka_bootstrap
            return self.bootstrap
        kafka = local_kafka(self.settings)
        info = kafka.status()
        if info is None:
            task = progress.add_task("kafka: starting the local broker", total=None)
            info = kafka.up(progress=lambda msg: progress.update(task, description=f"kafka: {msg}"))
            progress.update(task, total=1, completed=1, description="kafka: local broker up")
            self.started = kafka
            self.console.print(f"Started Kafka {info.kafka_version} on {info.bootstrap}")
        self.bootstrap = info.bootstrap
        self.kafka_version = f"{info.kafka_version} (local broker)"
        self.pid = info.pid
        return self.bootstrap

    def close(self) -> None:
        if self.started is not None:
            with self.console.status("Stopping the local broker…"):
                self.started.down()
            self.started = None


class Workers:
    """``sluice worker`` processes for one run, stopped with SIGTERM by :meth:`stop`."""

    def __init__(self, settings: Settings, count: int, tag: str) -> None:
        self.settings = settings
        self.count = count
        self.tag = tag
        self.procs: list[Any] = []
        self.log_dir = Path(settings.home) / "logs"
        self.exit_codes: list[int | None] = []
        self.stop_s = 0.0

    def start(self, timeout: float = 300.0) -> None:
        env = worker_env(self.settings)
        for i in range(self.count):
            log = self.log_dir / f"bench-{self.tag}-worker{i}.log"
            self.procs.append(WorkerProcess(log, env=env).start())
        for proc in self.procs:
            if not proc.wait_for_log(WORKER_READY, timeout=timeout):
                tail = proc.log_tail(40)
                self.stop()
                raise BenchError(f"a bench worker did not become ready:\n{tail}")
        if not asyncio.run(_wait_group(self.settings, self.count, timeout=120.0)):
            self.stop()
            raise BenchError(f"the group {self.settings.app_id} never had {self.count} members")

    def dead(self) -> str | None:
        for proc in self.procs:
            if not proc.alive():
                return f"worker pid {proc.pid} exited:\n{proc.log_tail(40)}"
        return None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    @property
    def logs(self) -> list[str]:
        return [str(p.log_file) for p in self.procs]

    def stop(self) -> None:
        started = time.perf_counter()
        self.exit_codes = [proc.stop(timeout=60.0) for proc in self.procs]
        self.stop_s = time.perf_counter() - started


async def _wait_group(settings: Settings, members: int, timeout: float) -> bool:
    """Wait until the workers' consumer group is Stable with ``members`` members."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_options()
    )
    await admin.start()
    try:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            with contextlib.suppress(Exception):
                if await group_state(admin, settings.app_id) == ("Stable", members):
                    return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await admin.close()


async def _create_topics(settings: Settings) -> None:
    assert settings.kafka_bootstrap
    await ensure_topics(settings, settings.kafka_bootstrap)


async def _delete_topics(settings: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_options()
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        ours = set(run_topics(settings))
        # ...and what Faust created for this run's app id (table changelogs).
        names = [t for t in existing if t in ours or t.startswith(f"{settings.app_id}-")]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def pipeline_run(
    client: Any,
    prompts: Sequence[str],
    *,
    tag: str,
    max_new_tokens: int,
    rate: float | None,
    concurrency: int | None,
    label: str,
    engine_label: str,
    workers: Workers,
    stall_timeout_s: float,
    on_progress: Callable[[int], None],
    broker_pid: int | None = None,
    offsets: Sequence[float] | None = None,
) -> PipelineRun:
    """Publish the prompts (at ``offsets`` s after the start when given, else ``rate``),
    collect every result, measure."""
    n = len(prompts)
    records = [
        client.build_request(p, request_id=f"{tag}-{i:07d}", max_new_tokens=max_new_tokens)
        for i, p in enumerate(prompts)
    ]
    index = {r["request_id"]: i for i, r in enumerate(records)}
    results: list[dict[str, Any] | None] = [None] * n
    publish_at = [0.0] * n
    seen_at = [0.0] * n
    received = 0
    all_in = asyncio.Event()
    slots = asyncio.Semaphore(concurrency) if concurrency else None

    async def read() -> None:
        nonlocal received
        async for result in client.results():
            i = index.get(result["request_id"])
            if i is None or results[i] is not None:
                continue
            seen_at[i] = time.perf_counter()
            results[i] = result
            received += 1
            if slots is not None:
                slots.release()
            if received == n:
                all_in.set()

    deliveries: list[asyncio.Future[Any]] = []

    async def publish() -> float:
        async for i in paced(n, rate, offsets=offsets):
            if slots is not None:
                await slots.acquire()
            record = records[i]
            record["created_at"] = int(time.time() * 1000)
            publish_at[i] = time.perf_counter()
            deliveries.append(await client.publish_record(record, wait=False))
        await client.flush()
        return time.perf_counter()

    def cpu_probe() -> dict[str, float | None]:
        times = os.times()
        worker_cpu = [process_cpu_s(pid) for pid in workers.pids]
        return {
            "workers": None if None in worker_cpu else sum(c for c in worker_cpu if c),
            "client": times.user + times.system,
            "broker": process_cpu_s(broker_pid) if broker_pid else None,
        }

    reader = asyncio.create_task(read(), name="bench-reader")
    await asyncio.sleep(0)  # the reader subscribes before anything is published
    cpu_before = cpu_probe()
    started = time.perf_counter()
    publisher = asyncio.create_task(publish(), name="bench-publisher")
    last_count, last_change = 0, time.monotonic()
    try:
        while not all_in.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 0.5)
            if publisher.done() and publisher.exception() is not None:
                raise BenchError(f"publishing failed: {publisher.exception()!r}")
            on_progress(received)
            if received != last_count:
                last_count, last_change = received, time.monotonic()
            elif time.monotonic() - last_change > stall_timeout_s:
                raise BenchError(
                    f"{label}: no result for {stall_timeout_s:.0f} s; {received}/{n} arrived"
                )
            problem = workers.dead()
            if problem:
                raise BenchError(f"{label}: {problem}")
        published = await publisher
        cpu_after = cpu_probe()
        on_progress(received)
    finally:
        for task in (publisher, reader):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    failed_sends = sum(
        1 for d in deliveries if d.done() and not d.cancelled() and d.exception() is not None
    )
    samples: list[Sample] = []
    read_ms: list[float] = []
    finished_ms: list[float] = []
    for i, result in enumerate(results):
        assert result is not None
        t = result["timings"]
        samples.append(
            Sample(
                index=i,
                status=result["status"],
                prompt_tokens=result["prompt_tokens"],
                completion_tokens=result["completion_tokens"],
                batch_size=result["batch_size"],
                stages={
                    "queue": t["queue_ms"],
                    "batch_wait": t["batch_wait_ms"],
                    "inference": t["inference_ms"],
                    "added": t["total_ms"] - t["inference_ms"],
                    "total": t["total_ms"],
                    "e2e": (seen_at[i] - publish_at[i]) * 1000.0,
                },
                text=result.get("text") or "",
            )
        )
        read_ms.append(records[i]["created_at"] + t["queue_ms"])
        finished_ms.append(result["created_at"])
    wall = max(seen_at) - started
    summary = summarize(samples, wall, label=label, engine=engine_label)
    worker_span_s = (max(finished_ms) - min(read_ms)) / 1000.0
    schedule = list(offsets) if offsets is not None else schedule_offsets(n, rate)
    lags = [(publish_at[i] - started - offset) * 1000.0 for i, offset in enumerate(schedule)]
    summary.update(
        target_rate=rate,
        concurrency=concurrency,
        publish={
            "wall_s": published - started,
            "requests_per_s": n / (published - started) if published > started else None,
            "failed_sends": failed_sends,
            "behind_schedule_ms": latency_summary(lags) if rate or offsets else None,
        },
        worker_requests_per_s=(n / worker_span_s) if worker_span_s > 0 else None,
        cpu=cpu_usage(cpu_before, cpu_after, wall, n),
        model_versions=sorted({r["model_version"] for r in results if r}),
        worker_names=sorted({r["worker"] for r in results if r}),
    )
    return PipelineRun(summary, samples)


async def _with_client(settings: Settings, body: Callable[[Any], Awaitable[Any]]) -> Any:
    async with SluiceClient(settings, bootstrap=settings.kafka_bootstrap) as client:
        return await body(client)


def _tear_down(
    progress: Progress, label: str, workers: Workers, settings: Settings, options: BenchOptions
) -> None:
    """Stop a phase's workers (shown as a progress step) and delete its topics."""
    stopping = progress.add_task(label, total=None)
    workers.stop()
    progress.update(stopping, total=1, completed=1)
    if not options.keep_topics:
        with contextlib.suppress(Exception):
            asyncio.run(_delete_topics(settings))


def pipeline_phase(
    base: Settings,
    options: BenchOptions,
    prompts: Sequence[str],
    broker: Broker,
    progress: Progress,
    console: Console,
) -> dict[str, Any]:
    """The model behind real worker processes: same prompts as direct; then, with load
    levels, latency at partial load on the same workers (:func:`load_passes`)."""
    tag = uuid.uuid4().hex[:8]
    settings = run_settings(base, broker.bootstrap, tag, partitions=options.partitions)
    asyncio.run(_create_topics(settings))
    workers = Workers(settings, options.workers, tag)
    engine_label = f"{settings.backend} in {options.workers} worker(s)"
    starting = progress.add_task(f"pipeline: starting {options.workers} worker(s)", total=None)
    out: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        workers.start()
        ready_s = time.perf_counter() - t
        progress.update(starting, total=1, completed=1)

        async def passes(client: SluiceClient) -> None:
            task = progress.add_task("pipeline: results", total=len(prompts))
            out["run"] = await pipeline_run(
                client,
                prompts,
                tag=tag,
                max_new_tokens=options.max_new_tokens,
                rate=options.rate,
                concurrency=options.concurrency,
                label="pipeline",
                engine_label=engine_label,
                workers=workers,
                stall_timeout_s=options.stall_timeout_s,
                on_progress=lambda k: progress.update(task, completed=k),
                broker_pid=broker.pid,
            )
            if options.load_level_list():
                out["load"] = await load_passes(
                    client, options, out["run"], workers, tag, engine_label, progress, broker
                )

        asyncio.run(_with_client(settings, passes))
    finally:
        _tear_down(progress, "pipeline: stopping the worker(s)", workers, settings, options)
    run: PipelineRun = out["run"]
    run.summary.update(
        workers=options.workers,
        worker_ready_s=ready_s,
        worker_stop_s=workers.stop_s,
        worker_exit_codes=workers.exit_codes,
        worker_logs=workers.logs,
        topics_prefix=f"bench-{tag}",
    )
    return out


async def tracked_pass(
    client: Any,
    progress: Progress,
    options: BenchOptions,
    title: str,
    prompts: Sequence[str],
    *,
    tag: str,
    label: str,
    engine_label: str,
    workers: Workers,
    broker: Broker,
    rate: float | None = None,
    concurrency: int | None = None,
    offsets: Sequence[float] | None = None,
) -> PipelineRun:
    """:func:`pipeline_run` of ``prompts`` with its own progress bar titled ``title``."""
    task = progress.add_task(title, total=len(prompts))
    return await pipeline_run(
        client,
        prompts,
        tag=tag,
        max_new_tokens=options.max_new_tokens,
        rate=rate,
        concurrency=concurrency,
        label=label,
        engine_label=engine_label,
        workers=workers,
        stall_timeout_s=options.stall_timeout_s,
        on_progress=lambda k: progress.update(task, completed=k),
        broker_pid=broker.pid,
        offsets=offsets,
    )


async def load_passes(
    client: SluiceClient,
    options: BenchOptions,
    main: PipelineRun,
    workers: Workers,
    tag: str,
    engine_label: str,
    progress: Progress,
    broker: Broker,
) -> dict[str, Any]:
    """Latency at partial load: the saturation rate (the main run's when its requests
    went out all at once, else a burst of ``load_requests``), ``lone_requests`` one at a
    time, then open-loop Poisson arrivals at each load level's fraction of saturation.
    Every pass uses the prompt mix of the main run (lengths cycled the same way)."""
    words = options.prompt_word_list()

    async def one(
        name: str,
        n: int,
        *,
        concurrency: int | None = None,
        offsets: Sequence[float] | None = None,
        what: str,
    ) -> PipelineRun:
        return await tracked_pass(
            client,
            progress,
            options,
            f"pipeline load: {name} ({what})",
            make_prompts(n, words, options.seed),
            tag=f"{tag}-{name}",
            label=f"load-{name}",
            engine_label=engine_label,
            workers=workers,
            broker=broker,
            concurrency=concurrency,
            offsets=offsets,
        )

    if options.rate is None and options.concurrency is None:
        saturation, source = main.summary["requests_per_s"], "pipeline"
    else:
        burst = await one("saturation", options.load_requests, what="all at once")
        saturation, source = burst.summary["requests_per_s"], "saturation burst"
    lone = await one("lone", options.lone_requests, concurrency=1, what="one at a time")
    levels: list[tuple[float, dict[str, Any]]] = []
    samples: dict[str, list[Sample]] = {"lone": lone.samples}
    for k, fraction in enumerate(options.load_level_list()):
        rate = fraction * saturation
        n = level_count(options.load_requests, rate, options.load_level_max_s)
        offsets = poisson_offsets(n, rate, seed=options.seed + k)
        name = f"level{fraction * 100:g}"
        run = await one(
            name,
            n,
            offsets=offsets,
            what=f"Poisson at {rate:,.2f} req/s",
        )
        run.summary["target_rate"] = rate
        levels.append((fraction, run.summary))
        samples[name] = run.samples
    figures = load_figures(saturation, lone.summary, levels)
    figures["saturation_from"] = source
    figures["arrivals"] = "Poisson (open loop, seeded)"
    figures["runs"] = {"lone": lone.summary} | {
        f"level{f * 100:g}": summary for f, summary in levels
    }
    figures["_samples"] = samples
    return figures


def ceiling_phase(
    base: Settings,
    options: BenchOptions,
    prompt_words: Sequence[int],
    broker: Broker,
    progress: Progress,
    console: Console,
) -> dict[str, Any]:
    """The pipeline on the benchmark engine: saturation, then half of it, then (with
    ``rate``) the given rate. One worker, one set of topics, one client."""
    tag = uuid.uuid4().hex[:8]
    settings = run_settings(
        base,
        broker.bootstrap,
        tag,
        partitions=options.partitions,
        backend="benchmark",
        benchmark_completion_tokens=options.max_new_tokens,
    )
    asyncio.run(_create_topics(settings))
    workers = Workers(settings, 1, tag)
    out: dict[str, Any] = {"engine": BENCHMARK_ENGINE}
    runs: dict[str, PipelineRun] = {}
    starting = progress.add_task("ceiling: starting 1 worker (benchmark engine)", total=None)
    try:
        t = time.perf_counter()
        workers.start()
        ready_s = time.perf_counter() - t
        progress.update(starting, total=1, completed=1)

        async def passes(client: Any) -> None:
            async def one(name: str, n: int, rate: float | None) -> PipelineRun:
                what = "as fast as possible" if rate is None else f"at {rate:,.0f} req/s"
                run = await tracked_pass(
                    client,
                    progress,
                    options,
                    f"ceiling: {name} ({what})",
                    make_prompts(n, prompt_words, options.seed),
                    tag=f"{tag}-{name}",
                    label=f"ceiling-{name}",
                    engine_label=BENCHMARK_ENGINE,
                    workers=workers,
                    broker=broker,
                    rate=rate,
                )
                runs[name] = run
                return run

            saturation = await one("saturation", options.pipeline_requests, None)
            half = 0.5 * saturation.summary["requests_per_s"]
            if half > 0:
                await one("half_rate", rated_count(options.pipeline_requests, half), half)
            if options.rate:
                await one(
                    "fixed_rate",
                    rated_count(options.pipeline_requests, options.rate),
                    options.rate,
                )

        asyncio.run(_with_client(settings, passes))
    finally:
        _tear_down(progress, "ceiling: stopping the worker", workers, settings, options)
    for name, run in runs.items():
        out[name] = run.summary
    out["_samples"] = {name: run.samples for name, run in runs.items()}
    out.update(
        worker_ready_s=ready_s,
        worker_stop_s=workers.stop_s,
        worker_exit_codes=workers.exit_codes,
        worker_logs=workers.logs,
        topics_prefix=f"bench-{tag}",
    )
    return out
