"""Rollout state, canary routing and version switching (pure logic; fake engines)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from inference.backends.base import Engine
from inference.batcher import MicroBatcher
from inference.types import Completion, GenerationRequest, Sampling
from streams.rollout import ModelRouter, RolloutState, Route, canary_bucket


class VersionEngine(Engine):
    """Answers with its own version after a short delay (pure fake for routing logic)."""

    def __init__(self, version: str, delay: float = 0.01) -> None:
        self.model_name, self.model_version, self.delay = "m", version, delay
        self.stopped = False

    async def start(self) -> None: ...

    async def stop(self) -> None:
        self.stopped = True

    def encode_prompt(self, prompt: str, *, system: str | None, raw: bool) -> list[int]:
        return [1, 2]

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Completion]:
        await asyncio.sleep(self.delay)
        return [Completion(self.model_version, "stop", 2, 1) for _ in batch]


def _route(version: str | None, engine: Engine) -> Route:
    return Route(version, engine, MicroBatcher(engine.generate, max_wait_s=0.001))


def test_state_machine() -> None:
    s = RolloutState()
    s = s.apply({"command": "CANARY", "percent": 20})
    assert s == RolloutState(), "canary without a candidate is ignored"
    s = s.apply({"command": "LOAD", "version": "v2"})
    assert (s.current, s.candidate, s.canary_percent) == (None, "v2", 0)
    s = s.apply({"command": "CANARY", "percent": 20})
    assert s.canary_percent == 20
    assert s.apply({"command": "CANARY", "percent": 101}).canary_percent == 20
    promoted = s.apply({"command": "PROMOTE"})
    assert (promoted.current, promoted.candidate, promoted.previous) == ("v2", None, (None,))
    back = promoted.apply({"command": "ROLLBACK"})
    assert (back.current, back.previous) == (None, ())
    assert back.apply({"command": "ROLLBACK"}) == back, "nothing left to roll back"
    dropped = s.apply({"command": "ROLLBACK"})
    assert (dropped.current, dropped.candidate, dropped.canary_percent) == (None, None, 0)


def test_canary_bucket_is_stable_and_uniform() -> None:
    ids = [f"req-{i}" for i in range(20_000)]
    buckets = [canary_bucket(i) for i in ids]
    assert buckets == [canary_bucket(i) for i in ids]
    share = sum(b < 20 for b in buckets) / len(buckets)
    assert 0.18 < share < 0.22


async def test_router_switches_without_losing_requests() -> None:
    engines: dict[str, VersionEngine] = {}

    async def load(version: str | None) -> Route:
        assert version is not None
        engines[version] = VersionEngine(version)
        route = _route(version, engines[version])
        await route.dispatcher.start()
        return route

    base = _route(None, VersionEngine("base"))
    await base.dispatcher.start()
    router = ModelRouter(base, load)
    futures: list[asyncio.Future] = []

    async def send(n: int) -> None:
        for i in range(n):
            rid = f"r{len(futures)}-{i}"
            req = GenerationRequest(rid, "p", Sampling(max_new_tokens=1), prompt_ids=[1, 2])
            futures.append(await router.pick(rid).dispatcher.submit(req))

    await send(50)
    await router.apply({"command": "LOAD", "version": "v2"})
    await router.apply({"command": "CANARY", "percent": 20})
    await send(500)
    await router.apply({"command": "PROMOTE"})
    await send(50)
    await router.apply({"command": "ROLLBACK"})
    await send(50)
    outcomes = await asyncio.gather(*futures)
    texts = [o.completion.text for o in outcomes]
    assert len(texts) == 650 and all(o.ok for o in outcomes), "a request was lost"
    canary = texts[50:550]
    assert 0.12 < canary.count("v2") / len(canary) < 0.28
    assert set(texts[550:600]) == {"v2"} and set(texts[600:]) == {"base"}
    assert router.state == RolloutState(current=None, previous=())
    assert engines["v2"].stopped, "the rolled-back version was retired"
    await router.stop()


async def test_failed_load_leaves_state_unchanged() -> None:
    async def broken(version: str | None) -> Route:
        raise FileNotFoundError(version)

    base = _route(None, VersionEngine("base"))
    router = ModelRouter(base, broken)
    with pytest.raises(FileNotFoundError):
        await router.apply({"command": "LOAD", "version": "nope"})
    assert router.state == RolloutState()
    assert router.pick("x") is base
