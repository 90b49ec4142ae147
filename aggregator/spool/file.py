"""A spool file: the batches one incarnation spooled, in one SQLite file held under an exclusive flock, and
the adoption of the files whose process is gone.

It must never lose a batch silently (a file it cannot read is set aside as ``*.corrupt``, not deleted),
nor open a file a newer aggregator wrote (left whole for it), nor use a file another live process holds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

from aggregator import exceptions, logs, store
from aggregator.spool import codec, disk, errors

log = logs.get_logger("aggregator.spool")  # the spool's logger, whichever of its modules logs

# PRAGMA user_version: the file's tables and the FORMAT of its payloads. A new FORMAT raises it too, so
# an older aggregator leaves a newer file whole for a newer one instead of failing halfway through it.
FILE_FORMAT = 1
APPLICATION_ID = 0x41475350  # "AGSP" in PRAGMA application_id: a SQLite file that is a spool

# Every statement the spool runs, here.
_SCHEMA = (
    "CREATE TABLE spool (one INTEGER PRIMARY KEY CHECK (one = 1), writer_id BLOB NOT NULL, "
    "replica_id TEXT NOT NULL, created_at REAL NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL)",
    "CREATE TABLE batches (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {FILE_FORMAT}",
)
_INSERT_META = "INSERT INTO spool VALUES (1, ?, ?, ?, ?, ?)"
_META = "SELECT writer_id, replica_id, created_at FROM spool"
_COUNT = "SELECT count(*) FROM batches"
_INSERT = "INSERT INTO batches (seq, payload) VALUES (?, ?)"
_PAYLOAD = "SELECT payload FROM batches WHERE seq = ?"
_FIRST = "SELECT seq, payload FROM batches ORDER BY seq LIMIT 1"
_DELETE = "DELETE FROM batches WHERE seq = ?"
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


class Spool:
    """The spooled batches of one incarnation (writer_id) in one SQLite file, held under an exclusive flock.

    Methods are synchronous and serialised by a lock: run them in a worker thread off an event loop.
    """

    def __init__(self, path: Path, db: sqlite3.Connection, lock: int, meta: tuple[bytes, str, float],
                 count: int) -> None:
        self.path = path
        self.writer_id = uuid.UUID(bytes=meta[0])
        self.replica_id = meta[1]
        self.created_at = meta[2]
        self._db: sqlite3.Connection | None = db
        self._lock: int | None = lock
        self._count = count  # rows; exact, as no other process writes a file it does not hold
        self._mutex = threading.Lock()
        _live.add(self)

    @classmethod
    def create(cls, directory: str | os.PathLike[str], writer_id: uuid.UUID, replica_id: str) -> Spool:
        """This incarnation's spool in ``directory`` (created 0700 if missing); reopened if already there."""
        path = Path(directory).expanduser().absolute() / f"{writer_id.hex}{disk.SUFFIX}"
        with _translated(path, "create"):
            disk.private_directory(path.parent)
            lock = disk.take_lock(disk.lock_path(path))
        if lock is None:
            raise errors.SpoolError(f"spool file {path} is held already (by another process or Spool): writer_id "
                             f"{writer_id} is in use twice")
        try:
            try:
                spool = cls._open(path, lock) if path.exists() else None
            except _Unfinished:
                spool = None
            if spool is None:
                with _translated(path, "create"):
                    disk.remove(path, lock=False)
                    _create_file(path, writer_id, replica_id)
                spool = cls._open(path, lock)
        except BaseException:
            os.close(lock)
            raise
        if spool.writer_id != writer_id:
            spool.close(delete_if_empty=False)
            raise errors.SpoolCorrupt(f"spool file {path} holds writer_id {spool.writer_id}, not {writer_id}; "
                                      "move it away")
        return spool

    @classmethod
    def orphans(cls, directory: str | os.PathLike[str]) -> list[Spool]:
        """Adopt the spool files in ``directory`` that no live process holds, oldest first; close each when done.

        A file this cannot read is set aside as ``*.corrupt``, and one written by a newer aggregator is
        left for it; both are logged and skipped, so one bad file never stops the others' replay.
        """
        folder = Path(directory).expanduser()
        if not folder.is_dir():
            return []
        adopted = [spool for path in sorted(folder.glob(f"*{disk.SUFFIX}")) if (spool := cls._adopt(path)) is not None]
        for lock_path in folder.glob("*.lock"):
            disk.remove_stale_lock(lock_path)
        return sorted(adopted, key=lambda spool: spool.created_at)

    @classmethod
    def _adopt(cls, path: Path) -> Spool | None:
        """``path`` opened under its lock; None if a live process holds it, it is gone, or unusable (logged)."""
        lock = None
        try:
            lock = disk.take_lock(disk.lock_path(path))
            if lock is None:
                return None  # its owner is alive
            if path.exists():
                spool = cls._open(path, lock)
                lock = None  # the spool's now
                return spool
            disk.unlink(disk.lock_path(path))  # replayed and removed since the listing
        except _Unfinished:  # its owner stopped before its first commit: there is nothing in it
            try:
                disk.remove(path)
            except OSError as exc:
                log.warning("spool_skipped", path=str(path), error=f"an empty leftover, not removed: {exc}")
        except errors.SpoolVersionError as exc:
            log.warning("spool_skipped", path=str(path), error=str(exc))
        except errors.SpoolCorrupt as exc:
            try:
                target = disk.set_aside(path)
                disk.unlink(disk.lock_path(path))
            except OSError as move:
                log.error("spool_skipped", path=str(path), error=f"{exc}; it could not be set aside: {move}")
            else:
                log.error("spool_set_aside", path=str(path), moved_to=str(target), error=str(exc))
        except (errors.SpoolError, OSError) as exc:
            log.warning("spool_skipped", path=str(path), error=str(exc))
        finally:
            if lock is not None:
                os.close(lock)
        return None

    @classmethod
    def _open(cls, path: Path, lock: int) -> Spool:
        with _translated(path, "open"):
            if path.stat().st_size == 0:
                raise _Unfinished
            db = _connect(path)
            try:  # the file is only read until it is known to be a spool this code reads
                application_id = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if application_id == 0 and version == 0 and db.execute("PRAGMA schema_version").fetchone()[0] == 0:
                    raise _Unfinished
                if application_id != APPLICATION_ID:
                    raise errors.SpoolCorrupt(f"spool file {path} is not an aggregator spool (application_id "
                                       f"{application_id:#x}); move it out of {path.parent}")
                if version != FILE_FORMAT:
                    raise errors.SpoolVersionError(errors.version_message(f"spool file {path}", version, FILE_FORMAT))
                db.execute("PRAGMA journal_mode = WAL")  # as created; also what -wal and -shm files mean
                db.execute("PRAGMA synchronous = FULL")
                meta = db.execute(_META).fetchone()
                if meta is None or len(meta[0]) != 16:
                    raise errors.SpoolCorrupt(_corrupt_message(path, "its writer_id is missing"))
                count = db.execute(_COUNT).fetchone()[0]
            except BaseException:
                db.close()
                raise
        return cls(path, db, lock, (bytes(meta[0]), meta[1], meta[2]), count)

    def append(self, batch: store.Batch) -> None:
        """Keep ``batch`` durably (written and fsynced when this returns) under its number."""
        payload = codec.encode(batch)
        with self._mutex, _translated(self.path, f"append batch {batch.seq}"):
            db = self._usable()
            try:
                db.execute(_INSERT, (batch.seq, payload))
            except sqlite3.IntegrityError:
                # The same batch spooled again (a spill retried after an error): fine if it is the same.
                if db.execute(_PAYLOAD, (batch.seq,)).fetchone() != (payload,):
                    raise errors.SpoolError(f"spool file {self.path} already holds a different batch {batch.seq}: "
                                     "a batch number was reused; this is a bug, please report it") from None
                return
            self._count += 1

    def first(self) -> store.Batch | None:
        """The batch with the lowest number, or None if the spool is empty; SpoolCorrupt if unreadable."""
        with self._mutex, _translated(self.path, "read"):
            row = self._usable().execute(_FIRST).fetchone()
        if row is None:
            return None
        batch = codec.decode(row[1], source=f"spool file {self.path}, batch {row[0]}")
        if batch.seq != row[0]:
            raise errors.SpoolCorrupt(_corrupt_message(self.path, f"row {row[0]} holds batch {batch.seq}"))
        return batch

    def remove(self, seq: int) -> None:
        """Forget batch ``seq`` once the store has it (a lost removal is harmless: the store skips a replay)."""
        with self._mutex, _translated(self.path, f"remove batch {seq}"):
            self._count -= self._usable().execute(_DELETE, (seq,)).rowcount

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<Spool {self.path} writer_id={self.writer_id} replica_id={self.replica_id!r} batches={self._count}>"

    @property
    def pending_batches(self) -> int:
        return self._count

    @property
    def bytes_on_disk(self) -> int:
        """The file and its write-ahead log, in bytes."""
        return sum(disk.size(Path(f"{self.path}{suffix}")) for suffix in ("", "-wal"))

    def close(self, delete_if_empty: bool = True) -> None:
        """Let the file go: deleted if it is empty and ``delete_if_empty``, else left for the next replica."""
        with self._mutex:
            db, self._db = self._db, None
            if db is None:
                return
            try:
                with _translated(self.path, "close"):
                    db.close()
            finally:
                if delete_if_empty and not self._count:
                    disk.remove(self.path)
                self._release()

    def set_aside(self) -> Path:
        """Rename this unreadable file to ``*.corrupt`` beside it (kept for recovery by hand), let it go, and
        return the new path; the caller goes on without it."""
        with self._mutex:
            db, self._db = self._usable(), None
            try:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
                with _translated(self.path, "set aside"):
                    target = disk.set_aside(self.path)
                    disk.unlink(disk.lock_path(self.path))
            finally:
                self._release()
        log.error("spool_set_aside", path=str(self.path), moved_to=str(target), writer_id=str(self.writer_id),
                  batches=self._count)
        return target

    def _usable(self) -> sqlite3.Connection:
        if self._db is None:
            raise errors.SpoolError(f"spool file {self.path} is closed (or belongs to the parent of this forked "
                                    "process)")
        return self._db

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _disown(self) -> None:
        """In a forked child: drop the parent's file without touching it."""
        # flock is shared with the parent through the inherited descriptor: unlocking would release the
        # parent's lock, so only our copy is closed. Closing the connection could checkpoint the
        # parent's WAL: it is kept open, unused, for the child's lifetime.
        if self._db is not None:
            _inherited.append(self._db)
            self._db = None
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock)
            self._lock = None
        self._mutex = threading.Lock()


