"""Model versions in a running worker: current, candidate, canary share.

Operators publish ``ControlCommand`` records on ``llm.control`` (``sluice model …``).
That topic is the one rollout state: every worker reads it without a consumer group (every
worker must see every command) and folds it into a :class:`RolloutState` with
:meth:`RolloutState.apply`; the CLI folds it the same way before it publishes, and refuses
a command that fold would ignore. Each request is routed by a stable hash of its
request_id, which decides whether it falls in the candidate's canary share. The version
that answered is recorded on every result. See ``docs/rollout.md``.

Switching never stops consumption: a new version is loaded in the background while the
current one keeps serving; a version taken out of service drains what it already accepted
before it is stopped. So no request is lost or answered twice by a switch. A version that
cannot be loaded is never served: the worker serves the topic's state without it
(:meth:`RolloutState.without`), which is what served before it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from inference.backends.base import Engine
from inference.batcher import MicroBatcher
from inference.inflight import InflightDispatcher
from schemas.errors import SluiceError

logger = logging.getLogger(__name__)

Dispatcher = MicroBatcher | InflightDispatcher

COMMANDS = ("LOAD", "CANARY", "PROMOTE", "ROLLBACK")
#: How many replaced versions ``previous`` remembers (ROLLBACK reaches back this far).
MAX_PREVIOUS = 10


class RolloutCommandError(SluiceError):
    """A control command that the rollout state does not accept (and workers ignore)."""

    reason_code = "invalid_control_command"


@dataclass(frozen=True)
class RolloutState:
    """The rollout as the control topic says it is.

    ``None`` as a version is the worker's configured (base) model, always loaded.
    ``previous`` is the stack of versions that PROMOTE replaced, newest last, at most
    :data:`MAX_PREVIOUS` of them (the oldest is forgotten).
    """

    current: str | None = None
    candidate: str | None = None
    canary_percent: int = 0
    previous: tuple[str | None, ...] = ()

    def transition(self, command: Mapping[str, Any]) -> RolloutState:
        """The state after ``command`` (a decoded ControlCommand); raises
        :class:`RolloutCommandError` saying why if the command does not apply here.

        The one set of rules: workers fold the topic with it (through :meth:`apply`), and
        the CLI checks a command with it before publishing."""
        verb = command.get("command")
        if verb == "LOAD":
            version = command.get("version")
            if not isinstance(version, str) or not version:
                raise RolloutCommandError("LOAD needs a version")
            if version == self.current:
                raise RolloutCommandError(f"{version!r} is already the current version")
            return replace(self, candidate=version, canary_percent=0)
        if verb == "CANARY":
            percent = command.get("percent")
            if self.candidate is None:
                raise RolloutCommandError("no candidate loaded: LOAD a version first")
            if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
                raise RolloutCommandError(
                    f"canary percent must be an integer 0..100, not {percent!r}"
                )
            return replace(self, canary_percent=percent)
        if verb == "PROMOTE":
            if self.candidate is None:
                raise RolloutCommandError("no candidate loaded: nothing to promote")
            previous = (*self.previous, self.current)[-MAX_PREVIOUS:]
            return RolloutState(current=self.candidate, previous=previous)
        if verb == "ROLLBACK":
            if self.candidate is not None:
                return replace(self, candidate=None, canary_percent=0)
            if self.previous:
                return RolloutState(current=self.previous[-1], previous=self.previous[:-1])
            raise RolloutCommandError("nothing to roll back: no candidate and no previous version")
        raise RolloutCommandError(
            f"unknown control command {verb!r} (expected one of {', '.join(COMMANDS)})"
        )

    def apply(self, command: Mapping[str, Any]) -> RolloutState:
        """:meth:`transition`, except that a command it refuses is ignored with a warning:
        the topic is the log of what operators asked for, invalid entries included."""
        try:
            return self.transition(command)
        except RolloutCommandError as exc:
            logger.warning("ignoring control command %s: %s", command.get("command"), exc)
            return self

    def needed(self) -> set[str | None]:
        """Versions that must be loaded to serve this state."""
        return {self.current} | ({self.candidate} if self.candidate is not None else set())

    def without(self, *versions: str | None) -> RolloutState:
        """This state with ``versions`` taken out of service (they could not be loaded):
        a missing candidate is dropped with its canary, a missing current is replaced by
        the newest previous version still available (in the end the base model)."""
        gone = {v for v in versions if v is not None}
        if not gone:
            return self
        previous = list(self.previous)
        current = self.current
        while current in gone:
            current = previous.pop() if previous else None
        candidate = None if self.candidate in gone else self.candidate
        return RolloutState(
            current=current,
            candidate=candidate,
            canary_percent=self.canary_percent if candidate is not None else 0,
            previous=tuple(v for v in previous if v not in gone),
        )


def fold(commands: Iterable[Mapping[str, Any]], start: RolloutState | None = None) -> RolloutState:
    """The state a log of commands leaves (invalid commands ignored, as workers do)."""
    state = start if start is not None else RolloutState()
    for command in commands:
        state = state.apply(command)
    return state


def canary_bucket(request_id: str) -> int:
    """0..99, stable for a request id (a re-delivered request goes the same way)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=4).digest()) % 100


