"""Logging: a library's manners when embedded, structlog rendering for the CLI and the daemon.

Embedded, aggregator logs through the standard ``logging`` module under the ``aggregator.*`` logger
names and prints nothing unless the host configures logging (a ``NullHandler`` keeps Python's
last-resort handler quiet). ``configure()`` (the CLI, ``aggregator run``) renders every event with
structlog instead: JSON lines off a terminal, readable on one. This module must never print by itself.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

# Libraries whose per-job chatter ("Running job ...", "Context impl SQLiteImpl.") is debug detail to us.
_CHATTY = ("apscheduler", "alembic", "aiosqlite", "asyncio", "httpx", "httpcore")

logging.getLogger("aggregator").addHandler(logging.NullHandler())
# Our scheduler's own warnings ("skipped: maximum number of running instances reached" while a flush outlasts
# its interval, on a loaded host) would reach stderr through the last-resort handler of a host that set up
# no logging; a host that does configure logging still receives them.
logging.getLogger("apscheduler").addHandler(logging.NullHandler())
_rendering = False  # set by configure(): events go to structlog's configuration


class _EventLogger:
    """``log.info("event", key=value)`` for aggregator's modules, routed at each call.

    To structlog when this process rendered logs itself (``configure()``) or a test captures them
    (``structlog.testing.capture_logs``); otherwise to the standard ``logging`` logger of the same
    name, as ``event key=value ...`` with the fields also in the record's ``extra``.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._stdlib = logging.getLogger(name)

    def _target(self) -> Any:
        if _rendering or _capturing():
            return structlog.get_logger(self._name)
        return None

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        target = self._target()
        if target is not None:
            getattr(target, logging.getLevelName(level).lower())(event, **fields)
            return
        if not self._stdlib.isEnabledFor(level):
            return
        text = " ".join([event, *(f"{key}={value!r}" for key, value in fields.items())])
        extra = {f"aggregator_{key}" if key in _RESERVED else key: value for key, value in fields.items()}
        self._stdlib.log(level, "%s", text, extra={"event": event, **extra}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields, exc_info=True)


# LogRecord attributes that an ``extra`` key may not overwrite.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def get_logger(name: str) -> _EventLogger:
    return _EventLogger(name)


def _capturing() -> bool:
    processors = structlog.get_config().get("processors", ())
    return any(isinstance(p, structlog.testing.LogCapture) for p in processors)


def configure(*, level: str = "info", json: bool | None = None) -> None:
    """Render aggregator's events and other libraries' records with structlog on stderr (CLI, daemon)."""
    global _rendering
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    number = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _rendering = True
    # Libraries that log through the standard library (uvicorn, apscheduler) get the same format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(number, logging.INFO) if number < logging.WARNING else number)
    for name in _CHATTY:  # their routine lines at info are noise; warnings and errors still show
        logging.getLogger(name).setLevel(logging.DEBUG if number <= logging.DEBUG else logging.WARNING)
