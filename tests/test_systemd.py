"""sd_notify against real AF_UNIX datagram sockets, and the shipped systemd unit."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from aggregator import systemd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "aggregator.service"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run under systemd (a CI runner's unit) must not see, or ping, the real manager."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd, named by NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def drain(sock: socket.socket) -> list[bytes]:
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(4096))
        except BlockingIOError:
            return datagrams


def test_notify_sends_states_as_one_newline_joined_datagram(receiver: socket.socket) -> None:
    """All states of one call arrive together, newline-joined, as systemd expects."""
    sent = systemd.notify("READY=1", "STATUS=serving on 127.0.0.1:8714")
    assert True is sent
    expected = [b"READY=1\nSTATUS=serving on 127.0.0.1:8714"]
    assert expected == drain(receiver)


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET starting with '@' names a socket in the abstract namespace."""
    name = f"aggregator-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert True is systemd.notify("STOPPING=1")
        expected = b"STOPPING=1"
        assert expected == sock.recv(4096)


def test_notify_without_notify_socket_does_nothing() -> None:
    """Outside systemd notify() is a no-op that says so."""
    assert False is systemd.notify("READY=1")


def test_notify_to_a_missing_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send failure is reported by the return value, never raised: it must not crash the daemon."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    assert False is systemd.notify("READY=1")
    assert False is systemd.notify("WATCHDOG=1")


def test_notify_failures_warn_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that keeps failing is reported as one warning, not one per watchdog ping."""
    monkeypatch.setattr(systemd, "_warned", False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    with capture_logs() as events:
        for _ in range(3):
            systemd.notify("WATCHDOG=1")
    expected = ["warning", "debug", "debug"]
    assert expected == [e["log_level"] for e in events if e["event"] == "notify_failed"]


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
        monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None) -> None:
    """Half of WATCHDOG_USEC in seconds, unless WATCHDOG_PID names another process or the value is unusable."""
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self" else os.getpid() + 1))
    assert expected == systemd.watchdog_interval()


async def _run_loop_for(seconds: float, healthy: bool) -> None:
    task = asyncio.create_task(systemd.watchdog_loop(lambda: healthy))
    await asyncio.sleep(seconds)
    assert not task.done(), "the loop should run until cancelled"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_loop_pings_while_healthy(receiver: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    """With WATCHDOG_USEC=200000 the loop pings every 0.1 s while the service is healthy."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    await _run_loop_for(0.5, healthy=True)
    pings = drain(receiver)
    assert len(pings) >= 2, pings
    assert {b"WATCHDOG=1"} == set(pings)


async def test_watchdog_loop_skips_pings_while_unhealthy(receiver: socket.socket,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An unhealthy service is not pinged for, so systemd's watchdog restarts it."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    await _run_loop_for(0.5, healthy=False)
    expected: list[bytes] = []
    assert expected == drain(receiver)


async def test_watchdog_loop_returns_at_once_without_a_watchdog(receiver: socket.socket) -> None:
    """No WATCHDOG_USEC: the loop ends immediately and sends nothing."""
    await asyncio.wait_for(systemd.watchdog_loop(lambda: True), timeout=1)
    expected: list[bytes] = []
    assert expected == drain(receiver)


def test_unit_has_the_required_directives() -> None:
    """The unit is a notify service with a watchdog, state, secrets and the sandbox we rely on."""
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    required = {
        "Type=notify", "NotifyAccess=main", "WatchdogSec=30s", "Restart=on-failure", "TimeoutStopSec=45s",
        "ExecStartPre=/opt/aggregator/bin/aggregator db upgrade", "ExecStart=/opt/aggregator/bin/aggregator run",
        "StateDirectory=aggregator", "ConfigurationDirectory=aggregator",
        "EnvironmentFile=-/etc/aggregator/aggregator.env",
        "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "DynamicUser=yes",
        "CapabilityBoundingSet=", "AmbientCapabilities=",
    }
    assert set() == required - lines
    assert not any(line.startswith("MemoryDenyWriteExecute=") for line in lines)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not on PATH (no systemd here)")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit.

    The copy runs /bin/true instead of /opt/aggregator/bin/aggregator, which verify requires to exist
    and which is not installed here; --man=no because Documentation= man pages may not be installed.
    """
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/aggregator/bin/aggregator", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60)
    expected = (0, "")
    assert expected == (result.returncode, result.stderr.strip())
