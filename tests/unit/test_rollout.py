"""Rollout state, canary routing, version switching and version loading (pure logic; fake
engines, the fake TensorRT-LLM package, a registry in a temporary folder)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from inference.backends.base import Engine
from inference.batcher import MicroBatcher
from inference.registry import InvalidModelFolderError, ModelRegistry, UnknownVersionError
from inference.types import Completion, GenerationRequest, Sampling
from streams.engines import build_engine, settings_for_version, version_loader
from streams.rollout import (
    MAX_PREVIOUS,
    ModelRouter,
    RolloutCommandError,
    RolloutState,
    Route,
    canary_bucket,
    fold,
)
from streams.settings import Settings
from tests.unit.fake_tensorrt_llm import install


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


def load(version: str) -> dict:
    return {"command": "LOAD", "version": version}


def canary(percent: object) -> dict:
    return {"command": "CANARY", "percent": percent}


PROMOTE = {"command": "PROMOTE"}
ROLLBACK = {"command": "ROLLBACK"}


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


@pytest.mark.parametrize(
    ("state", "command", "reason"),
    [
        (RolloutState(), canary(20), "no candidate loaded"),
        (RolloutState(), PROMOTE, "no candidate loaded"),
        (RolloutState(), ROLLBACK, "nothing to roll back"),
        (RolloutState(), {"command": "LOAD"}, "LOAD needs a version"),
        (RolloutState(current="v1", previous=(None,)), load("v1"), "already the current"),
        (RolloutState(candidate="v2"), canary(101), "0..100"),
        (RolloutState(candidate="v2"), canary(-1), "0..100"),
        (RolloutState(candidate="v2"), canary(2.5), "0..100"),
        (RolloutState(candidate="v2"), canary(True), "0..100"),
        (RolloutState(candidate="v2"), canary(None), "0..100"),
        (RolloutState(), {"command": "RESTART"}, "unknown control command 'RESTART'"),
    ],
)
def test_transition_refuses_with_the_reason_and_apply_ignores(
    state: RolloutState, command: dict, reason: str
) -> None:
    with pytest.raises(RolloutCommandError, match=reason):
        state.transition(command)
    assert state.apply(command) is state  # what a worker does with it: nothing


def test_transition_and_apply_agree_on_valid_commands() -> None:
    state = RolloutState()
    for command in (load("v1"), canary(10), load("v2"), canary(30), PROMOTE, ROLLBACK):
        assert state.transition(command) == state.apply(command)
        state = state.apply(command)
    assert state == RolloutState(current=None)


def test_fold_of_a_history() -> None:
    history = [load("v1"), PROMOTE, load("v2"), canary(50), PROMOTE, load("v3"), canary(5)]
    history.insert(1, canary(200))  # invalid entries in the log are skipped, as workers do
    assert fold(history) == RolloutState(
        current="v2", candidate="v3", canary_percent=5, previous=(None, "v1")
    )
    assert fold([]) == RolloutState()
    assert fold([ROLLBACK], RolloutState(current="v1", previous=(None,))) == RolloutState()


def test_previous_remembers_the_last_ten_promotions() -> None:
    history = [c for i in range(1, 13) for c in (load(f"v{i}"), PROMOTE)]
    state = fold(history)
    assert state.current == "v12"
    assert MAX_PREVIOUS == 10
    assert state.previous == tuple(f"v{i}" for i in range(2, 12)), "None and v1 forgotten"
    state = fold([ROLLBACK] * 10, state)
    assert state == RolloutState(current="v2")
    with pytest.raises(RolloutCommandError, match="nothing to roll back"):
        state.transition(ROLLBACK)


def test_without_takes_unloadable_versions_out() -> None:
    state = RolloutState(current="v2", candidate="v3", canary_percent=5, previous=(None, "v1"))
    assert state.without() == state
    assert state.without(None) == state, "the base model is always there"
    assert state.without("v3") == RolloutState(current="v2", previous=(None, "v1"))
    assert state.without("v2") == RolloutState(
        current="v1", candidate="v3", canary_percent=5, previous=(None,)
    )
    assert state.without("v2", "v1", "v3") == RolloutState(current=None)
    assert RolloutState(current="v1", previous=("v0", "v1")).without("v1") == RolloutState(
        current="v0"
    )


# -- switching and adopting -------------------------------------------------------------
class Loads:
    """A route factory that counts loads; versions in ``broken`` fail to load."""

    def __init__(self, broken: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[str | None] = []
        self.engines: dict[str, VersionEngine] = {}
        self.broken = broken

    async def __call__(self, version: str | None) -> Route:
        self.calls.append(version)
        assert version is not None, "the base model is never loaded again"
        if version in self.broken:
            raise UnknownVersionError(f"unknown model version {version!r}")
        self.engines[version] = VersionEngine(version)
        route = _route(version, self.engines[version])
        await route.dispatcher.start()
        return route


async def _router(loads: Loads, **kwargs: object) -> ModelRouter:
    base = _route(None, VersionEngine("base"))
    await base.dispatcher.start()
    return ModelRouter(base, loads, **kwargs)  # type: ignore[arg-type]


async def test_adopt_loads_only_what_the_folded_history_needs() -> None:
    history = [load(f"v{i}") for i in range(1, 6)] + [canary(20)]
    loads = Loads()
    router = await _router(loads)
    state = await router.adopt(fold(history))
    assert loads.calls == ["v5"], "a history of 5 LOADs loads 1"
    assert state == router.state == router.target
    assert state == RolloutState(candidate="v5", canary_percent=20)
    assert router.loaded() == {None, "v5"}
    assert {router.pick(f"r{i}").version for i in range(200)} == {None, "v5"}
    await router.stop()


async def test_adopt_after_promotions_loads_the_current_and_candidate_only() -> None:
    history = [load("v1"), PROMOTE, load("v2"), PROMOTE, load("v3"), canary(10)]
    loads = Loads()
    router = await _router(loads)
    await router.adopt(fold(history))
    assert sorted(loads.calls) == ["v2", "v3"], "v1 (previous) is not loaded in advance"
    assert router.current.version == "v2"
    # Live commands continue from the adopted fold; ROLLBACK twice needs v1 only then.
    await router.apply(ROLLBACK)
    assert router.state == RolloutState(current="v2", previous=(None, "v1"))
    assert loads.engines["v3"].stopped, "the dropped candidate was retired"
    await router.apply(ROLLBACK)
    assert loads.calls[-1] == "v1" and router.current.version == "v1"
    assert loads.engines["v2"].stopped, "rolled back from: retired"
    # The version a PROMOTE replaces stays loaded (warm) for an instant ROLLBACK.
    await router.apply(load("v4"))
    await router.apply(PROMOTE)
    assert not loads.engines["v1"].stopped and router.loaded() == {None, "v1", "v4"}
    calls = len(loads.calls)
    await router.apply(ROLLBACK)
    assert len(loads.calls) == calls and router.current.version == "v1"
    assert loads.engines["v4"].stopped
    # Only the newest previous stays warm: two promotions retire the older one.
    for version in ("v5", "v6"):
        await router.apply(load(version))
        await router.apply(PROMOTE)
    assert router.state.previous == (None, "v1", "v5")
    assert router.loaded() == {None, "v5", "v6"} and loads.engines["v1"].stopped
    await router.stop()


async def test_failed_load_leaves_state_unchanged() -> None:
    errors: list[tuple[str, BaseException]] = []
    loads = Loads(broken={"nope"})
    router = await _router(loads, on_load_error=lambda v, e: errors.append((v, e)))
    state = await router.apply(load("nope"))
    assert state == router.state == RolloutState(), "the base model keeps serving"
    assert router.target == RolloutState(candidate="nope"), "the topic's fold goes on"
    assert router.pick("x").version is None
    assert [v for v, _ in errors] == ["nope"] and "unknown model version" in router.failed["nope"]
    # A CANARY of the missing candidate tries again, and still sends nothing there.
    await router.apply(canary(50))
    assert loads.calls == ["nope", "nope"]
    assert router.state == RolloutState() and {router.pick(f"r{i}").version for i in range(50)} == {
        None
    }
    # A LOAD of a good version replaces it, as on every other worker.
    await router.apply(load("v2"))
    assert router.state == RolloutState(candidate="v2")
    await router.stop()


async def test_adopt_falls_back_to_what_served_before_a_missing_version() -> None:
    history = [load("v1"), PROMOTE, load("gone"), PROMOTE, load("v3"), canary(10)]
    loads = Loads(broken={"gone"})
    router = await _router(loads)
    state = await router.adopt(fold(history))
    assert state == RolloutState(
        current="v1", candidate="v3", canary_percent=10, previous=(None,)
    ), "never the base model under the missing version's label"
    assert router.current.engine.model_version == "v1"
    assert set(loads.calls) == {"gone", "v1", "v3"}
    await router.stop()


# -- loading a version: every backend gets the folder where it reads its model ------------
def _registry_with(tmp_path: Path, version: str) -> ModelRegistry:
    folder = tmp_path / "src" / version
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(folder, version)
    return registry


@pytest.mark.parametrize(
    ("backend", "field", "base"),
    [
        ("torch", "model_path", Path("/models/base")),
        ("tensorrt_llm", "trt_model", "org/base-model"),
        ("benchmark", None, None),
    ],
)
def test_settings_for_version_points_each_backend_at_the_folder(
    tmp_path: Path, backend: str, field: str | None, base: object
) -> None:
    settings = Settings(home=tmp_path, backend=backend, model_path=None, trt_model=None)
    if field is not None:
        settings = settings.model_copy(update={field: base})
    folder = tmp_path / "registry" / "versions" / "v2"
    versioned = settings_for_version(settings, "v2", folder)
    assert versioned.model_version == "v2"
    if field == "model_path":
        assert versioned.model_path == folder
    elif field == "trt_model":
        assert versioned.trt_model == str(folder)
        assert versioned.model_path == settings.model_path
    else:
        assert versioned.model_dump(exclude={"model_version"}) == settings.model_dump(
            exclude={"model_version"}
        )
    assert settings.model_version is None, "the worker's own settings are not changed"


def test_torch_engine_of_a_version_reads_its_folder(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v2")
    settings = Settings(home=tmp_path, backend="torch", registry_dir=registry.root)
    engine = build_engine(settings_for_version(settings, "v2", registry.path("v2")))
    assert engine.model_dir == registry.path("v2")  # type: ignore[attr-defined]
    assert engine.model_version == "v2"


async def test_tensorrt_llm_load_gets_the_version_folder_in_trt_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = install(monkeypatch)
    registry = _registry_with(tmp_path, "v2")
    settings = Settings(
        home=tmp_path,
        backend="tensorrt_llm",
        trt_model="org/base-model",
        registry_dir=registry.root,
    )
    engine = await version_loader(settings)("v2")
    try:
        assert fake.llm.model == str(registry.path("v2")), "the LLM read the version's folder"
        assert engine.model_version == "v2"
        assert [llm.model for llm in fake.instances] == [str(registry.path("v2"))]
    finally:
        await engine.stop()


async def test_benchmark_load_carries_the_version_label(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v2")
    settings = Settings(home=tmp_path, backend="benchmark", registry_dir=registry.root)
    assert build_engine(settings).model_version == "benchmark"
    engine = await version_loader(settings)("v2")
    assert engine.model_version == "v2"


async def test_missing_version_fails_clearly_and_builds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = install(monkeypatch)
    registry = _registry_with(tmp_path, "v2")
    settings = Settings(
        home=tmp_path,
        backend="tensorrt_llm",
        trt_model="org/base-model",
        registry_dir=registry.root,
    )
    loader = version_loader(settings)
    with pytest.raises(UnknownVersionError, match=r"unknown model version 'v9'.*registered: v2"):
        await loader("v9")
    (registry.path("v2") / "config.json").unlink()
    (registry.path("v2") / "MODEL_CARD.md").unlink()
    (registry.path("v2") / "SLUICE_VERSION").unlink()
    registry.path("v2").rmdir()
    with pytest.raises(InvalidModelFolderError, match="folder .* is gone"):
        await loader("v2")
    assert fake.instances == [], "no engine was built: the base model was not relabelled"


async def test_router_with_the_version_loader_never_relabels_the_base(tmp_path: Path) -> None:
    """The real loader (benchmark backend) under the router: a LOAD of a version the
    registry lacks serves nothing new; a registered one answers under its own label."""
    registry = _registry_with(tmp_path, "v2")
    settings = Settings(home=tmp_path, backend="benchmark", registry_dir=registry.root)
    loader = version_loader(settings)

    async def make_route(version: str | None) -> Route:
        assert version is not None
        engine = await loader(version)
        route = _route(version, engine)
        await route.dispatcher.start()
        return route

    base_engine = build_engine(settings)
    base = _route(None, base_engine)
    await base.dispatcher.start()
    router = ModelRouter(base, make_route)
    await router.apply(load("v9"))
    await router.apply(canary(100))
    assert router.pick("r").engine is base_engine and router.state == RolloutState()
    await router.apply(load("v2"))
    await router.apply(canary(100))
    assert router.pick("r").engine.model_version == "v2"
    await router.stop()
