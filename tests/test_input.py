"""Bad input: a clear error naming the value, and nothing changes."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import aggregator
from aggregator import Aggregator, AggregatorError, ConfigError, InvalidInput, InvalidType, StoreUnavailable
from tests.helpers import T0, FakeClock, manual

GOOD = uuid.UUID(int=1)


@pytest.fixture
def agg(tmp_path) -> Aggregator:  # noqa: ANN001
    """Not started: tracking buffers in memory, so input checks need no database."""
    return Aggregator(database_url=f"sqlite:///{tmp_path / 'x.db'}", handle_sigterm=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"workspace_id": "not-a-uuid"}, InvalidInput, "workspace_id='not-a-uuid' is not a UUID"),
        ({"user_id": "123"}, InvalidInput, "user_id='123' is not a UUID"),
        ({"user_id": 42}, InvalidType, "user_id=42 is a int, not a UUID"),
        ({"workspace_id": None}, InvalidType, "workspace_id=None is a NoneType"),
        ({"allowed": -1}, InvalidInput, "allowed=-1 is out of range"),
        ({"denied": 2**40}, InvalidInput, "denied=1099511627776 is out of range"),
        ({"allowed": 1.5}, InvalidType, "allowed=1.5 is a float"),
        ({"denied": True}, InvalidType, "denied=True is a bool"),
        ({"allowed": "3"}, InvalidType, "allowed='3' is a str"),
        ({"at": dt.datetime(2026, 1, 1)}, InvalidInput, "naive datetime"),
        ({"at": float("nan")}, InvalidInput, "at=nan is not a valid epoch"),
    ],
)
def test_bad_track_arguments_raise_and_record_nothing(agg: Aggregator, kwargs: dict, error: type,
                                                      message: str) -> None:
    args = {"workspace_id": GOOD, "user_id": GOOD, "allowed": 1, "denied": 0} | kwargs
    at = args.pop("at", None)
    agg.track(GOOD, GOOD)
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")) as raised:
        agg.track(**args, at=at)
    assert isinstance(raised.value, AggregatorError)
    assert agg.status()["pending_events"] == 1


def test_value_and_type_errors_are_also_builtin_errors() -> None:
    """Callers may catch ValueError / TypeError as they would for any Python API."""
    assert issubclass(InvalidInput, ValueError) and issubclass(InvalidType, TypeError)
    assert issubclass(ConfigError, ValueError)


def test_uuid_strings_and_objects_are_the_same_id(agg: Aggregator) -> None:
    agg.track(str(GOOD), GOOD.hex)
    agg.track(GOOD, GOOD)
    (data,) = agg._tracker.take().values()
    assert (data.workspaces, data.users, data.events) == ({GOOD.int}, {GOOD.int}, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": "30 minutes"}, "window='30 minutes' is not a duration"),
        ({"window": "7s"}, "window='7s' must be a whole number of seconds that divides a day"),
        ({"window": "0s"}, "window='0s' must be longer than zero"),
        ({"flush_interval": "soon"}, "flush_interval='soon' is not a duration"),
        ({"grace": -5}, "grace=-5 must be zero or more"),
        ({"database_url": "mysql://u:secret@h/db"}, "backend 'mysql' is not supported"),
        ({"database_url": "sqlite://"}, "in-memory SQLite database cannot be shared"),
        ({"database_url": "::nonsense::"}, "is not a database URL"),
        ({"replica_id": ""}, "replica_id='' must be a string of 1 to 200 characters"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        Aggregator(**kwargs, handle_sigterm=False)
    assert "secret" not in str(raised.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_waiting_for_an_unreachable_database_fails_start_without_leaking_the_password(tmp_path: Path) -> None:
    """start(wait=...) is for hosts that want start-up to fail: it raises, names the server, hides the password."""
    url = f"postgresql://svc:hunter2secret@127.0.0.1:{_closed_port()}/usage"
    agg = Aggregator(database_url=url, handle_sigterm=False, spool_dir=str(tmp_path))
    agg.track(GOOD, GOOD)
    with capture_logs() as logs, pytest.raises(StoreUnavailable) as raised:
        agg.start(wait=1.0)
    assert "127.0.0.1" in str(raised.value) and "svc:***@" in str(raised.value)
    assert "hunter2secret" not in str(raised.value) + repr(logs)
    assert not agg.running and agg.status()["pending_events"] == 1


def test_a_failed_start_with_wait_leaves_nothing_to_print_at_exit(tmp_path: Path) -> None:
    """After start(wait=...) gave up, the process exits printing nothing (once: "Task was destroyed but it
    is pending!" from a waiter left behind)."""
    code = ("import sys; from aggregator import Aggregator, StoreUnavailable\n"
            f"agg = Aggregator(database_url='postgresql://u@127.0.0.1:{_closed_port()}/db', handle_sigterm=False, "
            f"spool_dir={str(tmp_path)!r})\n"
            "try:\n    agg.start(wait=0.5)\nexcept StoreUnavailable:\n    sys.exit(0)\nsys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_an_unreachable_database_never_fails_start_and_stop_spools_without_leaking_the_password(
        tmp_path: Path) -> None:
    """By default the host starts whatever the database does: tracking works, the outage shows in status(),
    and a stop that cannot flush keeps the events in the spool; the password appears nowhere."""
    url = f"postgresql://svc:hunter2secret@127.0.0.1:{_closed_port()}/usage"
    agg = Aggregator(database_url=url, handle_sigterm=False, spool_dir=str(tmp_path), stop_timeout="1s")
    with capture_logs() as logs:
        agg.start()
        agg.track(GOOD, GOOD)
        status = agg.status()["store"]
        agg.stop()
    assert (agg.running, status["ready"], status["connected"]) == (False, False, False)
    assert "svc:***@" in status["last_error"] and "hunter2secret" not in repr(status) + repr(logs)
    assert [e["events"] for e in logs if e["event"] == "final_flush_spooled"] == [1]
    assert len(list(tmp_path.rglob("*.spool"))) == 1


def test_flush_and_collect_need_a_started_aggregator(agg: Aggregator) -> None:
    with pytest.raises(aggregator.NotRunning, match=r"call start\(\)"):
        agg.flush()


def test_public_names_are_exactly_these() -> None:
    assert sorted(aggregator.__all__) == [
        "Aggregator", "AggregatorError", "ConfigError", "InvalidInput", "InvalidType", "Meter", "NotRunning",
        "Report", "SchemaOutdated", "StoreError", "StoreUnavailable",
    ]


def test_a_stopped_aggregator_cannot_be_restarted(sqlite_url: str) -> None:
    agg = manual(sqlite_url, FakeClock(T0 + 1)).start()
    agg.stop()
    with pytest.raises(aggregator.NotRunning, match="create a new Aggregator"):
        agg.start()


@pytest.mark.parametrize("text", [
    "123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000",
    "{123e4567-e89b-12d3-a456-426614174000}", "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
    "123e4567e89b12d3a456426614174000", "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
])
def test_uuid_strings_parse_exactly_as_uuid_does(text: str) -> None:
    from aggregator import tracker

    assert tracker.uuid_int(text, "user_id") == uuid.UUID(text).int


@pytest.mark.parametrize("text", [
    "123e4567-e89b-12d3-a456-42661417400 ", "123e4567-e89b-12d3-a456-4266141740g0",
    "+23e4567-e89b-12d3-a456-426614174000", "123e4567-e89b-12d3-a456-4266_4174000",
    "123e4567-e89b-12d3-a456 426614174000", " 23e4567-e89b-12d3-a456-426614174000",
])
def test_near_uuid_strings_are_refused(text: str) -> None:
    from aggregator import tracker

    with pytest.raises(InvalidInput, match="is not a UUID"):
        tracker.uuid_int(text, "user_id")
