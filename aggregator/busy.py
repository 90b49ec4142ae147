"""One job at a time, and a stop that can call the running one off.

The flusher and the collector each hold a ``Busy`` while they work. A stop waits for the job in
progress until its own deadline, then cancels it: every await inside a flush or a collection is a
point where it can be called off, and whatever it had not confirmed stays queued (a flush) or open
(a window) for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

CALL_OFF_WAIT_S = 1.0  # how long a job called off gets to let go (its driver call returns to the loop)
CANCEL_EVERY_S = 0.05  # a job called off is cancelled again this often while it unwinds


class Busy:
    """An asyncio lock that knows which task holds it."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task[object] | None = None

    async def __aenter__(self) -> Busy:
        await self._lock.acquire()
        self._holder = asyncio.current_task()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._holder = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    async def settle(self, until: float) -> bool:
        """Wait for the job in progress until ``until`` (monotonic); then call it off.

        Calling off cancels the job, and cancels it again every CANCEL_EVERY_S while it unwinds: a
        driver's cleanup may wait too (SQLAlchemy closes a cancelled asyncpg connection gracefully,
        for up to 2 s, unless cancelled once more). True once the lock is free; False if the job
        still holds it after CALL_OFF_WAIT_S (it swallows its cancellation).
        """
        if await self._free_within(until - time.monotonic()):
            return True
        called_off = time.monotonic() + CALL_OFF_WAIT_S
        while True:
            holder = self._holder
            if holder is not None and holder is not asyncio.current_task():
                holder.cancel()
            left = called_off - time.monotonic()
            if await self._free_within(min(CANCEL_EVERY_S, left)):
                return True
            if left <= CANCEL_EVERY_S:
                return False

    async def _free_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                async with self._lock:
                    return True
        return False
