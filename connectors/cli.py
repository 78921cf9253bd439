"""The ``sluice`` command line. The only place that configures logging handlers."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

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
console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    return Settings()


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- kafka --------------------------------------------------------------------------------
@kafka_app.command("up")
def kafka_up() -> None:
    """Fetch (once), format (once) and start the local broker; print its bootstrap address."""
    from streams.bootstrap import local_kafka
    from streams.topics import ensure_topics

    settings = _settings()
    kafka = local_kafka(settings)
    with err.status("Starting Apache Kafka…") as status:
        info = kafka.up(progress=lambda msg: status.update(msg))
        created = asyncio.run(ensure_topics(settings, info.bootstrap))
    err.print(f"Kafka {info.kafka_version} running (pid {info.pid}), log {info.log_file}")
    if created:
        err.print(f"created topics: {', '.join(created)}")
    print(info.bootstrap)


@kafka_app.command("down")
def kafka_down() -> None:
    """Stop the local broker (its data is kept)."""
    from streams.bootstrap import local_kafka

    stopped = local_kafka(_settings()).down()
    err.print("stopped" if stopped else "not running")


@kafka_app.command("status")
def kafka_status() -> None:
    """Say whether the local broker runs, and where. Exit code 1 if it does not."""
    from streams.bootstrap import local_kafka

    info = local_kafka(_settings()).status()
    if info is None:
        err.print("not running")
        raise typer.Exit(1)
    print(info.bootstrap)
    err.print(f"Kafka {info.kafka_version}, pid {info.pid}, log {info.log_file}")


# -- worker -------------------------------------------------------------------------------
@app.command()
def worker() -> None:
    """Run a worker: consume llm.requests, run the model, publish results."""
    from streams.worker import run_worker

    settings = _settings()
    _configure_logging(settings.log_level)
    run_worker(settings)


# -- send ---------------------------------------------------------------------------------
@app.command()
def send(
    prompt: str = typer.Argument(..., help="The prompt."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    system: str | None = typer.Option(None, "--system"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),  # noqa: B008
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
    from schemas.codec import codec_from_registry_url
    from streams.bootstrap import resolve_bootstrap

    settings = _settings()
    count = asyncio.run(
        run_tail(
            resolve_bootstrap(settings),
            topic,
            codec_from_registry_url(settings.schema_registry_url),
            lambda entry: print(format_line(entry), flush=True),
            from_beginning=from_beginning,
            limit=limit,
            follow=follow,
            client_options=settings.kafka_client_options(),
        )
    )
    err.print(f"[dim]{count} records[/]")


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
