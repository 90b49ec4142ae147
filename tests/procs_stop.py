"""Code that tests/test_stop.py and tests/test_prefork.py run in separate processes.

Each child sends its stdout and stderr to a log file of the test's, so a test can look for event names
(``signal_ignored_during_stop``, ``final_flush_failed``) and tracebacks whatever the rendering.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from typing import Any

from aggregator import Aggregator, AggregatorError
from tests import procs
from tests.helpers import GRACE, WINDOW


def log_to(path: str) -> None:
    """Send this process's fds 1 and 2 to ``path``, and log INFO and above there as a host would.

    Embedded, aggregator prints nothing unless its host configures logging: this child is that host.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")


def requests_of(i: int) -> tuple[uuid.UUID, uuid.UUID, int, int]:
    """The i-th call of a child that tracks a known sequence: workspace, user, allowed, denied."""
    return uuid.UUID(int=1 + i % 7), uuid.UUID(int=1000 + i % 101), 1 + i % 2, i % 3 % 2


def requests_in(n: int) -> int:
    """Requests (allowed + denied), as reports count them, in the first ``n`` calls of ``requests_of``."""
    return sum(allowed + denied for _, _, allowed, denied in map(requests_of, range(n)))


def track_until_signalled_logged(url: str, counter: Any, log_path: str) -> None:
    """tests.procs.track_until_signalled with flush_interval 1h (nothing flushed before the stop), logged."""
    log_to(log_path)
    procs.track_until_signalled(url, counter, "1h", True)


def track_then_stop(url: str, spool_dir: str, calls: int, stop_timeout: str, ready: Any, go: Any, out: Any,
                    log_path: str) -> None:
    """Track ``calls`` known calls, say so, wait for ``go`` (the test cuts the database), then stop().

    Puts (outcome, message, seconds stop() took) on ``out``: outcome is "stopped" or the exception's class.
    """
    log_to(log_path)
    agg = Aggregator(database_url=url, window=f"{WINDOW}s", grace=f"{GRACE}s", flush_interval="1h", collect=False,
                     stop_timeout=stop_timeout, spool_dir=spool_dir, handle_sigterm=False)
    agg.start(wait=30)
    for i in range(calls):
        ws, user, allowed, denied = requests_of(i)
        agg.track(ws, user, allowed=allowed, denied=denied)
    ready.set()
    if not go.wait(60):
        out.put(("no go", "the test never said go", 0.0))
        return
    began = time.monotonic()
    try:
        agg.stop()
        outcome = ("stopped", "")
    except AggregatorError as exc:
        outcome = (type(exc).__name__, str(exc))
    out.put((*outcome, time.monotonic() - began))


def fork_and_exit(url: str, calls: int, children: int) -> None:
    """uWSGI-style: start, track, fork ``children`` that track and end with sys.exit(0), wait for them, end.

    Every process tracks the same ``calls`` known calls and ends through normal interpreter exit (no
    stop()); the exit hook must make it all durable. Prints each child's exit code.
    """
    agg = Aggregator(database_url=url, window=f"{WINDOW}s", grace=f"{GRACE}s", flush_interval="1h", collect=False,
                     stop_timeout="5s")
    agg.start(wait=30)
    for i in range(calls // 2):
        ws, user, allowed, denied = requests_of(i)
        agg.track(ws, user, allowed=allowed, denied=denied)
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            for i in range(calls):
                ws, user, allowed, denied = requests_of(i)
                agg.track(ws, user, allowed=allowed, denied=denied)
            sys.exit(0)
        pids.append(pid)
    for i in range(calls // 2, calls):  # the parent goes on tracking after the forks
        ws, user, allowed, denied = requests_of(i)
        agg.track(ws, user, allowed=allowed, denied=denied)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(f"children exited {codes}", flush=True)
