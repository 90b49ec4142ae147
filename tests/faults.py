"""Fault injection for tests that prove the engine survives database trouble.

A PostgreSQL server a test may crash and restart (``ThrowawayPostgres``), a TCP proxy that slows, cuts
and refuses database connections on command (``TcpProxy``), and small probes (``rss_bytes``, ``wait_for``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import pwd
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import asyncpg
import pytest
import sqlalchemy as sa

from aggregator import migrate

T = TypeVar("T")

# What asyncpg raises when the connection under it is reset or refused: the socket error itself, a
# connection that died mid-operation (ConnectionDoesNotExistError, a PostgresConnectionError), or
# "connection is closed" (InterfaceError) on the calls after that.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncpg.PostgresConnectionError,
                                                      asyncpg.InterfaceError)


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh loop in a thread of its own.

    A thread, so the same helper works from a sync fixture and from inside an async test's running loop.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def migrated(url: str) -> str:
    """Bring the database at ``url`` to the head migration, ready for an Aggregator; returns ``url``."""
    blocking(migrate.upgrade_url(url))
    return url


def _pg_bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install "
                           "postgresql)")
    return str(Path(found[-1]).parent)


def _unprivileged_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")


class ThrowawayPostgres:
    """A PostgreSQL server of a test's own, to crash and restart at will.

    It keeps its port and its data directory for its whole life, so a ``stop()`` then ``start()`` is
    the outage a replica must ride out: the same URL refuses connections, then answers again with the
    data it had. initdb and postgres refuse to run as root, so as root every server tool runs as the
    ``postgres`` account (or ``nobody``) through ``setpriv``; ``user`` names the account. Authentication
    is trust, superuser ``postgres``. A test process killed outright leaves its server running.
    """

    # fsync=off costs nothing we test: -m immediate crashes the server, not the machine, and the
    # kernel still holds every write, so recovery at the next start finds all committed data.
    OPTIONS = ("-F", "-c", "fsync=off", "-c", "max_connections=200", "-c", "logging_collector=off")

    def __init__(self, *, bindir: str | None = None) -> None:
        self.bindir = bindir or _pg_bindir()
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="aggregator-faults-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.running = False
        self._account = _unprivileged_account() if os.geteuid() == 0 else None
        self.user = self._account.pw_name if self._account else pwd.getpwuid(os.geteuid()).pw_name
        if self._account is not None:
            os.chown(self.base, self._account.pw_uid, self._account.pw_gid)

    def _tool(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [f"{self.bindir}/{name}", *args]
        if self._account is not None:
            command = ["setpriv", f"--reuid={self._account.pw_uid}", f"--regid={self._account.pw_gid}",
                       "--clear-groups", *command]
        # Our PG* variables (PGDATA, PGPORT...) would silently redirect the tools to another server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        done = subprocess.run(command, cwd=self.base, env=env, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}\n"
                               f"--- {self.log} ---\n{self._log_tail()}")
        return done

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> ThrowawayPostgres:
        """Start the server (initdb on first start) and wait until it accepts connections."""
        if self.running:
            return self
        if not self.data.exists():
            self._tool("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-sync", "--no-instructions")
        options = ["-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.base), *self.OPTIONS]
        self._tool("pg_ctl", "start", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.log),
                   "-o", " ".join(options))
        self.running = True
        return self

    def stop(self, mode: Literal["immediate", "fast"] = "immediate") -> None:
        """Stop the server: ``immediate`` is a crash (no checkpoint, recovery at next start), ``fast`` clean."""
        if not self.running:
            return
        self._tool("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")
        self.running = False

    def restart(self, mode: Literal["immediate", "fast"] = "fast") -> None:
        """Stop then start again, on the same port with the same data."""
        self.stop(mode)
        self.start()

    @property
    def pid(self) -> int:
        """The postmaster's process id (for ``rss_bytes``, or SIGSTOP to freeze the server)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL of ``database`` on this server, as its superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; returns its URL."""
        quoted = '"' + name.replace('"', '""') + '"'

        async def create() -> None:
            conn = await asyncpg.connect(self.url())
            try:
                await conn.execute(f"CREATE DATABASE {quoted}")
            finally:
                await conn.close()

        blocking(create())
        return self.url(name)

    def close(self) -> None:
        """Stop the server and remove its data directory; safe after a failed start or a killed server."""
        try:
            if self.running or (self.data / "postmaster.pid").exists():
                self._tool("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60",
                           check=False)
        finally:
            self.running = False
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def postgres_fixture(name: str = "throwaway_postgres",
                     scope: Literal["function", "module", "session"] = "module") -> Any:
    """A pytest fixture named ``name`` that yields a started ``ThrowawayPostgres``, closed afterwards.

    Bind it to a module-level name in the test module (or a conftest): ``throwaway = postgres_fixture()``.
    A server costs a second or two to create, hence module scope by default; tests that crash it should
    leave it running again.
    """

    def fixture() -> Iterator[ThrowawayPostgres]:
        with ThrowawayPostgres() as server:
            yield server

    return pytest.fixture(fixture, scope=scope, name=name)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket with an RST rather than a FIN: what a peer sees when the network dies."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone: nothing to reset
    writer.transport.abort()


