"""Signals: SIGTERM becomes a normal exit, so atexit stops every Aggregator and nothing tracked is lost."""

from __future__ import annotations

import signal
import threading

_installed = False


def install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so atexit runs stop() and nothing tracked is lost.

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
