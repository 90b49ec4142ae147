"""Tell systemd how the daemon is doing: READY/STATUS/STOPPING and watchdog pings (sd_notify).

A dependency-free implementation of the sd_notify(3) datagram protocol for a ``Type=notify`` unit.
Outside systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from aggregator import logs

log = logs.get_logger("aggregator.systemd")

# A failing notification socket fails the same way on every ping; one warning says it, more would flood.
_warned = False

# systemd reads the socket promptly; the bound only keeps a wedged receiver from stalling the event loop.
_SEND_TIMEOUT_S = 1.0


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=…"``) to systemd as one datagram.

    Returns True when the datagram was sent, False when not under systemd or the send failed. Never
    raises: a notification must not be what crashes the daemon.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not states:
        return False
    # A leading "@" names a socket in the abstract namespace, whose real name starts with a NUL byte.
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        if not target.startswith(("/", "@")):
            raise OSError(f"unsupported NOTIFY_SOCKET address {target!r} (only AF_UNIX is supported)")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto("\n".join(states).encode(), address)
    except (OSError, ValueError) as exc:  # ValueError: an address or state the socket API cannot encode
        _warn_once(target, exc)
        return False
    return True


def _warn_once(target: str, exc: Exception) -> None:
    global _warned
    if _warned:
        log.debug("notify_failed", notify_socket=target, error=str(exc))
        return
    _warned = True
    log.warning("notify_failed", notify_socket=target, error=str(exc),
                note="further notification failures are logged at debug level")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of ``WATCHDOG_USEC``, or None when no watchdog is ours.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for; a child that inherited
    the environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        micros = int(usec)
    except ValueError:
        return None
    if micros <= 0:
        return None
    # Half the timeout, as sd_watchdog_enabled(3) advises, so one late ping does not trip a restart.
    return micros / 2 / 1_000_000


async def watchdog_loop(is_healthy: Callable[[], bool]) -> None:
    """Ping systemd's watchdog every ``watchdog_interval()`` seconds while ``is_healthy()`` holds.

    An unhealthy check skips the ping on purpose, so systemd restarts a service that is stuck rather
    than dead. Returns at once when no watchdog is configured; runs until cancelled otherwise.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    log.debug("watchdog_started", interval_s=interval)
    while True:
        try:
            healthy = is_healthy()
        except Exception as exc:  # a check that raises counts as unhealthy; a transient error must not end the loop
            log.warning("watchdog_check_failed", error=repr(exc))
            healthy = False
        if healthy:
            notify("WATCHDOG=1")
        else:
            log.warning("watchdog_ping_skipped", reason="unhealthy")
        await asyncio.sleep(interval)
