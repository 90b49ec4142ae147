"""A library's manners: embedded, aggregator prints nothing unless the host configures logging."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EMBEDDED = """
import uuid
from aggregator import Aggregator
{setup}
agg = Aggregator(database_url="sqlite:///{db}", window="1s", flush_interval="0.1s", collect_interval="0.1s")
agg.start()
for k in range(100):
    agg.track(uuid.UUID(int=1), uuid.UUID(int=k + 1))
agg.flush()
agg.collect()
agg.stop()
"""


def _run(tmp_path: Path, setup: str = "") -> subprocess.CompletedProcess[str]:
    code = EMBEDDED.format(setup=setup, db=tmp_path / "agg.db")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_embedded_use_prints_nothing(tmp_path: Path) -> None:
    """Start, track, flush, collect and stop in a host that configured no logging: stdout and stderr stay empty."""
    done = _run(tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_embedded_use_prints_nothing_when_the_scheduler_warns(tmp_path: Path) -> None:
    """apscheduler warns when a flush outlasts its interval (a job skipped, on a loaded host); a host that
    configured no logging still sees nothing on stdout or stderr."""
    warn = ("import logging; logging.getLogger('apscheduler.scheduler').warning("
            "'Execution of job \"Aggregator._scheduled_flush\" skipped: maximum number of running instances "
            "reached (1)')")
    done = _run(tmp_path, f"from aggregator import runtime\n{warn}")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_a_host_that_configures_logging_gets_aggregator_records(tmp_path: Path) -> None:
    """The host's own logging configuration receives the events under the aggregator.* logger names."""
    done = _run(tmp_path, "import logging; logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')")
    assert done.returncode == 0, done.stderr
    names = {line.split(" ", 1)[0] for line in done.stderr.splitlines()}
    assert {"aggregator", "aggregator.flush"} <= names
    assert any(line.startswith("aggregator started ") for line in done.stderr.splitlines())


def test_the_daemon_log_has_no_scheduler_or_migration_chatter(tmp_path: Path) -> None:
    """`aggregator run` renders its own events; apscheduler's and alembic's per-job lines stay at debug."""
    code = (
        "import logging; from aggregator import logs; logs.configure(level='info', json=True); "
        "logging.getLogger('apscheduler.executors.default').info('Running job x'); "
        "logging.getLogger('alembic.runtime.migration').info('Context impl SQLiteImpl.'); "
        "logging.getLogger('apscheduler.scheduler').warning('a real problem'); "
        "logs.get_logger('aggregator.flush').info('flush', events=3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Running job" not in done.stderr and "Context impl" not in done.stderr
    assert '"a real problem"' in done.stderr and '"event": "flush"' in done.stderr
