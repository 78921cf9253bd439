"""The intake pipeline: raw Kafka records in, results and dead letters out, offsets committed.

The Faust agent hands every record to :meth:`IntakePipeline.handle`; nothing else in the
agent. Here a record is decoded, checked against the answered index, admitted, routed to a
model version and submitted to its dispatcher; when its outcome is ready it is published.
The pieces around it each have one job:

* :class:`streams.offsets.OffsetKeeper`: which offsets were read, answered and may be
  committed; ownership across rebalances; records the stream skipped.
* :class:`streams.outbox.Outbox`: publishing, retries by error kind, delivery callbacks.
* :mod:`streams.outcomes`: what an engine's answer means (publish, retry, or stop: the
  engine is dead).
* :class:`streams.rollout.ModelRouter`: which version serves a request.

A request's offset is marked finished only when the broker has acknowledged its result or
dead letter, so a crash at any point loses nothing: what was not committed is read again,
and what was already answered is recognised by request_id and not answered twice. The
whole design is written down in docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from inference.backends.base import Engine
from inference.batcher import MicroBatcher
from inference.errors import BatcherClosedError, InvalidRequestError
from inference.inflight import InflightDispatcher
from inference.types import BatchOutcome, Completion, GenerationRequest
from schemas.codec import AvroCodec
from schemas.errors import RegistryError, SchemaError
from schemas.registry import adecode
from streams.admission import Admission, AdmissionLimits
from streams.dedup import AnsweredIndex
from streams.log_limits import RateLimitedLogger
from streams.metrics import WorkerMetrics
from streams.offsets import Assigned, Committer, Highwater, HoleSource, OffsetKeeper
from streams.outbox import Outbox, Outgoing, Producer
from streams.outcomes import Verdict, judge, retry_delay
from streams.records import SourceRecord, dead_letter, now_ms, result_record, truncate_original
from streams.rollout import Dispatcher, ModelRouter, RolloutState, Route
from streams.settings import Settings
from streams.slots import Slots

logger = logging.getLogger(__name__)

OnFatal = Callable[[BaseException], None]
#: Bytes of the original value a dead letter keeps when the whole would not fit.
DLQ_SHRUNK_BYTES = 4096


@dataclass
class _Request:
    """One admitted request on its way through an engine."""

    request_id: str
    created_ms: int
    read_ms: int
    request: GenerationRequest
    route: Route
    attempts: int = 0


class IntakePipeline:
    """Everything between a raw ``llm.requests`` record and its published answer."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        codec: AvroCodec,
        metrics: WorkerMetrics,
        answered: AnsweredIndex,
        load_version: Callable[[str], Awaitable[Engine]] | None = None,
        *,
        holes: HoleSource | None = None,
        on_fatal: OnFatal | None = None,
    ) -> None:
        """``engine`` is the base model (started); ``load_version`` loads (and starts) a
        registry version when a rollout command asks for one; ``holes`` reads what the
        stream skipped (None: trust the stream); ``on_fatal`` is told once when the engine
        died (the worker stops and exits non-zero)."""
        self.settings = settings
        self.engine = engine
        self.codec = codec
        self.metrics = metrics
        self.answered = answered
        self._load_version = load_version
        self._on_fatal = on_fatal
        self.offsets = OffsetKeeper(holes=holes, metrics=metrics)
        self.outbox = Outbox(self._delivered, self._undeliverable, metrics=metrics)
        self.router = ModelRouter(
            Route(None, engine, self._dispatcher_for(engine)),
            self._route,
            on_load_error=self._load_failed,
        )
        self.admission = Admission(
            AdmissionLimits.from_settings(settings),
            served_models=lambda: {engine.model_name},
            special_tokens=engine.special_tokens,
            # tokenize once, with the engine the route chose (see _take)
            encode=lambda p, s, r: self._tokenizer.encode_prompt(p, system=s, raw=r),
        )
        self._tokenizer: Engine = engine
        self.control: Any = None  # a ControlListener, see attach_control
        self._slots = Slots(settings.max_inflight)
        self._inflight: dict[str, list[SourceRecord]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._retries: set[asyncio.Task[None]] = set()
        self._unfinished = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.failed: BaseException | None = None
        self.ready = asyncio.Event()
        self._log = RateLimitedLogger(logger, interval_s=10.0)

    # -- lifecycle ---------------------------------------------------------------------
    def attach_control(self, listener: Any) -> None:
        """The ``llm.control`` listener whose commands this pipeline applies; it is run
        (followed) from :meth:`start` on."""
        self.control = listener

    async def start(
        self,
        producer: Producer,
        committer: Committer,
        highwater: Highwater | None = None,
        assigned: Assigned | None = None,
    ) -> None:
        self.offsets.bind(committer, assigned=assigned, highwater=highwater, answer=self.handle)
        for route in self.router.routes():
            await route.dispatcher.start()
            self._mark_serving(route.engine)
        interval = self.settings.commit_interval_ms / 1000.0
        self._tasks = [
            asyncio.create_task(self.outbox.run(producer), name="sluice-outbox"),
            asyncio.create_task(self.offsets.run_commits(interval), name="sluice-committer"),
        ]
        if self.control is not None:
            self._tasks.append(asyncio.create_task(self.control.run(), name="sluice-control"))
        self.ready.set()

    async def stop(self, grace_s: float | None = None, commit_timeout: float = 5.0) -> None:
        """Stop taking records; finish what was accepted within ``grace_s`` (default: the
        settings' drain time); commit what was answered (bounded); stop the loops.

        Idempotent. Whatever is not answered by then keeps its offset uncommitted and is
        read again by the next owner of its partition (the answered index recognises what
        was answered meanwhile)."""
        if self._closing:
            return
        self._closing = True
        if not self.ready.is_set() and not self._tasks:
            return
        self.ready.clear()
        self._slots.close()
        loop = asyncio.get_running_loop()
        grace = self.settings.drain_timeout_s if grace_s is None else grace_s
        give_up = loop.time() + grace
        logger.info("draining: %d requests unanswered (up to %.0f s)", self._unfinished, grace)
        for task in list(self._retries):
            task.cancel()
        for route in self.router.routes():
            try:
                await asyncio.wait_for(route.dispatcher.stop(), max(give_up - loop.time(), 0))
            except TimeoutError:
                logger.warning("engine %s did not finish its queue in time", route.version)
        try:
            await asyncio.wait_for(self._idle.wait(), max(give_up - loop.time(), 0.01))
        except TimeoutError:
            logger.warning(
                "stopping with %d requests unanswered; their offsets stay uncommitted",
                self._unfinished,
            )
        try:
            await asyncio.wait_for(self.offsets.commit_now(), commit_timeout)
        except Exception as exc:
            logger.warning("final commit failed (%r); those offsets will be re-read", exc)
        tasks = [*self._tasks, *self._retries]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        await self.offsets.close()
        if self.control is not None:
            try:
                await asyncio.wait_for(self.control.stop(), commit_timeout)
            except Exception as exc:
                logger.warning("stopping the control listener failed: %r", exc)

    # -- intake ------------------------------------------------------------------------
    async def handle(self, source: SourceRecord) -> None:
        """Take one record. Waits while ``max_inflight`` requests are unanswered.

        A record whose partition is revoked while this waits is dropped untracked (the new
        owner reads it again); so is every record after :meth:`stop` or a fatal error."""
        claim = self.offsets.claim(source.tp)
        if self._closing:
            return
        if not self.offsets.knows(source.tp):
            await self.offsets.start_partition(claim)
        if not await self._slots.acquire():
            return
        if self._closing or not self.offsets.still_owned(claim):
            self._slots.release()
            return
        self.offsets.track(source)
        self._unfinished += 1
        self._idle.clear()
        self.metrics.inflight_requests.inc()
        await self._take(source)

    async def _take(self, source: SourceRecord) -> None:
        read_ms = now_ms()
        record = await self._decode(source)
        if record is None:
            return
        request_id = record["request_id"]
        if request_id in self.answered:
            self.metrics.duplicates_total.inc()
            self._finish([source])
            return
        if request_id in self._inflight:  # same request twice in the stream: answer once
            self.metrics.duplicates_total.inc()
            self._inflight[request_id].append(source)
            return
        route = self.router.pick(request_id)
        self._tokenizer = route.engine
        try:
            request = self.admission.admit(record, source.timestamp_ms)
        except InvalidRequestError as exc:
            self._dead_letter([source], exc.reason_code, str(exc), request_id=request_id)
            return
        except Exception as exc:  # a tokenizer or other surprise: still one answer
            logger.exception("admission failed for %s", request_id)
            self._dead_letter([source], "invalid_request", f"admission failed: {exc}", request_id)
            return
        self._inflight[request_id] = [source]
        created_ms = record.get("created_at") or source.timestamp_ms or read_ms
        self.metrics.observe_stage("queue", (read_ms - created_ms) / 1000.0)
        job = _Request(request_id, created_ms, read_ms, request, route)
        if request.deadline is not None and request.deadline <= time.monotonic():
            self._publish_result(job, None, expired=True)
            return
        await self._submit(job)

    async def _decode(self, source: SourceRecord) -> dict[str, Any] | None:
        """The request record, or None when it was dead-lettered (or the pipeline stopped
        while a retriable decode failure, such as a Schema Registry outage, was retried)."""
        attempt = 0
        while True:
            try:
                _, record = await adecode(self.codec, source.value, expected="InferenceRequest")
                return record
            except SchemaError as exc:  # the record's own fault: never retried
                self._dead_letter([source], exc.reason_code, str(exc), request_id=None)
                return None
            except RegistryError as exc:
                if not exc.retriable:  # credentials, settings, a wrong URL: no record's fault
                    self._abandon([source])
                    self._fatal(exc)
                    return None
                attempt += 1
                self._log.warning(
                    "decode-retry",
                    "decoding %s/%d@%d failed (%s); retry %d",
                    source.topic,
                    source.partition,
                    source.offset,
                    exc,
                    attempt,
                )
                await asyncio.sleep(retry_delay(attempt))
                if self._closing:
                    self._abandon([source])
                    return None

    async def _submit(self, job: _Request) -> None:
        try:
            future = await job.route.dispatcher.submit(job.request)
        except BatcherClosedError:
            if self._closing:
                self._abandon(self._inflight.pop(job.request_id, []))
                return
            # The version was retired while this waited: route again.
            job.route = self.router.pick(job.request_id)
            job.request.prompt_ids = job.route.engine.encode_prompt(
                job.request.prompt, system=job.request.system, raw=job.request.raw
            )
            await self._submit(job)
            return
        future.add_done_callback(lambda f: self._on_outcome(job, f))

    # -- engines and versions ----------------------------------------------------------
    def _dispatcher_for(self, engine: Engine) -> Dispatcher:
        """A micro-batcher for batch engines; per-request dispatch for in-flight batching."""
        settings = self.settings
        if engine.inflight_batching:
            return InflightDispatcher(
                engine.generate_one,
                max_inflight=max(1, int(engine.max_batch_size * settings.inflight_factor)),
            )

        async def run_batch(batch: Sequence[GenerationRequest]) -> list[Completion | BaseException]:
            self.metrics.batch_size.observe(len(batch))
            return await engine.generate(batch)

        return MicroBatcher(
            run_batch,
            max_batch_size=settings.batch_max_size,
            max_batch_tokens=settings.batch_max_tokens,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
            max_queue=settings.max_inflight,
        )

    async def _route(self, version: str | None) -> Route:
        if version is None:
            raise ValueError("the base model is always loaded")
        if self._load_version is None:
            raise ValueError(f"cannot load version {version}: no model registry configured")
        engine = await self._load_version(version)
        dispatcher = self._dispatcher_for(engine)
        await dispatcher.start()
        self._mark_serving(engine)
        return Route(version, engine, dispatcher)

    def _load_failed(self, version: str | None, error: BaseException) -> None:
        self.metrics.model_load_failures_total.labels(version=str(version)).inc()

    def _mark_serving(self, engine: Engine) -> None:
        self.metrics.model_info.labels(model=engine.model_name, version=engine.model_version).set(1)

    async def apply_control(self, command: dict[str, Any]) -> None:
        """Apply one rollout command (see :mod:`streams.rollout`); never raises."""
        try:
            state = await self.router.apply(command)
        except Exception:
            logger.exception("control command %s failed; rollout unchanged", command)
            return
        self._show_rollout(state)

    async def adopt_rollout(self, state: RolloutState) -> None:
        """Serve ``state`` (the fold of the whole control topic at start); never raises."""
        try:
            adopted = await self.router.adopt(state)
        except Exception:
            logger.exception("adopting rollout %s failed; serving the base model", state)
            return
        self._show_rollout(adopted)

    def _show_rollout(self, state: RolloutState) -> None:
        self.metrics.canary_percent.set(state.canary_percent if state.candidate else 0)
        self.metrics.model_info.clear()  # retired versions stop showing as served
        for route in self.router.routes():
            self._mark_serving(route.engine)

    def _on_outcome(self, job: _Request, future: asyncio.Future[BatchOutcome]) -> None:
        if future.cancelled():  # the dispatcher was torn down at shutdown
            self._abandon(self._inflight.pop(job.request_id, []))
            return
        outcome = future.result()
        verdict = judge(outcome, job.route.engine.dead_error)
        if verdict is Verdict.ANSWER:
            self._publish_result(job, outcome)
        elif verdict is Verdict.RETRY and not self._closing:
            self._retry(job, outcome.error)
        elif verdict is Verdict.RETRY:
            self._abandon(self._inflight.pop(job.request_id, []))
        else:
            self._abandon(self._inflight.pop(job.request_id, []))
            self._fatal(job.route.engine.dead_error or outcome.error or RuntimeError("dead"))

    def _retry(self, job: _Request, error: BaseException | None) -> None:
        job.attempts += 1
        self.metrics.engine_retries_total.inc()
        delay = retry_delay(job.attempts)
        self._log.warning(
            "engine-retry",
            "engine could not take %s now (%s); retry %d in %.1fs",
            job.request_id,
            error,
            job.attempts,
            delay,
        )

        async def again() -> None:
            await asyncio.sleep(delay)
            if job.request.deadline is not None and job.request.deadline <= time.monotonic():
                self._publish_result(job, None, expired=True)
                return
            await self._submit(job)

        task = asyncio.create_task(again())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    def _fatal(self, error: BaseException) -> None:
        if self.failed is not None:
            return
        self.failed = error
        self.metrics.engine_healthy.set(0)
        logger.critical(
            "the engine is dead (%s): no more requests are taken; this worker exits so it "
            "can be restarted, and its unanswered requests are read again",
            error,
        )
        self._slots.close()  # no more records are taken
        if self._on_fatal is not None:
            self._on_fatal(error)

    # -- output ------------------------------------------------------------------------
    def _publish_result(
        self, job: _Request, outcome: BatchOutcome | None, expired: bool = False
    ) -> None:
        engine = job.route.engine
        record = result_record(
            request_id=job.request_id,
            model=engine.model_name,
            model_version=engine.model_version,
            outcome=outcome,
            created_ms=job.created_ms,
            read_ms=job.read_ms,
            worker=self.settings.worker_id,
            expired=expired,
        )
        self._record_metrics(record, outcome)
        self.outbox.put(
            Outgoing(
                self.settings.results_topic,
                job.request_id.encode(),
                self.codec.encode("InferenceResult", record),
                self._inflight.get(job.request_id, []),
                request_id=job.request_id,
            )
        )

    def _dead_letter(
        self, sources: list[SourceRecord], code: str, reason: str, request_id: str | None
    ) -> None:
        source = sources[0]
        self.metrics.dlq_total.labels(reason=code).inc()
        logger.info(
            "dead-lettering %s/%d@%d: %s",
            source.topic,
            source.partition,
            source.offset,
            reason[:500],
        )
        record = dead_letter(
            source,
            code,
            reason[:4000],
            request_id=request_id,
            worker=self.settings.worker_id,
            max_original_bytes=self.settings.dlq_max_original_bytes,
        )

        def shrink() -> bytes:
            return self.codec.encode("DeadLetter", truncate_original(record, DLQ_SHRUNK_BYTES))

        self.outbox.put(
            Outgoing(
                self.settings.dlq_topic,
                source.key[:DLQ_SHRUNK_BYTES] if source.key else source.key,
                self.codec.encode("DeadLetter", record),
                sources,
                request_id=request_id,
                is_dead_letter=True,
                shrink=shrink,
            )
        )

    def _record_metrics(self, record: dict[str, Any], outcome: BatchOutcome | None) -> None:
        m = self.metrics
        m.child(m.requests_total, record["model"], record["status"]).inc()
        m.child(m.results_by_version_total, record["model_version"], record["status"]).inc()
        timings = record["timings"]
        m.observe_stage("total", timings["total_ms"] / 1000.0)
        if outcome is not None and not outcome.expired:
            m.observe_stage("batch_wait", outcome.batch_wait_s)
            m.observe_stage("inference", outcome.inference_s)
        m.child(m.tokens_total, "prompt").inc(record["prompt_tokens"])
        m.child(m.tokens_total, "completion").inc(record["completion_tokens"])

    def _delivered(self, item: Outgoing) -> None:
        if item.request_id is not None:
            self.answered.add(item.request_id)
            self._inflight.pop(item.request_id, None)
        self._finish(item.sources)

    def _undeliverable(self, item: Outgoing, error: BaseException) -> None:
        """A result the broker will never take: the request is answered with a dead letter
        instead (dead letters themselves are never given up on, see the outbox)."""
        if item.request_id is not None:
            self._inflight.pop(item.request_id, None)
        if not item.sources:
            return
        self._dead_letter(
            item.sources,
            "result_undeliverable",
            f"the result could not be published to {item.topic}: {error}",
            request_id=item.request_id,
        )

    def _finish(self, sources: Iterable[SourceRecord]) -> None:
        for source in sources:
            self.offsets.finish(source)
            self._release()

    def _abandon(self, sources: Iterable[SourceRecord]) -> None:
        """Give up on records without answering them (shutdown, dead engine): their slots
        are freed, their offsets stay unfinished so they are never committed."""
        for _ in sources:
            self._release()

    def _release(self) -> None:
        self._slots.release()
        self._unfinished -= 1
        self.metrics.inflight_requests.dec()
        if self._unfinished == 0:
            self._idle.set()

    # -- commits and rebalances ------------------------------------------------------------
    async def commit_now(self) -> dict[Hashable, int]:
        return await self.offsets.commit_now()

    async def on_partitions_revoked(self, tps: set[Hashable]) -> None:
        """Before a rebalance takes partitions away: commit what is done, then forget them."""
        await self.offsets.revoke(tps)

    @property
    def watermarks(self) -> Any:
        return self.offsets.watermarks
