"""The local spool: flush batches kept on disk, in order, while the store cannot be reached.

One SQLite file per incarnation, owned through an ``flock`` for its process's lifetime and adopted by
the next replica on the host once that process is gone. It must never lose a batch silently (a file it
cannot read is set aside as ``*.corrupt``, not deleted) nor store one in a form another version of the
code cannot identify (each payload starts with its format version; no pickle).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import stat
import struct
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from aggregator import config, exceptions, experiences, logs, meters, store

log = logs.get_logger("aggregator.spool")

FORMAT = 1  # the first byte of every payload; a reader refuses versions it does not know
# PRAGMA user_version: the file's tables and the FORMAT of its payloads. A new FORMAT raises it too, so
# an older aggregator leaves a newer file whole for a newer one instead of failing halfway through it.
FILE_FORMAT = 1
APPLICATION_ID = 0x41475350  # "AGSP" in PRAGMA application_id: a SQLite file that is a spool
SUFFIX = ".spool"

# Memory estimates for the budget, measured with tracemalloc on 64-bit CPython 3.11 (bench/spool.py
# measures them again): a set of 128-bit ints costs 76-100 bytes per id past 50,000 ids (48 the int
# object, the rest the hash table, whose fill varies between doublings), up to 153 for smaller sets
# just past a fourfold resize. A batch's lists hold the same ints at 56 bytes per id, beside the set of
# them the flusher keeps until the store confirms: ~100 per id in all. An estimate, not an accounting.
BYTES_PER_ID = 100
WINDOW_BYTES = 250  # a BatchWindow with its two lists and dict entry (measured 236)
METER_GROUP_BYTES = 800  # a GroupData with two dimensions, its key and empty distinct set (753)
DISTINCT_BYTES = 160  # a uuid.UUID in a distinct set (151)
METER_RECORD_BYTES = 700  # an Identified record with two dimensions, and its key (638)
CHECKPOINT_BYTES = 400  # a Checkpoint with short strings, plus its meta's length (251 with shared strings)
BATCH_BYTES = 300

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

_HEADER = struct.Struct(">BI")  # format version, CRC-32 of the version byte and the body: in every FORMAT
_DOUBLE = struct.Struct(">d")
_CHECKPOINT_TEXT = ("correlation_id", "experience_id", "checkpoint", "type", "feature_category", "urgency",
                    "checkpoint_category")
_CHECKPOINT_TIME = ("client_timestamp", "received_at")
_CHECKPOINT_OPTIONAL = ("outcome", "meta")


class SpoolError(exceptions.StoreError):
    """The local spool could not be written or read; check the spool directory's free space and permissions."""


class SpoolCorrupt(SpoolError):
    """A spool file cannot be read; set it aside (``Spool.set_aside()``) and go on with the others."""


