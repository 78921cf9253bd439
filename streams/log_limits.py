"""Rate limits for log lines that repeat while something outside is broken.

A worker whose broker is gone would otherwise write the same ERROR line from the Kafka
client dozens of times a second (megabytes in minutes). :class:`RepeatFilter` lets one line
of each kind through per interval and reports how many it held back; the CLI installs it on
the log handler. :class:`RateLimitedLogger` does the same for our own warnings, keyed by the
caller. Both take an injected clock, so they are tested without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class _Window:
    """Per-key state: when the key last passed and how many were held back since."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def admit(self, key: str) -> tuple[bool, int]:
        """(pass now?, lines held back before this one)."""
        now = self.clock()
        last = self.last.get(key)
        if last is not None and now - last < self.interval_s:
            self.held[key] = self.held.get(key, 0) + 1
            return False, 0
        self.last[key] = now
        if len(self.last) > 10_000:  # bounded: forget the oldest keys
            for old in sorted(self.last, key=self.last.__getitem__)[:5_000]:
                self.last.pop(old, None)
                self.held.pop(old, None)
        return True, self.held.pop(key, 0)


class RepeatFilter(logging.Filter):
    """Passes one record per (logger, message template) per ``interval_s`` at WARNING and
    above; lower levels pass untouched. A passed record that follows held-back ones says
    how many were suppressed."""

    def __init__(
        self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._window = _Window(interval_s, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        passed, held = self._window.admit(f"{record.name}:{record.msg}")
        if passed and held:
            record.msg = f"{record.msg} [{held} similar lines suppressed]"
        return passed


class RateLimitedLogger:
    """``warning(key, msg, *args)`` logs at most once per ``interval_s`` for each key."""

    def __init__(
        self,
        log: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._window = _Window(interval_s, clock)

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        passed, held = self._window.admit(key)
        if passed:
            suffix = f" [{held} similar suppressed]" if held else ""
            self._log.warning(msg + suffix, *args)
        return passed


def install_repeat_filter(interval_s: float = 10.0) -> None:
    """Put a :class:`RepeatFilter` on every handler of the root logger that has none (call
    again after a framework replaced the handlers)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter(interval_s=interval_s))
