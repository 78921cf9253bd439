"""Model versions in a running worker: current, candidate, canary share.

Operators publish :data:`ControlCommand` records on ``llm.control`` (``sluice model …``).
Every worker reads that topic without a consumer group (every worker must see every
command), folds the commands into a :class:`RolloutState` and routes each request:
a stable hash of its request_id decides whether it falls in the candidate's canary share.
The version that answered is recorded on every result.

Switching never stops consumption: a new version is loaded in the background while the
current one keeps serving; a version taken out of service drains what it already accepted
before it is stopped. So no request is lost or answered twice by a switch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from inference.backends.base import Engine
from inference.batcher import MicroBatcher
from inference.inflight import InflightDispatcher

logger = logging.getLogger(__name__)

Dispatcher = MicroBatcher | InflightDispatcher


@dataclass(frozen=True)
class RolloutState:
    """The rollout as the control topic says it is."""

    current: str | None = None  # None: the worker's configured (base) model
    candidate: str | None = None
    canary_percent: int = 0
    previous: tuple[str | None, ...] = ()

    def apply(self, command: Mapping[str, Any]) -> RolloutState:
        """The state after ``command`` (a decoded ControlCommand). Invalid commands are
        ignored with a warning: the topic is the log of what operators asked for."""
        verb = command.get("command")
        if verb == "LOAD" and command.get("version"):
            return replace(self, candidate=command["version"], canary_percent=0)
        if verb == "CANARY":
            percent = command.get("percent")
            if self.candidate is None or percent is None or not 0 <= percent <= 100:
                logger.warning("ignoring CANARY %r: no candidate or bad percent", percent)
                return self
            return replace(self, canary_percent=int(percent))
        if verb == "PROMOTE":
            if self.candidate is None:
                logger.warning("ignoring PROMOTE: no candidate loaded")
                return self
            return RolloutState(current=self.candidate, previous=(*self.previous, self.current))
        if verb == "ROLLBACK":
            if self.candidate is not None:
                return replace(self, candidate=None, canary_percent=0)
            if self.previous:
                return RolloutState(current=self.previous[-1], previous=self.previous[:-1])
            logger.warning("ignoring ROLLBACK: nothing to roll back to")
            return self
        logger.warning("ignoring unknown control command %r", verb)
        return self

    def needed(self) -> set[str | None]:
        """Versions that must be loaded to serve this state."""
        return {self.current} | ({self.candidate} if self.candidate is not None else set())


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


class ModelRouter:
    """Holds the loaded versions and picks one per request."""

    def __init__(self, base: Route, make_route: RouteFactory) -> None:
        self._routes: dict[str | None, Route] = {None: base}
        self._make_route = make_route
        self.state = RolloutState()
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Route:
        return self._routes[self.state.current]

    def routes(self) -> list[Route]:
        return list(self._routes.values())

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
        """Fold one command in: load what the new state needs (before switching to it),
        then retire what it no longer needs (after its in-flight requests finish)."""
        async with self._lock:
            new_state = self.state.apply(command)
            for version in new_state.needed():
                if version not in self._routes:
                    logger.info("loading model version %s", version)
                    self._routes[version] = await self._make_route(version)
            old_state, self.state = self.state, new_state
            logger.info("rollout: %s -> %s", old_state, new_state)
            keep = new_state.needed() | set(new_state.previous[-1:])
            retiring = [v for v in self._routes if v not in keep and v is not None]
        for version in retiring:
            await self._retire(version)
        return new_state

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
