"""Signals: SIGTERM becomes a normal exit, so the exit hook stops every Aggregator and nothing tracked is lost.

While a stop is flushing, further SIGTERM and SIGINT (an impatient orchestrator, Ctrl-C twice) are
logged and ignored: the stop is bounded by ``stop_timeout``, and SIGKILL remains the hard stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from aggregator import logs

log = logs.get_logger("aggregator.signals")

_installed = False
_SHIELDED = (signal.SIGTERM, signal.SIGINT)


def install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so the exit hook runs stop() and nothing tracked is lost.

    Only when SIGTERM still has its default action (which kills without cleanup) and we are on the
    main thread; a host that handles SIGTERM itself keeps its handler.
    """
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True


def _on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def shielded(replica_id: str) -> Iterator[None]:
    """During a stop on the main thread: SIGTERM and SIGINT are logged and ignored, then restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in _SHIELDED:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, _ignore_during_stop(replica_id))
    except (ValueError, OSError):  # not allowed here (an embedded interpreter): stop unshielded
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _ignore_during_stop(replica_id: str) -> Any:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.warning("signal_ignored_during_stop", signal=signal.Signals(signum).name, replica_id=replica_id,
                    hint="the final flush goes on, bounded by stop_timeout; SIGKILL stops at once")

    return handler
