"""The fault-injection tools themselves: a crashable PostgreSQL, a misbehaving proxy, probes."""

from __future__ import annotations

import os
import pwd
import socket
import threading
import time

import asyncpg
import pytest

from tests.faults import (
    CONNECTION_ERRORS,
    TcpProxy,
    ThrowawayPostgres,
    free_port,
    postgres_fixture,
    process_alive,
    rss_bytes,
    wait_for,
)

throwaway = postgres_fixture("throwaway")


async def test_immediate_stop_then_start_keeps_port_and_data(throwaway: ThrowawayPostgres) -> None:
    """A server crashed with -m immediate refuses connections, then comes back on its port with its data."""
    url, port = throwaway.create_database("crash"), throwaway.port
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1), (2), (3)")
    await conn.close()

    throwaway.stop("immediate")
    try:
        with pytest.raises(OSError):
            await asyncpg.connect(url)
    finally:
        throwaway.start()  # the other tests of the module share this server

    conn = await asyncpg.connect(url)
    try:
        assert (port, url) == (throwaway.port, throwaway.url("crash"))
        assert await conn.fetchval("SELECT sum(n) FROM t") == 6
    finally:
        await conn.close()


def test_close_stops_the_server_and_removes_its_files() -> None:
    """A server runs unprivileged when we are root; close() ends its process and deletes its directory."""
    with ThrowawayPostgres() as server:
        base, pid = server.base, server.pid
        assert (os.stat(f"/proc/{pid}").st_uid, server.user != "root") == (pwd.getpwnam(server.user).pw_uid, True)
    assert (base.exists(), process_alive(pid)) == (False, False)


async def test_queries_pass_through_the_proxy(throwaway: ThrowawayPostgres) -> None:
    """With no fault switched on, the proxy is invisible to asyncpg."""
    with TcpProxy.to(throwaway.url()) as proxy:
        conn = await asyncpg.connect(proxy.url_for(throwaway.url()))
        try:
            assert await conn.fetchval("SELECT 42") == 42
        finally:
            await conn.close()
        assert (proxy.accepted, proxy.refused, proxy.cut) == (1, 0, 0)


async def test_cut_all_breaks_open_connections_but_not_new_ones(throwaway: ThrowawayPostgres) -> None:
    """cut_all() resets the open connection (its next query fails); a connection opened afterwards works."""
    with TcpProxy.to(throwaway.url()) as proxy:
        url = proxy.url_for(throwaway.url())
        doomed = await asyncpg.connect(url)
        try:
            assert proxy.cut_all() == 1
            with pytest.raises(CONNECTION_ERRORS):
                await doomed.fetchval("SELECT 1")
        finally:
            doomed.terminate()
        fresh = await asyncpg.connect(url)
        try:
            assert await fresh.fetchval("SELECT 1") == 1
        finally:
            await fresh.close()
        assert (proxy.accepted, proxy.cut) == (2, 1)


async def test_delay_slows_every_round_trip(throwaway: ThrowawayPostgres) -> None:
    """delay=0.3 makes one query's round trip take at least 0.3 s."""
    with TcpProxy.to(throwaway.url()) as proxy:
        conn = await asyncpg.connect(proxy.url_for(throwaway.url()))
        try:
            proxy.delay = 0.3
            began = time.monotonic()
            assert await conn.fetchval("SELECT 1") == 1
            elapsed = time.monotonic() - began
        finally:
            proxy.delay = 0.0
            await conn.close()
    assert elapsed >= 0.3, elapsed


async def test_refuse_makes_connects_fail(throwaway: ThrowawayPostgres) -> None:
    """With refuse on, connecting fails; switched off, connecting works again."""
    with TcpProxy.to(throwaway.url()) as proxy:
        url = proxy.url_for(throwaway.url())
        proxy.refuse = True
        with pytest.raises(CONNECTION_ERRORS):
            await asyncpg.connect(url)
        assert (proxy.accepted, 0) == (proxy.refused, proxy.open_connections)
        proxy.refuse = False
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


async def test_cut_probability_one_resets_every_connection(throwaway: ThrowawayPostgres) -> None:
    """cut_probability=1 resets a connection at its first chunk, so connecting fails."""
    with TcpProxy.to(throwaway.url(), seed=1) as proxy:
        proxy.cut_probability = 1.0
        with pytest.raises(CONNECTION_ERRORS):
            await asyncpg.connect(proxy.url_for(throwaway.url()))
        assert proxy.accepted == proxy.cut


async def test_cut_every_keeps_resetting(throwaway: ThrowawayPostgres) -> None:
    """cut_every(0.1) resets an idle open connection within moments; cut_every(None) stops it."""
    with TcpProxy.to(throwaway.url()) as proxy:
        conn = await asyncpg.connect(proxy.url_for(throwaway.url()))
        try:
            proxy.cut_every(0.1)
            wait_for(lambda: proxy.cut >= 1, timeout=5)
            proxy.cut_every(None)
            with pytest.raises(CONNECTION_ERRORS):
                await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()
        assert proxy.open_connections == 0


def test_url_for_replaces_only_host_and_port() -> None:
    """url_for keeps driver, credentials, database and query, and points at the proxy."""
    with TcpProxy("127.0.0.1", free_port()) as proxy:
        expected = f"postgresql+asyncpg://u:p%40ss@127.0.0.1:{proxy.port}/db?sslmode=disable"
        assert expected == proxy.url_for("postgresql+asyncpg://u:p%40ss@db.example:5432/db?sslmode=disable")


def test_unreachable_target_counts_as_refused() -> None:
    """A connection the target does not answer is reset at once and counted as refused."""
    with TcpProxy("127.0.0.1", free_port()) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        assert (proxy.accepted, proxy.refused) == (1, 1)


def test_close_resets_connections_and_leaves_no_thread(throwaway: ThrowawayPostgres) -> None:
    """Closing a proxy resets the connections through it and ends its thread; closing twice is harmless."""
    before = threading.active_count()
    proxy = TcpProxy.to(throwaway.url())
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.settimeout(5)
        wait_for(lambda: proxy.open_connections == 1)
        assert threading.active_count() == before + 1
        proxy.close()
        proxy.close()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert threading.active_count() == before


def test_rss_and_wait_for() -> None:
    """rss_bytes and process_alive read /proc; wait_for returns the truthy value or fails in time."""
    assert rss_bytes(os.getpid()) > 1024 * 1024
    assert wait_for(lambda: "ok", timeout=0.1) == "ok"
    with pytest.raises(AssertionError):
        wait_for(lambda: False, timeout=0.05, interval=0.01)
    assert (process_alive(os.getpid()), process_alive(2**22 + 1)) == (True, False)
    with pytest.raises(ProcessLookupError):
        rss_bytes(2**22 + 1)
