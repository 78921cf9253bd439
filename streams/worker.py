"""``sluice worker``: prepare everything for the worker's role, then run the Faust worker.

Order matters: the model is loaded and the answered index read *before* the worker joins
the consumer group, so it never holds partitions it cannot serve yet.

Shutdown is bounded: on SIGTERM/SIGINT a watchdog starts, and if the orderly shutdown
(drain, final commit, leaving the group) has not ended within ``shutdown_grace_s`` the
process exits anyway (a broker that is gone can hold Faust's own shutdown for minutes).
Offsets not committed by then are read again by the next owner; nothing is lost.

Exit codes: 0 after an orderly stop, :data:`EXIT_ENGINE_DEAD` when the engine died (the
orchestrator restarts the worker), :data:`EXIT_GRACE_EXCEEDED` when the watchdog ended it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading

import faust
from prometheus_client import CollectorRegistry

from schemas.registry import awarm_up
from streams.app import build_app
from streams.bootstrap import resolve_bootstrap
from streams.codecs import codec_from_settings
from streams.control import ControlListener, announce_keys
from streams.control_auth import control_keys
from streams.dedup import load_answered
from streams.engines import build_engine, version_loader
from streams.holes import HoleReader
from streams.kafka_clients import OutboxProducer
from streams.metrics import WorkerMetrics, serve_metrics
from streams.pipeline import IntakePipeline
from streams.settings import Settings
from streams.topics import ensure_topics

logger = logging.getLogger(__name__)

EXIT_ENGINE_DEAD = 3
EXIT_GRACE_EXCEEDED = 4


class _Watchdog:
    """Ends the process ``grace_s`` after the first stop signal, if it is still there."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self._timer is not None:
            return
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        logger.error(
            "shutdown took longer than %.0f s (broker unreachable?); exiting now. Offsets "
            "not committed are read again by the next owner.",
            self.grace_s,
        )
        logging.shutdown()
        os._exit(EXIT_GRACE_EXCEEDED)


class Worker(faust.Worker):
    """Faust's worker with a bounded shutdown (see the module docstring)."""

    def __init__(self, *args: object, watchdog: _Watchdog, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def _on_sigterm(self) -> None:
        self._watchdog.arm()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self._watchdog.arm()
        super()._on_sigint()


def run_worker(settings: Settings) -> int:
    """Run one worker until SIGINT/SIGTERM (or until its engine dies). Returns the exit
    code."""
    bootstrap = resolve_bootstrap(settings)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pipeline = None
    registry = None
    if settings.worker_role in ("inference", "all"):
        pipeline = loop.run_until_complete(_prepare(settings, bootstrap))
    else:
        loop.run_until_complete(ensure_topics(settings, bootstrap))
    if settings.worker_role == "metrics" and settings.metrics_port >= 0:
        registry = CollectorRegistry()  # the job's counters and the monitors' gauges
        _, port = serve_metrics(registry, settings.metrics_host, settings.metrics_port)
        logger.info("metrics: http://%s:%d/metrics", settings.metrics_host, port)
    producer = OutboxProducer(bootstrap, settings.kafka_client_options())
    app = build_app(
        settings, pipeline, bootstrap, web_port=_free_port(), producer=producer, registry=registry
    )
    watchdog = _Watchdog(settings.shutdown_grace_s)
    worker = Worker(app, loop=loop, loglevel=settings.log_level, watchdog=watchdog)
    logger.info(
        "worker %s (role %s) consuming from %s",
        settings.worker_id,
        settings.worker_role,
        bootstrap,
    )
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    if pipeline is not None and pipeline.failed is not None:
        logger.critical("exiting with %d: the engine died (%s)", EXIT_ENGINE_DEAD, pipeline.failed)
        return EXIT_ENGINE_DEAD
    return code


def _stop_self(error: BaseException) -> None:
    """The engine died: stop this worker the way an orchestrator would (SIGTERM), so the
    orderly shutdown (commit what was answered) runs, then exit non-zero."""
    del error
    os.kill(os.getpid(), signal.SIGTERM)


async def _prepare(settings: Settings, bootstrap: str) -> IntakePipeline:
    keys = control_keys(settings)  # a bad key setting fails before anything starts
    await ensure_topics(settings, bootstrap)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    engine = build_engine(settings, registry)
    await engine.start()
    options = settings.kafka_client_options()
    answered = await load_answered(
        bootstrap, [settings.results_topic, settings.dlq_topic], settings.dedup_capacity, options
    )
    logger.info(
        "answered index: %d request ids from %s and %s",
        len(answered),
        settings.results_topic,
        settings.dlq_topic,
    )
    if settings.metrics_port >= 0:
        _, port = serve_metrics(registry, settings.metrics_host, settings.metrics_port)
        logger.info("metrics: http://%s:%d/metrics", settings.metrics_host, port)
    codec = codec_from_settings(settings)
    await awarm_up(codec, ("InferenceResult", "DeadLetter"))  # encode never waits on a registry
    pipeline = IntakePipeline(
        settings,
        engine,
        codec,
        metrics,
        answered,
        version_loader(settings),
        holes=HoleReader(bootstrap, settings.app_id, options),
        on_fatal=_stop_self,
    )
    announce_keys(keys, settings.control_topic)
    control = ControlListener(
        bootstrap,
        settings.control_topic,
        codec,
        pipeline.apply_control,
        options,
        adopt=pipeline.adopt_rollout,
        keys=keys,
        on_rejected=lambda reason: metrics.child(metrics.control_rejected_total, reason).inc(),
    )
    pipeline.attach_control(control)
    read = await control.catch_up()
    logger.info("rollout: %d control commands read: %s", read, pipeline.router.state)
    return pipeline


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":  # pragma: no cover - `sluice worker` is the entry point
    sys.exit(run_worker(Settings()))