class SpoolVersionError(SpoolError):
    """A spool file was written in a format this version of aggregator does not read."""


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
        path = Path(directory).expanduser().absolute() / f"{writer_id.hex}{SUFFIX}"
        with _translated(path, "create"):
            _private_directory(path.parent)
            lock = _take_lock(_lock_path(path))
        if lock is None:
            raise SpoolError(f"spool file {path} is held already (by another process or Spool): writer_id "
                             f"{writer_id} is in use twice")
        try:
            try:
                spool = cls._open(path, lock) if path.exists() else None
            except _Unfinished:
                spool = None
            if spool is None:
                with _translated(path, "create"):
                    _remove(path, lock=False)
                    _create_file(path, writer_id, replica_id)
                spool = cls._open(path, lock)
        except BaseException:
            os.close(lock)
            raise
        if spool.writer_id != writer_id:
            spool.close(delete_if_empty=False)
            raise SpoolCorrupt(f"spool file {path} holds writer_id {spool.writer_id}, not {writer_id}; move it away")
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
        adopted = [spool for path in sorted(folder.glob(f"*{SUFFIX}")) if (spool := cls._adopt(path)) is not None]
        for lock_path in folder.glob("*.lock"):
            _remove_stale_lock(lock_path)
        return sorted(adopted, key=lambda spool: spool.created_at)

    @classmethod
    def _adopt(cls, path: Path) -> Spool | None:
        """``path`` opened under its lock; None if a live process holds it, it is gone, or unusable (logged)."""
        lock = None
        try:
            lock = _take_lock(_lock_path(path))
            if lock is None:
                return None  # its owner is alive
            if path.exists():
                spool = cls._open(path, lock)
                lock = None  # the spool's now
                return spool
            _unlink(_lock_path(path))  # replayed and removed since the listing
        except _Unfinished:  # its owner stopped before its first commit: there is nothing in it
            try:
                _remove(path)
            except OSError as exc:
                log.warning("spool_skipped", path=str(path), error=f"an empty leftover, not removed: {exc}")
        except SpoolVersionError as exc:
            log.warning("spool_skipped", path=str(path), error=str(exc))
        except SpoolCorrupt as exc:
            try:
                target = _set_aside(path)
                _unlink(_lock_path(path))
            except OSError as move:
                log.error("spool_skipped", path=str(path), error=f"{exc}; it could not be set aside: {move}")
            else:
                log.error("spool_set_aside", path=str(path), moved_to=str(target), error=str(exc))
        except (SpoolError, OSError) as exc:
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
                    raise SpoolCorrupt(f"spool file {path} is not an aggregator spool (application_id "
                                       f"{application_id:#x}); move it out of {path.parent}")
                if version != FILE_FORMAT:
                    raise SpoolVersionError(_version_message(f"spool file {path}", version, FILE_FORMAT))
                db.execute("PRAGMA journal_mode = WAL")  # as created; also what -wal and -shm files mean
                db.execute("PRAGMA synchronous = FULL")
                meta = db.execute(_META).fetchone()
                if meta is None or len(meta[0]) != 16:
                    raise SpoolCorrupt(_corrupt_message(path, "its writer_id is missing"))
                count = db.execute(_COUNT).fetchone()[0]
            except BaseException:
                db.close()
                raise
        return cls(path, db, lock, (bytes(meta[0]), meta[1], meta[2]), count)

    def append(self, batch: store.Batch) -> None:
        """Keep ``batch`` durably (written and fsynced when this returns) under its number."""
        payload = encode(batch)
        with self._mutex, _translated(self.path, f"append batch {batch.seq}"):
            db = self._usable()
            try:
                db.execute(_INSERT, (batch.seq, payload))
            except sqlite3.IntegrityError:
                # The same batch spooled again (a spill retried after an error): fine if it is the same.
                if db.execute(_PAYLOAD, (batch.seq,)).fetchone() != (payload,):
                    raise SpoolError(f"spool file {self.path} already holds a different batch {batch.seq}: "
                                     "a batch number was reused; this is a bug, please report it") from None
                return
            self._count += 1

    def first(self) -> store.Batch | None:
        """The batch with the lowest number, or None if the spool is empty; SpoolCorrupt if unreadable."""
        with self._mutex, _translated(self.path, "read"):
            row = self._usable().execute(_FIRST).fetchone()
        if row is None:
            return None
        batch = decode(row[1], source=f"spool file {self.path}, batch {row[0]}")
        if batch.seq != row[0]:
            raise SpoolCorrupt(_corrupt_message(self.path, f"row {row[0]} holds batch {batch.seq}"))
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
        return sum(_size(Path(f"{self.path}{suffix}")) for suffix in ("", "-wal"))

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
                    _remove(self.path)
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
                    target = _set_aside(self.path)
                    _unlink(_lock_path(self.path))
            finally:
                self._release()
        log.error("spool_set_aside", path=str(self.path), moved_to=str(target), writer_id=str(self.writer_id),
                  batches=self._count)
        return target

    def _usable(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"spool file {self.path} is closed (or belongs to the parent of this forked process)")
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