class _Unfinished(Exception):
    """A spool file whose creation never committed: empty, nothing to replay."""


_live: weakref.WeakSet[Spool] = weakref.WeakSet()
_inherited: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    for spool in list(_live):
        spool._disown()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _corrupt_message(path: Path, detail: str) -> str:
    return (f"spool file {path} is corrupt ({detail}); Spool.set_aside() moves it to {path.name}.corrupt and "
            f"replay goes on without it (try `sqlite3 {path}.corrupt .recover` to salvage its batches)")


@contextlib.contextmanager
def _translated(path: Path, doing: str) -> Iterator[None]:
    """sqlite3 and OS errors as ours, naming the file."""
    try:
        yield
    except exceptions.AggregatorError:
        raise
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise errors.SpoolCorrupt(_corrupt_message(path, str(exc))) from exc
        raise errors.SpoolError(f"spool file {path}: {doing} failed: {exc}; check the free space and permissions "
                         f"of {path.parent}") from exc
    except (OSError, OverflowError) as exc:
        raise errors.SpoolError(f"spool file {path}: {doing} failed: {exc}; check the free space and permissions "
                         f"of {path.parent}") from exc


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw: never create a file here (creating is _create_file's, with its permissions). Any thread
    # may call: the Spool's mutex serialises them.
    return sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, isolation_level=None, check_same_thread=False)


def _create_file(path: Path, writer_id: uuid.UUID, replica_id: str) -> None:
    # Created here, 0600 whatever the umask: SQLite gives the -wal and -shm files the database's mode.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    os.chmod(path, 0o600)
    try:
        db = _connect(path)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("BEGIN")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(_INSERT_META, (writer_id.bytes, replica_id, time.time(), socket.gethostname(), os.getpid()))
            db.execute("COMMIT")
        finally:
            db.close()
        disk.fsync_directory(path.parent)  # the file's name is durable too, not only its contents
    except BaseException:
        disk.unlink(path)
        raise
