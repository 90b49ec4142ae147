"""The spool on disk: where its directory is, its 0700 creation, the lock files whose flock says which live
process owns a spool file, and removing or setting aside a spool file with its companions.

Plain file-system steps, no SQLite: it must never delete a spool file's lock before the file itself, nor
a file that may still hold batches (an unreadable one is renamed ``*.corrupt``, not removed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

import sqlalchemy as sa

from aggregator import dsn, exceptions, logs

log = logs.get_logger("aggregator.spool")  # the spool's logger, whichever of its modules logs

SUFFIX = ".spool"


def default_directory(database_url: str) -> Path:
    """Where spool files go by default: ``spool/`` beside a SQLite database file, else in the state directory.

    The state directory is that of the embedded default database (``dsn.default_database_url()``):
    ``$STATE_DIRECTORY`` (systemd), else ``$XDG_STATE_HOME/aggregator``, else ``~/.local/state/aggregator``.
    """
    try:
        url = sa.make_url(database_url)
    except sa.exc.ArgumentError:
        raise exceptions.ConfigError(f"database_url={dsn.mask_url(database_url)!r} is not a database URL; "
                                     "use postgresql://user@host/db or sqlite:///path/to/file.db") from None
    database = url.database if url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        database = sa.make_url(dsn.default_database_url()).database or "aggregator.db"
    return Path(database).expanduser().absolute().parent / "spool"


def private_directory(path: Path) -> None:
    """``path`` created 0700 if missing; an existing directory keeps its mode."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)  # mkdir's mode is narrowed by the umask; this is exact


def take_lock(path: Path) -> int | None:
    """A descriptor holding an exclusive flock on ``path`` (created 0600), or None if another holds it."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The holder may have unlinked the file between our open and our flock (its file was done
        # with): the lock is then on a name no one else finds. Take the file at the path again.
        held = os.fstat(fd)
        try:
            current: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(held, current):
            if stat.S_IMODE(held.st_mode) != 0o600:
                with contextlib.suppress(PermissionError):
                    os.fchmod(fd, 0o600)
            return fd
        os.close(fd)


def remove_stale_lock(path: Path) -> None:
    """Remove a lock file without its spool file (its owner stopped between the two unlinks)."""
    spool_path = path.with_suffix(SUFFIX)
    try:
        if spool_path.exists() or (fd := take_lock(path)) is None:
            return
        if not spool_path.exists():
            unlink(path)
        os.close(fd)
    except OSError as exc:
        log.warning("spool_lock_skipped", path=str(path), error=str(exc))


def lock_path(path: Path) -> Path:
    return path.with_suffix(".lock")


def set_aside(path: Path) -> Path:
    """Rename a spool file (and its WAL, under the name SQLite looks for) to a free ``*.corrupt`` name."""
    target, number = path.with_name(f"{path.name}.corrupt"), 1
    while target.exists() or Path(f"{target}-wal").exists():
        target, number = path.with_name(f"{path.name}.{number}.corrupt"), number + 1
    os.rename(path, target)  # the file first: a WAL found alone is never replayed
    with contextlib.suppress(FileNotFoundError):
        os.rename(f"{path}-wal", f"{target}-wal")
    unlink(Path(f"{path}-shm"))
    return target


def remove(path: Path, *, lock: bool = True) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        unlink(Path(f"{path}{suffix}"))
    if lock:  # last: a spool file is never found unlocked while it still holds data
        unlink(lock_path(path))


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