@dataclass
class Route:
    """One loaded version: its engine and the dispatcher feeding it."""

    version: str | None
    engine: Engine
    dispatcher: Dispatcher
    retired: bool = field(default=False)


RouteFactory = Callable[[str | None], Awaitable[Route]]
LoadErrorHook = Callable[[str, BaseException], None]


class ModelRouter:
    """Holds the loaded versions and picks one per request.

    ``target`` is the topic's state (the fold of every command seen); ``state`` is what
    this worker serves: ``target`` without the versions it failed to load. Each change
    (:meth:`apply` for a live command, :meth:`adopt` for the fold of a catch-up) loads
    what the new state needs before switching to it, then retires what it no longer needs
    after their in-flight requests finish. The version a PROMOTE replaced stays loaded
    while it is the newest previous one (a ROLLBACK is then instant); nothing is loaded
    for a ROLLBACK in advance.
    """

    def __init__(
        self,
        base: Route,
        make_route: RouteFactory,
        *,
        on_load_error: LoadErrorHook | None = None,
    ) -> None:
        """``on_load_error(version, exc)`` is told of every version that failed to load
        (for a metric); the failure is logged either way."""
        self._routes: dict[str | None, Route] = {None: base}
        self._make_route = make_route
        self._on_load_error = on_load_error
        self.state = RolloutState()
        self.target = RolloutState()
        #: Versions whose last load failed, with the error (tried again on each change).
        self.failed: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Route:
        return self._routes[self.state.current]

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def loaded(self) -> set[str | None]:
        """Versions with an engine loaded now (``None``: the base model)."""
        return set(self._routes)

    def pick(self, request_id: str) -> Route:
        state = self.state
        if (
            state.candidate is not None
            and state.canary_percent > 0
            and state.candidate in self._routes
            and canary_bucket(request_id) < state.canary_percent
        ):
            return self._routes[state.candidate]
        return self._routes[state.current]

    async def apply(self, command: Mapping[str, Any]) -> RolloutState:
        """Fold one live command in and serve the result. Returns the served state."""
        async with self._lock:
            target = self.target.apply(command)
            retiring = await self._switch(target)
        await self._retire_all(retiring)
        return self.state

    async def adopt(self, state: RolloutState) -> RolloutState:
        """Serve ``state`` (the fold of the whole topic at catch-up): loads exactly the
        versions it needs, one load per version however long the history. Returns the
        served state."""
        async with self._lock:
            retiring = await self._switch(state)
        await self._retire_all(retiring)
        return self.state

    async def _switch(self, target: RolloutState) -> list[str | None]:
        """Load what ``target`` needs, switch to it; returns the versions to retire."""
        serving, failed = await self._load_for(target)
        old_state, self.target, self.state = self.state, target, serving
        if failed:
            logger.error(
                "rollout: serving %s instead of %s (could not load %s)",
                serving,
                target,
                ", ".join(sorted(failed)),
            )
        logger.info("rollout: %s -> %s", old_state, serving)
        keep = serving.needed() | set(serving.previous[-1:])
        return [v for v in self._routes if v not in keep and v is not None]

    async def _load_for(self, target: RolloutState) -> tuple[RolloutState, set[str]]:
        """Load ``target``'s versions; the state that can be served, and what failed."""
        failed: set[str] = set()
        while True:
            serving = target.without(*failed)
            missing = [
                v
                for v in (serving.current, serving.candidate)
                if v is not None and v not in self._routes
            ]
            if not missing:
                return serving, failed
            for version in missing:
                try:
                    logger.info("loading model version %s", version)
                    self._routes[version] = await self._make_route(version)
                except Exception as exc:
                    failed.add(version)
                    self.failed[version] = f"{type(exc).__name__}: {exc}"
                    logger.error("could not load model version %s: %s", version, exc)
                    if self._on_load_error is not None:
                        self._on_load_error(version, exc)
                    break
                self.failed.pop(version, None)

    async def _retire_all(self, versions: list[str | None]) -> None:
        for version in versions:
            await self._retire(version)

    async def _retire(self, version: str | None) -> None:
        route = self._routes.pop(version, None)
        if route is None:
            return
        route.retired = True
        await route.dispatcher.stop()  # finishes what it accepted
        await route.engine.stop()
        logger.info("retired model version %s", version)

    async def stop(self) -> None:
        for route in list(self._routes.values()):
            await route.dispatcher.stop()
        for route in list(self._routes.values()):
            await route.engine.stop()
