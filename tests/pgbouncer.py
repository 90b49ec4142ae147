"""A throwaway PgBouncer in transaction pooling mode in front of the tests' PostgreSQL.

PgBouncer refuses to run as root, so as root it runs as the ``postgres`` account (or ``nobody``)
through ``setpriv``, which execs, so our signals reach PgBouncer itself. It listens on 127.0.0.1 only,
trusts the user names in its auth file, and routes every database name to the same server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from tests import helpers

PACKAGE = "pgbouncer"  # the Debian package that ships the binary


def binary() -> str:
    """The pgbouncer executable; a skip naming the Debian package, or a failure under CI, when missing."""
    return helpers.debian_executables({"pgbouncer": PACKAGE}, extra_path="/usr/sbin:/usr/local/sbin")["pgbouncer"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unprivileged_account() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("no unprivileged account (postgres or nobody) to run pgbouncer as")


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


class PgBouncer:
    """One PgBouncer process pooling ``server_url``'s server in ``pool_mode``, until ``stop()``."""

    def __init__(self, server_url: str, *, pool_mode: str = "transaction", pool_size: int = 20) -> None:
        self.executable = binary()
        self.server = sa.make_url(server_url)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.port = 0
        self.base = Path(tempfile.mkdtemp(prefix="aggregator-pgbouncer-"))
        self.log = self.base / "pgbouncer.log"
        self._account = _unprivileged_account() if os.geteuid() == 0 else None
        self._process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        user = self.server.username or pwd.getpwuid(os.geteuid()).pw_name
        # Trust: clients are not authenticated; the file's password (if any) is what PgBouncer logs in with.
        (self.base / "userlist.txt").write_text(f"{_quoted(user)} {_quoted(self.server.password or '')}\n")
        ini = self.base / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server.host or '127.0.0.1'} port={self.server.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.base / 'userlist.txt'}\n"
            f"pool_mode = {self.pool_mode}\ndefault_pool_size = {self.pool_size}\nmax_client_conn = 1000\n"
            f"logfile = {self.log}\npidfile = {self.base / 'pgbouncer.pid'}\n"
            f"admin_users = {user}\n"
            # A failed server login (a test's database not created yet, or dropped) is retried soon.
            "server_login_retry = 1\n"
        )
        if self._account is not None:
            for path in (self.base, *self.base.iterdir()):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)
        return ini

    def start(self) -> PgBouncer:
        """Start PgBouncer on a free port and wait until it accepts connections."""
        for _ in range(5):  # another process may take the free port before PgBouncer binds it
            self.port = free_port()
            command = [self.executable, str(self._write_config())]
            if self._account is not None:
                command = ["setpriv", f"--reuid={self._account.pw_uid}", f"--regid={self._account.pw_gid}",
                           "--clear-groups", *command]
            self._process = subprocess.Popen(command, cwd=self.base, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_listening(timeout=20.0):
                return self
            self.stop()
        raise RuntimeError(f"pgbouncer did not start; its log:\n{self._log_tail()}")

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def url(self, server_url: str) -> str:
        """``server_url`` (a database on the pooled server) reached through PgBouncer instead."""
        return sa.make_url(server_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # PgBouncer: immediate shutdown (SIGINT would wait for clients)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