def default_directory(database_url: str) -> Path:
    """Where spool files go by default: ``spool/`` beside a SQLite database file, else in the state directory.

    The state directory is that of the embedded default database (``config.default_database_url()``):
    ``$STATE_DIRECTORY`` (systemd), else ``$XDG_STATE_HOME/aggregator``, else ``~/.local/state/aggregator``.
    """
    try:
        url = sa.make_url(database_url)
    except sa.exc.ArgumentError:
        raise exceptions.ConfigError(f"database_url={config.mask_url(database_url)!r} is not a database URL; "
                                     "use postgresql://user@host/db or sqlite:///path/to/file.db") from None
    database = url.database if url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        database = sa.make_url(config.default_database_url()).database or "aggregator.db"
    return Path(database).expanduser().absolute().parent / "spool"


def batch_bytes(batch: store.Batch) -> int:
    """A rough estimate of the memory ``batch`` holds as the flusher holds it (see BYTES_PER_ID), for the budget."""
    ids = sum(len(window.workspaces) + len(window.users) for window in batch.windows.values())
    size = BATCH_BYTES + len(batch.windows) * WINDOW_BYTES + ids * BYTES_PER_ID
    size += sum(CHECKPOINT_BYTES + len(checkpoint.meta or "") for checkpoint in batch.checkpoints)
    if batch.meters is not None:
        groups, identified = batch.meters.groups, batch.meters.identified
        size += len(groups) * METER_GROUP_BYTES + len(identified) * METER_RECORD_BYTES
        size += sum(len(data.distinct) for data in groups.values()) * DISTINCT_BYTES
    return size


# The payload: a version byte, a CRC-32 of that byte and the body, then the body: fields in a fixed
# order. Integers are zigzag varints (any size, exact), floats IEEE doubles, text UTF-8 (lone
# surrogates kept), ids 16 bytes big-endian. A change of a field or its order is a new FORMAT (the
# old one still read); the 5-byte header stays, so a damaged version byte reads as damage.


def encode(batch: store.Batch) -> bytes:
    """``batch`` as bytes in the current FORMAT."""
    out = _Writer()
    metered = batch.meters
    try:
        out.unsigned(int(batch.final) | int(batch.watermark is not None) << 1 | int(metered is not None) << 2)
        out.signed(batch.seq)
        out.signed(batch.events)
        if batch.watermark is not None:
            out.double(batch.watermark)
        out.unsigned(len(batch.windows))
        for start, window in batch.windows.items():
            for number in (start, window.allowed, window.denied):
                out.signed(number)
            out.ids(window.workspaces)
            out.ids(window.users)
        if metered is not None:
            out.unsigned(len(metered.groups))
            for (window_start, meter, group), data in metered.groups.items():
                out.signed(window_start)
                out.texts(meter, group)
                out.dimensions(data.dimensions)
                out.signed(data.quantity)
                out.signed(data.records)
                out.ids([value.int for value in data.distinct])
            out.unsigned(len(metered.identified))
            for (meter, event_id), item in metered.identified.items():
                out.texts(meter, event_id, item.event_id, item.meter)
                out.signed(item.window_start)
                out.texts(item.group)
                out.dimensions(item.dimensions)
                out.signed(item.quantity)
                out.ids([] if item.distinct is None else [item.distinct.int])
        out.unsigned(len(batch.checkpoints))
        for checkpoint in batch.checkpoints:
            out.texts(*(getattr(checkpoint, name) for name in _CHECKPOINT_TEXT))
            for name in _CHECKPOINT_TIME:
                out.double(getattr(checkpoint, name))
            for name in _CHECKPOINT_OPTIONAL:
                out.optional(getattr(checkpoint, name))
    except (TypeError, ValueError, OverflowError, AttributeError, struct.error) as exc:
        raise SpoolError(f"batch {batch.seq} cannot be spooled: {type(exc).__name__}: {exc}") from exc
    body = bytes(out.buffer)
    return _HEADER.pack(FORMAT, zlib.crc32(body, zlib.crc32(bytes([FORMAT])))) + body


