"""The ``sluice`` command line. The only place that configures logging handlers."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from schemas.errors import SluiceError
from streams.settings import Settings

app = typer.Typer(
    help="Sluice: real-time LLM inference over Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
kafka_app = typer.Typer(
    help="The local single-node Apache Kafka broker (KRaft).", no_args_is_help=True
)
app.add_typer(kafka_app, name="kafka")
model_app = typer.Typer(
    help="Model versions: the registry on disk and rollouts on llm.control.",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")
console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    return Settings()


def _configure_logging(level: str) -> None:
    from streams.log_limits import install_repeat_filter

    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # one line per kind per 10 s for warnings and errors: a broker that is gone must not
    # turn the log into megabytes of the same line
    install_repeat_filter(10.0)


# -- kafka --------------------------------------------------------------------------------
_SECURE_OPTION = typer.Option(
    False,
    "--secure",
    help="The secure local broker: SASL_SSL only (SCRAM-SHA-512), ACLs; writes "
    "$SLUICE_HOME/secure.env (workers), producer.env and operator.env.",
)


def _local_broker(settings: Settings, secure: bool):  # type: ignore[no-untyped-def]
    from streams.bootstrap import local_kafka

    if not secure:
        return local_kafka(settings)
    from deploy.local_kafka import LocalKafka
    from deploy.security.acls import SluiceResources

    return LocalKafka(
        settings.home,
        kafka_version=settings.kafka_version,
        secure=True,
        acl_resources=SluiceResources.from_settings(settings),
    )


@kafka_app.command("up")
def kafka_up(secure: bool = _SECURE_OPTION) -> None:
    """Fetch (once), format (once) and start the local broker; print its bootstrap address."""
    from streams.topics import ensure_topics

    settings = _settings()
    kafka = _local_broker(settings, secure)
    with err.status("Starting Apache Kafka…") as status:
        info = kafka.up(progress=lambda msg: status.update(msg))
        admin = settings
        if secure:  # topics are created by the broker's own principal
            admin = settings.model_copy(update=kafka.settings_fields("admin", info.bootstrap))
        created = asyncio.run(ensure_topics(admin, info.bootstrap))
    err.print(f"Kafka {info.kafka_version} running (pid {info.pid}), log {info.log_file}")
    if created:
        err.print(f"created topics: {', '.join(created)}")
    if secure:
        env = kafka.env_file("worker")
        err.print(
            f"SASL_SSL only; settings in {env} (workers), {kafka.env_file('producer')}, "
            f"{kafka.env_file('operator')}. Use: set -a; . {env}; set +a"
        )
        err.print("control commands are signed: the key is in the workers' and operators' files")
    print(info.bootstrap)


@kafka_app.command("down")
def kafka_down(secure: bool = _SECURE_OPTION) -> None:
    """Stop the local broker (its data is kept)."""
    stopped = _local_broker(_settings(), secure).down()
    err.print("stopped" if stopped else "not running")


@kafka_app.command("status")
def kafka_status(secure: bool = _SECURE_OPTION) -> None:
    """Say whether the local broker runs, and where. Exit code 1 if it does not."""
    info = _local_broker(_settings(), secure).status()
    if info is None:
        err.print("not running")
        raise typer.Exit(1)
    print(info.bootstrap)
    err.print(f"Kafka {info.kafka_version}, pid {info.pid}, log {info.log_file}")


# -- worker -------------------------------------------------------------------------------
@app.command()
def worker(
    role: str | None = typer.Option(
        None,
        "--role",
        help="inference | join | metrics | all (default: SLUICE_WORKER_ROLE, else all). "
        "Production runs the roles apart: each role is its own consumer group.",
    ),
) -> None:
    """Run a worker: consume llm.requests, run the model, publish results."""
    from streams.worker import run_worker

    settings = _settings()
    if role is not None:
        if role not in ("inference", "join", "metrics", "all"):
            err.print(
                f"[red]--role must be inference, join, metrics or all, not {escape(role)}[/red]"
            )
            raise typer.Exit(2)
        settings = settings.model_copy(update={"worker_role": role})
    _configure_logging(settings.log_level)
    sys.exit(run_worker(settings))


# -- send ---------------------------------------------------------------------------------
@app.command()
def send(
    prompt: str = typer.Argument(..., help="The prompt."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    system: str | None = typer.Option(None, "--system"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for the answer."),
) -> None:
    """Publish one prompt, wait for its answer, print it with latency and tokens."""
    from connectors.client import RequestRejected, SluiceClient

    settings = _settings()

    async def go() -> dict:
        async with SluiceClient(settings) as client:
            started = time.monotonic()
            rid = await client.publish(
                prompt,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                system=system,
                stop=stop,
            )
            err.print(f"published {rid}; waiting for the answer…")
            result = await client.result(rid, timeout=timeout)
            result["_client_ms"] = (time.monotonic() - started) * 1000
            return result

    try:
        result = asyncio.run(go())
    except RequestRejected as exc:
        err.print(f"[red]rejected[/]: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    except TimeoutError as exc:
        err.print(f"[red]no answer within {timeout:.0f}s[/]: is a worker running?")
        raise typer.Exit(3) from exc
    print(result["text"])
    t = result["timings"]
    err.print(
        f"[dim]{result['status']} · {result['model']} {result['model_version']} · "
        f"{result['prompt_tokens']}+{result['completion_tokens']} tokens · "
        f"total {t['total_ms']:.0f} ms (queue {t['queue_ms']:.0f}, "
        f"batch wait {t['batch_wait_ms']:.0f}, inference {t['inference_ms']:.0f}) · "
        f"batch {result['batch_size']} · finish {result['finish_reason']}[/]"
    )


# -- feedback -----------------------------------------------------------------------------
@app.command()
def feedback(
    request_id: str = typer.Argument(..., help="The request the feedback is about."),
    score: int = typer.Option(..., "--score", "-s", help="-1 (bad), 0 or 1 (good)."),
    correction: str | None = typer.Option(
        None, "--correction", "-c", help="The answer you wanted instead."
    ),
    label: str | None = typer.Option(None, "--label"),
    user: str | None = typer.Option(None, "--user", help="A pseudonymous user id."),
) -> None:
    """Send human feedback on an answer (it joins the request into a training example)."""
    from connectors.client import SluiceClient

    settings = _settings()

    async def go() -> None:
        async with SluiceClient(settings) as client:
            await client.send_feedback(
                request_id, score, label=label, correction=correction, user=user
            )

    asyncio.run(go())
    err.print(f"feedback for {request_id} published on {settings.feedback_topic}")


# -- tail ---------------------------------------------------------------------------------
@app.command()
def tail(
    topic: str = typer.Argument(..., help="Any Sluice topic, e.g. llm.results or llm.requests.dlq"),
    from_beginning: bool = typer.Option(False, "--from-beginning", "-b"),
    limit: int | None = typer.Option(None, "--limit", "-n", help="Stop after N records."),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Keep waiting for more."),
) -> None:
    """Print decoded records of TOPIC, one JSON object per line."""
    from connectors.tail import format_line
    from connectors.tail import tail as run_tail
    from streams.bootstrap import resolve_bootstrap
    from streams.codecs import codec_from_settings

    settings = _settings()
    count = asyncio.run(
        run_tail(
            resolve_bootstrap(settings),
            topic,
            codec_from_settings(settings),
            lambda entry: print(format_line(entry), flush=True),
            from_beginning=from_beginning,
            limit=limit,
            follow=follow,
            client_options=settings.kafka_client_options(),
        )
    )
    err.print(f"[dim]{count} records[/]")


# -- top ----------------------------------------------------------------------------------
@app.command()
def top(
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between refreshes."),
) -> None:
    """Live view: workers, partitions and lag, latest llm.metrics windows, the rollout."""
    from connectors.top import run_top
    from streams.bootstrap import resolve_bootstrap
    from streams.codecs import codec_from_settings

    settings = _settings()
    _configure_logging("WARNING")
    run_top(
        settings,
        resolve_bootstrap(settings),
        codec_from_settings(settings),
        console,
        once=once,
        interval_s=interval,
    )


# -- replay -------------------------------------------------------------------------------
@app.command()
def replay(
    topic: str = typer.Argument(..., help="Any Sluice topic, e.g. llm.training-examples"),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (.jsonl or .parquet)."),
    since: str | None = typer.Option(
        None, "--since", help="Start time: ISO-8601, epoch ms, now, -15m, -2h, -1d."
    ),
    until: str | None = typer.Option(None, "--until", help="End time (exclusive), same forms."),
    from_offset: int | None = typer.Option(None, "--from-offset", help="Per partition, inclusive."),
    to_offset: int | None = typer.Option(None, "--to-offset", help="Per partition, exclusive."),
    model_version: str | None = typer.Option(None, "--model-version"),
    min_score: int | None = typer.Option(None, "--min-score"),
    max_score: int | None = typer.Option(None, "--max-score"),
    dedup: bool = typer.Option(
        True, "--dedup/--no-dedup", help="Keep only the last record per request_id."
    ),
    fmt: str | None = typer.Option(None, "--format", help="jsonl or parquet (default: suffix)."),
) -> None:
    """Export a range of a topic to JSONL or Parquet, without touching the workers' group."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from connectors.replay import parse_time
    from connectors.replay import replay as run_replay
    from streams.bootstrap import resolve_bootstrap
    from streams.codecs import codec_from_settings

    settings = _settings()
    try:
        since_ms = parse_time(since) if since else None
        until_ms = parse_time(until) if until else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with Progress(
        TextColumn("replaying {task.description}"), BarColumn(), MofNCompleteColumn(), console=err
    ) as progress:
        task = progress.add_task(topic, total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        summary = asyncio.run(
            run_replay(
                resolve_bootstrap(settings),
                topic,
                out,
                fmt=fmt,  # type: ignore[arg-type]
                since_ms=since_ms,
                until_ms=until_ms,
                from_offset=from_offset,
                to_offset=to_offset,
                model_version=model_version,
                min_score=min_score,
                max_score=max_score,
                dedup=dedup,
                codec=codec_from_settings(settings),
                client_options=settings.kafka_client_options(),
                progress=on_progress,
            )
        )
    err.print(
        f"read {summary.read}, wrote {summary.written} to {summary.out} ({summary.fmt}); "
        f"filtered {summary.skipped_filtered}, duplicates {summary.skipped_duplicates}, "
        f"undecodable {summary.undecodable}, tombstones {summary.tombstones}; "
        f"{summary.elapsed_s:.1f}s"
    )


# -- retrain ------------------------------------------------------------------------------
@app.command()
def retrain(
    examples: Path = typer.Option(..., "--examples", "-e", help="JSONL/Parquet from replay."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the new model version."),
    base: Path | None = typer.Option(
        None, "--base", help="Base model folder (default: the served model)."
    ),
    method: str = typer.Option("lora", "--method", help="lora or full."),
    epochs: int = typer.Option(3, "--epochs"),
    learning_rate: float | None = typer.Option(None, "--lr"),
    holdout: float = typer.Option(0.25, "--holdout", help="Held-out fraction for the gate."),
    min_improvement: float = typer.Option(
        0.0, "--min-improvement", help="Required held-out NLL gain (nats)."
    ),
    seed: int = typer.Option(0, "--seed"),
    register: bool = typer.Option(
        True,
        "--register/--no-register",
        help="Add the new version to the model registry if it passes.",
    ),
) -> None:
    """Fine-tune on training examples, evaluate against the base, gate, register."""
    from rich.progress import BarColumn, Progress, TextColumn

    from inference.backends.model_files import resolve_model_dir
    from inference.registry import ModelRegistry
    from inference.retrain import GateRefused, gate
    from inference.retrain import retrain as run_retrain

    settings = _settings()
    base_dir = base or resolve_model_dir(settings.model_path, settings.model_cache_dir)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
    ) as progress:
        task = progress.add_task("retraining", total=1.0, info="")

        def on_progress(stage: str, fraction: float) -> None:
            progress.update(task, completed=fraction, info=stage)

        report = run_retrain(
            examples,
            base_dir,
            out,
            method=method,  # type: ignore[arg-type]
            epochs=epochs,
            learning_rate=learning_rate,
            holdout_fraction=holdout,
            min_improvement=min_improvement,
            seed=seed,
            progress=on_progress,
        )
    h = report.heldout
    err.print(
        f"held-out NLL: base {h.base_nll:.4f} -> new {h.new_nll:.4f} "
        f"(perplexity {h.base_perplexity:.2f} -> {h.new_perplexity:.2f}); "
        f"{report.steps} steps, {report.duration_seconds:.1f}s, "
        f"peak RSS {report.peak_rss_mb:.0f} MB"
    )
    try:
        gate(report)
    except GateRefused as exc:
        err.print(f"[red]gate refused[/]: {escape(str(exc))}")
        raise typer.Exit(4) from exc
    if register:
        registry = ModelRegistry(settings.registry_path)
        registry.ensure_base(base_dir)
        version = registry.register(report.model_dir)
        err.print(
            f"registered {version} in {settings.registry_path}; roll it out with "
            f"`sluice model load {version}` then `sluice model canary 20`"
        )
    print(report.version)


# -- model rollout ---------------------------------------------------------------------------
def _registry():  # type: ignore[no-untyped-def]
    from inference.registry import ModelRegistry

    return ModelRegistry(_settings().registry_path)


def _version_label(version: str | None) -> str:
    return version if version is not None else "base (the worker's configured model)"


def _print_rollout(state, commands: int, topic: str, topic_exists: bool = True) -> None:  # type: ignore[no-untyped-def]
    if not topic_exists:
        err.print(f"{topic} does not exist yet: every worker serves its configured model")
    print(f"current:   {_version_label(state.current)}")
    if state.candidate is None:
        print("candidate: none")
    else:
        print(f"candidate: {state.candidate} (canary {state.canary_percent}%)")
    previous = ", ".join(_version_label(v) for v in state.previous) or "none"
    print(f"previous:  {previous}")
    err.print(f"[dim]the fold of {commands} commands on {topic}[/]")


def _read_rollout(settings: Settings):  # type: ignore[no-untyped-def]
    """The fold of the control topic, as every worker computes it."""
    from streams.bootstrap import resolve_bootstrap
    from streams.codecs import codec_from_settings
    from streams.control import read_rollout
    from streams.control_auth import control_keys

    return read_rollout(
        resolve_bootstrap(settings),
        settings.control_topic,
        codec_from_settings(settings),
        settings.kafka_client_options(),
        keys=control_keys(settings),
    )


def _send_control(
    command: str,
    version: str | None = None,
    percent: int | None = None,
    issued_by: str | None = None,
    evidence: str | None = None,
):  # type: ignore[no-untyped-def]
    """Fold llm.control, check COMMAND against that state with the workers' own rules
    (``RolloutState.transition``), then publish it (with ``evidence``, for automatic
    decisions); a refused command is not sent."""
    import getpass

    from connectors.client import SluiceClient
    from streams.rollout import RolloutCommandError

    settings = _settings()
    if version is not None:
        _registry().path(version)  # UnknownVersionError: workers could not load it either
    if settings.control_signing_key is None:
        err.print(
            "[yellow]warning[/]: SLUICE_CONTROL_SIGNING_KEY is not set: the command is sent "
            "unsigned, and workers that verify signatures ignore it"
        )

    async def go():  # type: ignore[no-untyped-def]
        log = await _read_rollout(settings)
        state = log.state.transition({"command": command, "version": version, "percent": percent})
        client = SluiceClient(settings)
        await client.start(watch_results=False)
        try:
            command_id = await client.send_control(
                command,
                model=settings.model_name,
                version=version,
                percent=percent,
                issued_by=issued_by or getpass.getuser(),
                evidence=evidence,
            )
        finally:
            await client.stop()
        return command_id, state, log.commands + 1

    try:
        command_id, state, commands = asyncio.run(go())
    except RolloutCommandError as exc:
        err.print(f"[red]refused[/]: {escape(str(exc))}; nothing was sent")
        raise typer.Exit(2) from exc
    err.print(
        f"{command} sent on {settings.control_topic} (command {command_id}); "
        "every worker applies it"
    )
    _print_rollout(state, commands, settings.control_topic)
    return state


@model_app.command("status")
def model_status() -> None:
    """The rollout state: the fold of every command on llm.control, as workers see it."""
    settings = _settings()
    log = asyncio.run(_read_rollout(settings))
    _print_rollout(log.state, log.commands, settings.control_topic, log.topic_exists)
    if log.rejected:
        ignored = ", ".join(f"{n} {reason}" for reason, n in sorted(log.rejected.items()))
        err.print(f"[yellow]ignored[/] (not signed by a trusted key): {ignored}")


@model_app.command("list")
def model_list() -> None:
    """Registered versions (the rollout state is `sluice model status`)."""
    from rich.table import Table

    table = Table(title=f"Model registry ({_settings().registry_path})")
    for column in ("version", "registered", "path"):
        table.add_column(column)
    for info in _registry().versions():
        table.add_row(info.version, str(info.registered_at), str(info.path))
    console.print(table)


@model_app.command("register")
def model_register(
    folder: Path = typer.Argument(..., help="A Hugging Face model folder."),
    version: str | None = typer.Option(None, "--version"),
) -> None:
    """Add a model folder to the registry (copied in)."""
    print(_registry().register(folder, version))


@model_app.command("load")
def model_load(version: str = typer.Argument(..., help="A registered version.")) -> None:
    """Load VERSION as the candidate on every worker (0% traffic until `canary`)."""
    _send_control("LOAD", version=version)


@model_app.command("canary")
def model_canary(
    percent: int = typer.Argument(..., min=0, max=100),
    auto: bool = typer.Option(
        False,
        "--auto",
        help="Then watch llm.metrics and PROMOTE or ROLLBACK by the canary analysis.",
    ),
) -> None:
    """Route PERCENT % of requests (by request_id hash) to the candidate."""
    started_ms = int(time.time() * 1000)
    state = _send_control("CANARY", percent=percent)
    if auto:
        _auto_canary(state.candidate, started_ms)


def _auto_canary(candidate: str, since_ms: int) -> None:
    """Read MetricsWindow records of the candidate and of the version beside it (the base)
    since ``since_ms``, decide with ``streams.canary.decide`` every ``SLUICE_CANARY_POLL_S``
    and publish PROMOTE or ROLLBACK with the evidence (or give up after the timeout)."""
    import getpass

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.bootstrap import resolve_bootstrap
    from streams.canary import (
        CanaryPolicy,
        arm_stats,
        base_version,
        decide,
        evidence_json,
        window_start_ms,
    )
    from streams.codecs import codec_from_settings
    from streams.kafka_clients import stop_consumer, topic_partitions

    settings = _settings()
    policy = CanaryPolicy.from_settings(settings)
    codec = codec_from_settings(settings)

    async def watch():  # type: ignore[no-untyped-def]
        consumer = AIOKafkaConsumer(
            bootstrap_servers=resolve_bootstrap(settings),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **settings.kafka_client_options(),
        )
        await consumer.start()
        windows: list[dict] = []
        try:
            topic = settings.metrics_topic
            tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
            if not tps:
                raise typer.BadParameter(f"{topic} does not exist: is a metrics worker running?")
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            give_up = time.monotonic() + settings.canary_timeout_s
            next_look = time.monotonic() + settings.canary_poll_s
            while time.monotonic() < give_up:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        _, window = await adecode(codec, record.value, expected="MetricsWindow")
                        if window_start_ms(window) >= since_ms and window["model"]:
                            windows.append(window)  # model "": dead letters, not a version
                if time.monotonic() < next_look:
                    continue
                next_look = time.monotonic() + settings.canary_poll_s
                base = base_version(windows, candidate)
                decision = decide(arm_stats(candidate, windows), arm_stats(base, windows), policy)
                err.print(f"[dim]canary {candidate} vs {base or '?'}: {decision.reason}[/]")
                if decision.command is not None:
                    return decision
            return None
        finally:
            await stop_consumer(consumer)

    from schemas.registry import adecode

    decision = asyncio.run(watch())
    if decision is None:
        err.print("[yellow]no decision within SLUICE_CANARY_TIMEOUT_S; nothing was sent[/]")
        raise typer.Exit(3)
    evidence = evidence_json(decision, policy)
    print(evidence)
    err.print(f"{decision.verdict}: {escape(decision.reason)}")
    _send_control(decision.verdict, issued_by=f"canary-auto:{getpass.getuser()}", evidence=evidence)


@model_app.command("promote")
def model_promote() -> None:
    """Make the candidate the current version everywhere."""
    _send_control("PROMOTE")


@model_app.command("rollback")
def model_rollback() -> None:
    """Drop the candidate; with none, go back to the previous current version."""
    _send_control("ROLLBACK")


# -- bench --------------------------------------------------------------------------------
@app.command()
def bench(
    modes: str = typer.Option(
        "direct,pipeline,ceiling",
        "--modes",
        help="Any of direct, pipeline, ceiling (comma-separated).",
    ),
    requests: int = typer.Option(64, "--requests", "-n", help="Requests for the model modes."),
    pipeline_requests: int = typer.Option(
        20_000, "--pipeline-requests", help="Requests for the benchmark-engine ceiling."
    ),
    concurrency: int | None = typer.Option(None, "--concurrency"),
    rate: float | None = typer.Option(None, "--rate", help="Open-loop requests/s."),
    prompt_words: str = typer.Option("8,32,128", "--prompt-words"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens"),
    partitions: int = typer.Option(4, "--partitions"),
    workers: int = typer.Option(1, "--workers"),
    batch_sizes: str = typer.Option("1,4,8,16", "--batch-sizes"),
    quantize_compare: bool = typer.Option(
        True, "--int8/--no-int8", help="Also compare int8 dynamic quantization."
    ),
    anchor: bool = typer.Option(
        True, "--anchor/--no-anchor", help="With direct: the same prompts through llama.cpp."
    ),
    anchor_requests: int = typer.Option(16, "--anchor-requests", help="Prompts of the anchor."),
    anchor_concurrency: int = typer.Option(
        16, "--anchor-concurrency", help="Requests outstanding in the anchor's concurrent pass."
    ),
    load_levels: str = typer.Option(
        "0.25,0.5,0.9",
        "--load-levels",
        help="With pipeline: Poisson arrivals at these fractions of saturation ('none': off).",
    ),
    load_requests: int = typer.Option(24, "--load-requests", help="Requests per load level."),
    lone_requests: int = typer.Option(
        6, "--lone-requests", help="Requests sent one at a time for the lone latency."
    ),
    out_dir: Path = typer.Option(Path("bench-results"), "--out-dir"),
) -> None:
    """Measure the engine alone, the whole pipeline, and the pipeline's own ceiling."""
    from connectors.bench import BenchOptions, run_bench

    settings = _settings()
    _configure_logging("WARNING")
    options = BenchOptions(
        requests=requests,
        pipeline_requests=pipeline_requests,
        concurrency=concurrency,
        rate=rate,
        prompt_words=prompt_words,
        max_new_tokens=max_new_tokens,
        partitions=partitions,
        workers=workers,
        batch_sizes=batch_sizes,
        modes=modes,
        quantize_compare=quantize_compare,
        anchor=anchor,
        anchor_requests=anchor_requests,
        anchor_concurrency=anchor_concurrency,
        load_levels=load_levels,
        load_requests=load_requests,
        lone_requests=lone_requests,
        out_dir=out_dir,
    )
    run_bench(settings, options, console)


# -- redaction ----------------------------------------------------------------------------
redaction_app = typer.Typer(help="The PII redactor of training examples.", no_args_is_help=True)
app.add_typer(redaction_app, name="redaction")


@redaction_app.command("eval")
def redaction_eval(
    set_file: Path | None = typer.Option(
        None, "--set", help="Labelled JSON lines (default: tests/data/redaction_set.jsonl)."
    ),
    region: str = typer.Option("US", "--region", help="Region of national phone formats."),
    errors: bool = typer.Option(False, "--errors", help="List every miss and false finding."),
) -> None:
    """Print the redactor's recall and precision per PII type on a labelled set."""
    from connectors.redaction_eval import run

    run(set_file, region=region, show_errors=errors)


# -- fuzz ---------------------------------------------------------------------------------
@app.command()
def fuzz(
    bad: int = typer.Option(10_000, "--bad", help="Bad payloads (all families mixed)."),
    valid: int = typer.Option(500, "--valid", help="Valid requests mixed in."),
    seed: int = typer.Option(0, "--seed"),
    backend: str = typer.Option(
        "benchmark", "--backend", help="The worker's engine: benchmark (volume) or torch."
    ),
    families: str = typer.Option(
        "random,bitflip,truncated,wrong_id,hostile,keys",
        "--families",
        help="Bad payload families (comma-separated).",
    ),
    timeout_s: float = typer.Option(600.0, "--timeout", help="Seconds to wait for answers."),
    keep_topics: bool = typer.Option(False, "--keep-topics", help="Leave the run's topics."),
) -> None:
    """Fuzz the real pipeline: bad payloads + valid requests to a worker of its own; every
    payload must end in the DLQ with a reason or be answered, the worker must survive."""
    from connectors.fuzzing.run import FuzzOptions, format_report, run_fuzz

    _configure_logging("WARNING")
    options = FuzzOptions(
        bad=bad,
        valid=valid,
        seed=seed,
        backend=backend,
        families=tuple(f.strip() for f in families.split(",") if f.strip()),
        timeout_s=timeout_s,
        keep_topics=keep_topics,
    )
    report = run_fuzz(_settings(), options, progress=typer.echo)
    for line in format_report(report):
        typer.echo(line)
    if report.problems():
        sys.exit(1)


# -- demo ---------------------------------------------------------------------------------
@app.command()
def demo(
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    keep_running: bool = typer.Option(
        False, "--keep-running", help="Leave the broker and worker it started running."
    ),
) -> None:
    """Start what is missing (broker, worker), send sample prompts, show answers and a summary."""
    from connectors.demo import run_demo

    settings = _settings()
    _configure_logging("WARNING")
    run_demo(settings, console, max_new_tokens=max_new_tokens, keep_running=keep_running)


def main() -> None:
    try:
        app()
    except SluiceError as exc:
        err.print(f"[red]error[/]: {escape(str(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
