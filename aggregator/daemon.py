"""`aggregator run`: the long-running process under systemd.

It owns an Aggregator (collector on) and the HTTP API on one event loop. READY is sent to systemd
once the socket serves; SIGTERM/SIGINT stop intake first, drain requests in flight, then make every
accepted event durable and exit, all within ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Iterator

import uvicorn

from aggregator import api, exceptions, logs, metrics, options, store, systemd
from aggregator.runtime import Aggregator

STOP_BACKSTOP_S = 5.0  # past the stop's own deadline, the daemon stops waiting for it

log = logs.get_logger("aggregator.daemon")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon decides when and how to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main(settings: options.DaemonSettings) -> int:
    logs.configure(level=settings.log_level, json={"auto": None, "json": True, "console": False}[settings.log_format])
    return asyncio.run(serve(settings))


async def serve(settings: options.DaemonSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # the stop is under way and bounded; only SIGKILL cuts it short
            log.warning("signal_ignored_during_stop", signal=sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("configuration", **settings.masked())
    # Its HTTP API reads concurrently: it keeps its pool's connections open rather than one.
    agg = Aggregator.from_settings(settings.aggregator, handle_sigterm=False, idle_connections=store.POOL_SIZE)
    try:
        await agg.astart()
    except exceptions.AggregatorError as exc:
        log.error("start_failed", error=str(exc))
        return 1
    counters = metrics.Counters()
    host, port = settings.listen
    server = _Server(uvicorn.Config(
        api.build_app(agg, settings, counters), host=host, port=port, log_config=None, access_log=False,
        lifespan="off", server_header=False, timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout / 3)),
    ))
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if serving.done():  # could not bind, typically
        log.error("listen_failed", listen=f"{host}:{port}")
        await agg.astop()
        return 1
    address = _bound_address(server)
    log.info("serving", listen=address, replica_id=agg.replica_id)
    systemd.notify("READY=1", f"STATUS=serving on {address}")
    watchdog = asyncio.create_task(systemd.watchdog_loop(lambda: not serving.done()))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
    return await _shutdown(settings, agg, server, serving, watchdog)


async def _shutdown(settings: options.DaemonSettings, agg: Aggregator, server: uvicorn.Server,
                    serving: asyncio.Task[None], watchdog: asyncio.Task[None]) -> int:
    began = time.monotonic()
    systemd.notify("STOPPING=1", "STATUS=stopping: draining requests, final flush")
    log.info("stopping", unflushed_events=agg.status().get("unflushed_events"))
    watchdog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watchdog
    server.should_exit = True  # stop accepting; requests in flight finish
    code = 0
    try:
        with contextlib.suppress(TimeoutError):  # uvicorn bounds its drain by a third of the time
            async with asyncio.timeout(settings.shutdown_timeout / 2):
                await serving
        # The stop keeps its own deadline, the time left (the final flush, else the spool); this
        # bound only guards against a loop that is stuck.
        left = max(settings.shutdown_timeout - (time.monotonic() - began), settings.shutdown_timeout / 2)
        async with asyncio.timeout(left + STOP_BACKSTOP_S):
            await agg.astop(timeout=left)  # a collection in progress, then the final flush
    except TimeoutError:
        log.error("stop_timed_out", timeout_s=settings.shutdown_timeout,
                  unflushed_events=agg.status().get("unflushed_events"))
        code = 1
    except exceptions.AggregatorError as exc:
        log.error("stop_failed", error=str(exc))
        code = 1
    log.info("stopped", exit_code=code, duration_s=round(time.monotonic() - began, 3))
    return code


def _bound_address(server: uvicorn.Server) -> str:
    for srv in server.servers:
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
    return "unknown"