def decode(payload: bytes, *, source: str = "spooled batch") -> store.Batch:
    """The batch ``payload`` holds; SpoolVersionError or SpoolCorrupt naming ``source`` if it cannot be read."""
    if len(payload) < _HEADER.size:
        raise SpoolCorrupt(f"{source} is damaged ({len(payload)} bytes, shorter than a header)")
    version, crc = _HEADER.unpack_from(payload)
    if zlib.crc32(payload[_HEADER.size:], zlib.crc32(payload[:1])) != crc:
        raise SpoolCorrupt(f"{source} is damaged (checksum mismatch)")
    if version != FORMAT:
        raise SpoolVersionError(_version_message(source, version, FORMAT))
    read = _Reader(payload, _HEADER.size)
    try:
        batch = _decode_v1(read)
        if read.at != len(payload):
            raise ValueError(f"{len(payload) - read.at} bytes left over")
    except (IndexError, ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
        raise SpoolCorrupt(f"{source} cannot be decoded: {exc}") from exc
    return batch


def _decode_v1(read: _Reader) -> store.Batch:
    flags = read.unsigned()
    seq, events = read.signed(), read.signed()
    watermark = read.double() if flags & 2 else None
    windows: dict[int, store.BatchWindow] = {}
    for _ in range(read.unsigned()):
        start, allowed, denied = read.signed(), read.signed(), read.signed()
        windows[start] = store.BatchWindow(workspaces=read.ids(), users=read.ids(), allowed=allowed, denied=denied)
    metered = None
    if flags & 4:
        metered = meters.MeterBatch()
        for _ in range(read.unsigned()):
            key = (read.signed(), read.text(), read.text())
            metered.groups[key] = meters.GroupData(dimensions=read.dimensions(), quantity=read.signed(),
                                                   records=read.signed(),
                                                   distinct={uuid.UUID(int=value) for value in read.ids()})
        for _ in range(read.unsigned()):
            ident = (read.text(), read.text())
            event_id, meter, window_start, group = read.text(), read.text(), read.signed(), read.text()
            dimensions, quantity, distinct = read.dimensions(), read.signed(), read.ids()
            metered.identified[ident] = meters.Identified(
                event_id=event_id, meter=meter, window_start=window_start, group=group, dimensions=dimensions,
                quantity=quantity, distinct=uuid.UUID(int=distinct[0]) if distinct else None)
    checkpoints = []
    for _ in range(read.unsigned()):
        fields: dict[str, str | float | None] = {name: read.text() for name in _CHECKPOINT_TEXT}
        fields.update({name: read.double() for name in _CHECKPOINT_TIME})
        fields.update({name: read.optional() for name in _CHECKPOINT_OPTIONAL})
        checkpoints.append(experiences.Checkpoint(**fields))  # type: ignore[arg-type]
    return store.Batch(seq=seq, windows=windows, events=events, meters=metered, checkpoints=checkpoints,
                       watermark=watermark, final=bool(flags & 1))


class _Writer:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def unsigned(self, number: int) -> None:
        buffer = self.buffer
        while number > 0x7F:
            buffer.append(number & 0x7F | 0x80)
            number >>= 7
        buffer.append(number)  # a negative number fails here: bytes are 0-255

    def signed(self, number: int) -> None:
        self.unsigned(number << 1 if number >= 0 else ~number << 1 | 1)

    def double(self, number: float) -> None:
        self.buffer += _DOUBLE.pack(number)

    def texts(self, *texts: str) -> None:
        for text in texts:
            raw = text.encode("utf-8", "surrogatepass")
            self.unsigned(len(raw))
            self.buffer += raw

    def optional(self, text: str | None) -> None:
        if text is None:
            self.unsigned(0)
        else:
            raw = text.encode("utf-8", "surrogatepass")
            self.unsigned(len(raw) + 1)
            self.buffer += raw

    def dimensions(self, dimensions: dict[str, str]) -> None:
        self.unsigned(len(dimensions))
        for name, value in dimensions.items():
            self.texts(name, value)

    def ids(self, ids: list[int]) -> None:
        self.unsigned(len(ids))
        self.buffer += b"".join([value.to_bytes(16, "big") for value in ids])


class _Reader:
    def __init__(self, data: bytes, at: int) -> None:
        self.data = data
        self.at = at

    def take(self, size: int) -> bytes:
        end = self.at + size
        if end > len(self.data):
            raise IndexError(f"{end - len(self.data)} bytes missing at the end")
        chunk, self.at = self.data[self.at:end], end
        return chunk

    def unsigned(self) -> int:
        number = shift = 0
        while True:
            byte = self.data[self.at]
            self.at += 1
            number |= (byte & 0x7F) << shift
            if byte < 0x80:
                return number
            shift += 7

    def signed(self) -> int:
        number = self.unsigned()
        return ~(number >> 1) if number & 1 else number >> 1

    def double(self) -> float:
        value: float = _DOUBLE.unpack(self.take(8))[0]
        return value

    def text(self) -> str:
        return self.take(self.unsigned()).decode("utf-8", "surrogatepass")

    def optional(self) -> str | None:
        size = self.unsigned()
        return None if size == 0 else self.take(size - 1).decode("utf-8", "surrogatepass")

    def dimensions(self) -> dict[str, str]:
        return {self.text(): self.text() for _ in range(self.unsigned())}

    def ids(self) -> list[int]:
        count = self.unsigned()
        halves = iter(struct.unpack(f">{2 * count}Q", self.take(16 * count)))  # ~2x int.from_bytes per id
        return [high << 64 | low for high, low in zip(halves, halves, strict=True)]


def _version_message(source: str, version: int, known: int) -> str:
    return (f"{source} is in format version {version}, and this version of aggregator reads version {known} "
            "only: it was written by another version of aggregator; run that version (or a newer one) on this "
            "host to replay it, then this one")


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
            raise SpoolCorrupt(_corrupt_message(path, str(exc))) from exc
        raise SpoolError(f"spool file {path}: {doing} failed: {exc}; check the free space and permissions "
                         f"of {path.parent}") from exc
    except (OSError, OverflowError) as exc:
        raise SpoolError(f"spool file {path}: {doing} failed: {exc}; check the free space and permissions "
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
        _fsync_directory(path.parent)  # the file's name is durable too, not only its contents
    except BaseException:
        _unlink(path)
        raise


def _private_directory(path: Path) -> None:
    """``path`` created 0700 if missing; an existing directory keeps its mode."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)  # mkdir's mode is narrowed by the umask; this is exact


def _take_lock(path: Path) -> int | None:
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


def _remove_stale_lock(path: Path) -> None:
    """Remove a lock file without its spool file (its owner stopped between the two unlinks)."""
    spool_path = path.with_suffix(SUFFIX)
    try:
        if spool_path.exists() or (fd := _take_lock(path)) is None:
            return
        if not spool_path.exists():
            _unlink(path)
        os.close(fd)
    except OSError as exc:
        log.warning("spool_lock_skipped", path=str(path), error=str(exc))


def _lock_path(path: Path) -> Path:
    return path.with_suffix(".lock")


def _set_aside(path: Path) -> Path:
    """Rename a spool file (and its WAL, under the name SQLite looks for) to a free ``*.corrupt`` name."""
    target, number = path.with_name(f"{path.name}.corrupt"), 1
    while target.exists() or Path(f"{target}-wal").exists():
        target, number = path.with_name(f"{path.name}.{number}.corrupt"), number + 1
    os.rename(path, target)  # the file first: a WAL found alone is never replayed
    with contextlib.suppress(FileNotFoundError):
        os.rename(f"{path}-wal", f"{target}-wal")
    _unlink(Path(f"{path}-shm"))
    return target


def _remove(path: Path, *, lock: bool = True) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        _unlink(Path(f"{path}{suffix}"))
    if lock:  # last: a spool file is never found unlocked while it still holds data
        _unlink(_lock_path(path))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
