"""An Aggregator's lifecycle: its state (new → running → stopped), the thread and event loop it owns
for synchronous hosts, the bridge from synchronous callers to that loop, and the fork and exit hooks.

It does no I/O of its own (opening and closing are the engine's), and never holds the host's exit past
``stop_timeout``: the exit hook stops within it, and logs instead of raising.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aggregator import engine as engine_module
from aggregator import exceptions, logs, signals

log = logs.get_logger("aggregator")
T = TypeVar("T")


class Lifecycle:
    """Starts and stops an engine, on a thread of its own (start/stop) or on the host's loop (astart/astop)."""

    def __init__(self, engine: engine_module.Engine, *, handle_sigterm: bool) -> None:
        self._engine = engine
        self._handle_sigterm = handle_sigterm
        self.state = "new"  # new → running → stopped (starting, stopping on the way)
        self.mode: str | None = None  # "thread" (own loop) or "async" (host's loop)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.state == "running"

    # ---- sync: own thread and loop ----------------------------------------------------------------

    def start(self, wait: float | None = None) -> None:
        with self.lock:
            if self.state == "running":
                return
            self.refuse_if_stopped()
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=f"aggregator-{self._engine.replica_id}",
                                      daemon=True)
            thread.start()
            try:
                asyncio.run_coroutine_threadsafe(self._engine.open(wait), loop).result()
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            self.loop, self._thread, self.mode, self.state = loop, thread, "thread", "running"
            _register_exit(self)
            if self._handle_sigterm:
                signals.install_sigterm_handler()

    def stop(self) -> None:
        if self.state == "new" and self._engine.has_pending():
            self.start()  # what was tracked before start() must not be lost either
        with self.lock:
            if self.state != "running":
                self.state = "stopped"
                self._engine.close_intake(finished=True)
                return
            if self.mode == "async":
                raise exceptions.AggregatorError(
                    "this Aggregator runs on an asyncio loop; stop it with `await agg.astop()`")
            loop, thread = self.loop, self._thread
            assert loop is not None and thread is not None
            _unregister_exit(self)
            closing = asyncio.run_coroutine_threadsafe(self._close(), loop)
            try:
                with signals.shielded(self._engine.replica_id):
                    self._wait_closed(closing)
            finally:
                if thread.is_alive() and closing.done():
                    loop.call_soon_threadsafe(loop.stop)
                    thread.join(5.0)
                    if not thread.is_alive():
                        loop.close()

    def _wait_closed(self, closing: concurrent.futures.Future[None]) -> None:
        timeout = self._engine.settings.stop_timeout
        try:
            # close() keeps its own deadline; this bound only guards against a loop that is stuck.
            closing.result(timeout=timeout + 5.0)
        except concurrent.futures.TimeoutError:
            lost = self._engine.unsaved_events()
            log.error("stop_timed_out", timeout_s=timeout, events_lost=lost, replica_id=self._engine.replica_id)
            self.state = "stopped"
            raise exceptions.StoreUnavailable(
                f"stop() did not finish within stop_timeout={timeout:g}s; up to {lost} "
                "tracked events were not saved") from None

    # ---- async: the host's loop -------------------------------------------------------------------

    async def astart(self, wait: float | None = None) -> None:
        with self.lock:
            if self.state == "running":
                return
            self.refuse_if_stopped()
            self.state = "starting"
        try:
            await self._engine.open(wait)
        except BaseException:
            self.state = "new"
            raise
        self.loop, self.mode, self.state = asyncio.get_running_loop(), "async", "running"

    async def astop(self, timeout: float | None = None) -> None:
        if self.state == "new" and self._engine.has_pending():
            await self.astart()
        if self.state != "running":
            self.state = "stopped"
            self._engine.close_intake(finished=True)
            return
        if self.mode == "thread":
            await asyncio.to_thread(self.stop)
            return
        await self._close(timeout)

    async def _close(self, timeout: float | None = None) -> None:
        self._engine.close_intake(finished=False)
        self.state = "stopping"
        try:
            await self._engine.close(timeout)
        finally:
            self.state = "stopped"
            log.info("stopped", replica_id=self._engine.replica_id)

    # ---- the bridge between the caller's thread or loop and ours ---------------------------------

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on this aggregator's loop from a synchronous caller and wait for it."""
        self.require_running()
        loop = self.loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise exceptions.AggregatorError(
                "this call would block the event loop it needs; use the async form (aflush, areports)")
        try:
            return asyncio.run_coroutine_threadsafe(fn(), loop).result()
        except concurrent.futures.CancelledError:  # a stop called it off (see busy.py)
            raise exceptions.StoreUnavailable(
                "called off: the Aggregator is stopping and the database did not answer in time; what this call "
                "was saving stays queued for the final flush, or the spool") from None

    async def on_own_loop(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Await ``fn()`` on this aggregator's loop (its connections belong to it), from any loop."""
        loop = self.loop
        if loop is None or loop is asyncio.get_running_loop():
            return await fn()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(), loop))

    def require_running(self) -> None:
        if self.state != "running":
            raise exceptions.NotRunning(
                f"Aggregator is {self.state}; call start() (or use `with`/`async with`) first")

    def refuse_if_stopped(self) -> None:
        if self.state not in ("new",):
            raise exceptions.NotRunning(
                f"Aggregator is {self.state} and cannot be restarted; create a new Aggregator")

    # ---- exit and fork ----------------------------------------------------------------------------

    def at_exit(self) -> None:
        """At interpreter exit: stop, bounded by stop_timeout; never raises or prints a traceback."""
        if self.state != "running" or self.mode != "thread":
            return
        try:
            self.stop()
        except exceptions.AggregatorError as exc:
            log.error("stop_at_exit_failed", error=str(exc), replica_id=self._engine.replica_id)

    def reset_in_child(self) -> bool:
        """After fork: forget the parent's loop and thread (they are the parent's); whether it was running
        on a thread of its own, so the child restarts it when first used."""
        _running.discard(self)  # without the lock: a thread of the parent may have held it at fork
        was_running_thread = self.state == "running" and self.mode == "thread"
        self.lock = threading.Lock()
        self.loop = self._thread = None
        self.mode = None
        self.state = "new"
        return was_running_thread


def reset_at_fork(owner: object, reset: Callable[[Any], None]) -> None:
    """Call ``reset(owner)`` in a forked child, for as long as ``owner`` lives."""
    os.register_at_fork(after_in_child=functools.partial(_after_fork_in_child, weakref.ref(owner), reset))


def _after_fork_in_child(ref: weakref.ReferenceType[Any], reset: Callable[[Any], None]) -> None:
    owner = ref()
    if owner is not None:
        reset(owner)


# Lifecycles to stop at interpreter exit. Stopped from threading's exit hook, which runs before
# concurrent.futures shuts its workers down and before atexit: the final flush may still use threads.
_running: weakref.WeakSet[Lifecycle] = weakref.WeakSet()
_exit_hook_installed = False
_exit_lock = threading.Lock()


def _register_exit(life: Lifecycle) -> None:
    global _exit_hook_installed
    with _exit_lock:
        _running.add(life)
        if not _exit_hook_installed:
            try:
                threading._register_atexit(_stop_all_at_exit)  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):  # another Python, or already shutting down
                atexit.register(_stop_all_at_exit)
            _exit_hook_installed = True


def _unregister_exit(life: Lifecycle) -> None:
    with _exit_lock:
        _running.discard(life)


def _stop_all_at_exit() -> None:
    with _exit_lock:
        running = list(_running)
        _running.clear()
    for life in running:
        life.at_exit()