class _Link:
    """One proxied connection: both sockets and the two pumps between them."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.pumps: list[asyncio.Task[None]] = []
        self.cut = False

    def reset(self) -> None:
        self.cut = True
        _reset(self.client)
        _reset(self.server)
        for pump in self.pumps:
            pump.cancel()


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of a database, with faults a test switches on and off.

    It listens from construction until ``close()``, on an asyncio loop in a thread of its own, so it
    works whether the code under test is sync or async. The controls are plain attributes, read for
    every chunk or connection, so a test may change them at any time:

    - ``delay``: seconds slept before forwarding each client-to-server chunk (every round trip slows);
    - ``cut_probability``: chance, per forwarded chunk, that the connection is reset instead;
    - ``refuse``: new connections are reset at once.

    ``cut_all()`` resets every open connection now, ``cut_every(seconds)`` keeps doing so. Resets are
    real RSTs on both sides (SO_LINGER 0). Counters: ``accepted`` (every connection the listener took),
    ``refused`` (reset at once: ``refuse`` on, or the target unreachable), ``cut`` (reset mid-stream).
    """

    def __init__(self, host: str, port: int, *, seed: int | None = None) -> None:
        self.target = (host, port)
        self.delay = 0.0
        self.cut_probability = 0.0
        self.refuse = False
        self.accepted = self.refused = self.cut = 0
        self._random = random.Random(seed)
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"TcpProxy->{host}:{port}",
                                        daemon=True)
        self._thread.start()
        try:
            self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    @classmethod
    def to(cls, url: str, *, seed: int | None = None) -> TcpProxy:
        """A proxy in front of the server of a database URL."""
        parsed = sa.make_url(url)
        return cls(parsed.host or "127.0.0.1", parsed.port or 5432, seed=seed)

    def url_for(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by the proxy's."""
        parsed = sa.make_url(database_url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def cut_all(self) -> int:
        """Reset every open connection; returns how many were cut."""
        return self._call(self._cut_all())

    def cut_every(self, seconds: float | None) -> None:
        """Reset every open connection each ``seconds`` from now on; ``None`` stops it."""

        async def tick(period: float) -> None:
            while True:
                await asyncio.sleep(period)
                await self._cut_all()

        async def switch() -> None:
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None
            if seconds is not None:
                self._ticker = asyncio.create_task(tick(seconds))

        self._call(switch())

    def close(self) -> None:
        """Stop listening, reset every connection and end the proxy's thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _cut_all(self) -> int:
        links = list(self._links)
        for link in links:
            self._cut(link)
        await asyncio.sleep(0)  # let the aborted transports close their sockets before we report
        return len(links)

    def _cut(self, link: _Link) -> None:
        if not link.cut:
            self.cut += 1
            link.reset()

    async def _shutdown(self) -> None:
        self._server.close()
        if self._ticker is not None:
            self._ticker.cancel()
        for link in list(self._links):
            link.reset()
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, *([self._ticker] if self._ticker else []), return_exceptions=True)
        await self._server.wait_closed()
        for _ in range(3):  # aborted transports close their sockets on the next loop iterations
            await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        server: asyncio.StreamWriter | None = None
        try:
            if self.refuse:
                self.refused += 1
                _reset(client)
                return
            try:
                upstream, server = await asyncio.open_connection(*self.target)
            except OSError:
                self.refused += 1
                _reset(client)
                return
            await self._forward(reader, client, upstream, server)
        except asyncio.CancelledError:
            # Only close() cancels a handler. Ending quietly matters: on Python 3.11 the stream server's
            # done-callback calls task.exception(), which raises (and is logged) for a cancelled task.
            return
        finally:
            client.close()
            if server is not None:
                server.close()
            self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                       upstream: asyncio.StreamReader, server: asyncio.StreamWriter) -> None:
        link = _Link(client, server)
        self._links.add(link)
        link.pumps = [asyncio.create_task(self._pump(reader, server, link, outbound=True)),
                      asyncio.create_task(self._pump(upstream, client, link, outbound=False))]
        try:
            # Either side hanging up ends the connection (PostgreSQL's protocol has no half-close).
            await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link, *,
                    outbound: bool) -> None:
        try:
            while data := await src.read(65536):
                if outbound and self.delay > 0:
                    await asyncio.sleep(self.delay)
                if self.cut_probability > 0 and self._random.random() < self.cut_probability:
                    self._cut(link)
                    return
                dst.write(data)
                await dst.drain()
        except OSError:
            pass  # a side reset under us: the connection ends, as it would without the proxy


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes, from /proc/PID/status (VmRSS)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", f"unexpected VmRSS unit {unit!r} for process {pid}"
            return int(value) * 1024
    raise ProcessLookupError(f"process {pid} has no VmRSS (a zombie or kernel thread)")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie awaiting its reaper counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return not any(line.startswith("State:") and line.split()[1] in ("Z", "X") for line in status.splitlines())


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail after ``timeout``.

    Blocking: from an async test, the code awaited must run on another thread (the Aggregator's own
    loop, a TcpProxy, a subprocess), not on the test's loop.
    """
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)
    return result
