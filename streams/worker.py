"""``sluice worker``: prepare everything, then run the Faust worker.

Order matters: the model is loaded and the answered index read *before* the worker joins
the consumer group, so it never holds partitions it cannot serve yet.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import faust
from prometheus_client import CollectorRegistry

from schemas.codec import codec_from_registry_url
from streams.app import build_app
from streams.bootstrap import resolve_bootstrap
from streams.control import ControlListener
from streams.dedup import load_answered
from streams.engines import build_engine, version_loader
from streams.holes import HoleReader
from streams.metrics import WorkerMetrics, serve_metrics
from streams.pipeline import IntakePipeline
from streams.settings import Settings
from streams.topics import ensure_topics

logger = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    """Run one worker until SIGINT/SIGTERM. Blocks."""
    bootstrap = resolve_bootstrap(settings)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pipeline = loop.run_until_complete(_prepare(settings, bootstrap))
    app = build_app(settings, pipeline, bootstrap, web_port=_free_port())
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level)
    logger.info(
        "worker %s consuming %s from %s", settings.worker_id, settings.requests_topic, bootstrap
    )
    worker.execute_from_commandline()


async def _prepare(settings: Settings, bootstrap: str) -> IntakePipeline:
    await ensure_topics(settings, bootstrap)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    engine = build_engine(settings, registry)
    await engine.start()
    answered = await load_answered(
        bootstrap,
        settings.results_topic,
        settings.dedup_capacity,
        settings.kafka_client_options(),
    )
    logger.info("answered index: %d request ids from %s", len(answered), settings.results_topic)
    if settings.metrics_port >= 0:
        _, port = serve_metrics(registry, settings.metrics_host, settings.metrics_port)
        logger.info("metrics: http://%s:%d/metrics", settings.metrics_host, port)
    codec = codec_from_registry_url(settings.schema_registry_url)

    pipeline = IntakePipeline(settings, engine, codec, metrics, answered, version_loader(settings))
    pipeline.holes = HoleReader(bootstrap, settings.app_id, settings.kafka_client_options())
    pipeline.control = ControlListener(
        bootstrap,
        settings.control_topic,
        codec,
        pipeline.apply_control,
        settings.kafka_client_options(),
    )
    applied = await pipeline.control.catch_up()
    logger.info("rollout: %d control commands applied: %s", applied, pipeline.router.state)
    return pipeline


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
