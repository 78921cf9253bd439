"""A bounded count of accepted-but-unanswered requests that can be closed.

Like :class:`asyncio.Semaphore`, but :meth:`Slots.close` wakes every waiter with ``False``,
so an agent blocked on a full pipeline at shutdown returns at once instead of waiting for a
slot that will never come (its record stays unread as far as the commits are concerned).
"""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self.closed = False

    async def acquire(self) -> bool:
        """Take a slot (waiting while none is free). False once closed: nothing taken."""
        if self.closed:
            return False
        if self.used < self.capacity and not self._waiters:
            self.used += 1
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # granted and cancelled in the same tick: give it back
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        self.used -= 1
        while self._waiters and self.used < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(True)

    def close(self) -> None:
        """Refuse every waiter and every later acquire."""
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)
