"""The jsonl writer: envelopes appended as JSON lines to rotating files in a local directory.

Files are named ``{prefix}-{UTC creation time}-{pid}.jsonl``, so name order is creation order and two
processes never share a file. A batch is all or nothing: on an I/O error the files are cut back to where
they stood before it, so a retry never lands after half a line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import errno
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aggregator import exceptions, logs, units
from aggregator.writers import Envelope, Outcome, Writer, unknown_keys

log = logs.get_logger("aggregator.writers.jsonl")

FILE_MODE = 0o640
DIRECTORY_MODE = 0o750
DEFAULT_MAX_BYTES = 64 * 1024**2
_KNOWN = ("directory", "max_bytes", "max_age", "keep", "prefix", "fsync")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_PREFIX = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def parse_size(value: object, *, key: str) -> int:
    """Bytes in ``value``: an int, or a string like "500KB", "10MB", "64MiB", "1GiB" (KB = 1000, KiB = 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2) and match.group(2).lower()]
    else:
        raise exceptions.ConfigError(
            f"{key}={value!r} is not a size; use a whole number of bytes or a number with a unit: "
            "B, KB, MB, GB, KiB, MiB, GiB (e.g. '64MiB')")
    if size <= 0:
        raise exceptions.ConfigError(f"{key}={value!r} must be more than zero bytes, e.g. '64MiB'")
    return size


@dataclasses.dataclass(slots=True)
class _File:
    fd: int
    path: Path
    size: int
    opened_at: float


class JsonlWriter(Writer):
    """Appends one JSON object per envelope to ``directory``, rotating by size and age, keeping ``keep`` files."""

    type = "jsonl"

    def __init__(self, name: str, *, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES, max_age: float = 3600.0,
                 keep: int = 48, prefix: str = "aggregator", fsync: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(name)
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.keep = keep
        self.prefix = prefix
        self.fsync = fsync
        self._clock = clock
        self._pattern = re.compile(rf"^{re.escape(prefix)}-\d{{8}}T\d{{6}}\.\d{{6}}Z-\d+\.jsonl$")
        self._file: _File | None = None
        self._last_micros = 0
        # send() runs its I/O in a worker thread; a cancelled send() leaves that thread running, so
        # close() must wait for it rather than close the descriptor under it.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> JsonlWriter:
        unknown_keys(name, options, _KNOWN)
        key = f"writers.{name}"
        directory = options.get("directory")
        if not isinstance(directory, str | os.PathLike) or not str(directory):
            raise exceptions.ConfigError(
                f"{key}.directory={directory!r}: set it to the directory the files go to, "
                "e.g. directory = \"/var/lib/aggregator/events\"")
        keep = options.get("keep", 48)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise exceptions.ConfigError(f"{key}.keep={keep!r} must be a whole number of files, at least 1")
        prefix = options.get("prefix", "aggregator")
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise exceptions.ConfigError(
                f"{key}.prefix={prefix!r} must be letters, digits, '_', '.' or '-', not starting with '.' or '-'")
        fsync = options.get("fsync", True)
        if not isinstance(fsync, bool):
            raise exceptions.ConfigError(f"{key}.fsync={fsync!r} must be true or false")
        return cls(
            name,
            directory=Path(directory).expanduser(),
            max_bytes=parse_size(options.get("max_bytes", DEFAULT_MAX_BYTES), key=f"{key}.max_bytes"),
            max_age=units.parse_duration(options.get("max_age", "1h"), key=f"{key}.max_age"),
            keep=keep,
            prefix=prefix,
            fsync=fsync,
        )

    async def open(self) -> None:
        await asyncio.to_thread(self._prepare_directory)

    async def send(self, batch: Sequence[Envelope]) -> list[Outcome]:
        return await asyncio.to_thread(self._send, batch)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    # Everything below runs in a worker thread.

    def _prepare_directory(self) -> None:
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True, mode=DIRECTORY_MODE)
                os.chmod(self.directory, DIRECTORY_MODE)  # mkdir's mode is masked by the umask
            # A probe file, because os.access() says yes to root even on a read-only mount.
            probe = self.directory / f".{self.prefix}-probe-{os.getpid()}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE))
            probe.unlink()
        except OSError as exc:
            raise exceptions.ConfigError(
                f"writers.{self.name}.directory={str(self.directory)!r} cannot be created or written "
                f"({_describe(exc)}); point it at a writable directory") from exc

    def _send(self, batch: Sequence[Envelope]) -> list[Outcome]:
        outcomes: list[Outcome | None] = []
        lines: list[bytes] = []
        for envelope in batch:
            try:
                line = json.dumps(envelope.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as exc:
                # Retrying cannot make it serializable: dead-letter this one, write the rest.
                outcomes.append(Outcome.rejected(f"not representable as JSON: {exc}"))
                continue
            outcomes.append(None)
            lines.append(line.encode() + b"\n")
        if lines:
            with self._lock:
                try:
                    self._write(lines)
                except OSError as exc:
                    error = f"jsonl writer {self.name}: {_describe(exc)}; the batch was not written"
                    return [o or Outcome.retry(error) for o in outcomes]
        return [o or Outcome.delivered() for o in outcomes]

    def _write(self, lines: list[bytes]) -> None:
        start = self._file
        start_size = start.size if start is not None else 0
        created: list[_File] = []
        buffer = bytearray()
        try:
            for line in lines:
                if self._must_rotate(len(buffer), len(line)):
                    if buffer:
                        self._flush(buffer)
                        buffer.clear()
                    # The previous file stays open until the batch is durable, so an error can cut it back.
                    self._file = self._create()
                    created.append(self._file)
                buffer += line
            self._flush(buffer)
        except OSError as exc:
            self._roll_back(start, start_size, created, exc)
            raise
        for file in [start, *created]:
            if file is not None and file is not self._file:
                _close_quietly(file)
        if created:
            self._retain()

    def _must_rotate(self, buffered: int, line: int) -> bool:
        file = self._file
        if file is None or self._clock() - file.opened_at >= self.max_age:
            return True
        used = file.size + buffered
        # An empty file takes any line: one longer than max_bytes goes whole into a file of its own.
        return used > 0 and used + line > self.max_bytes

    def _flush(self, buffer: bytearray) -> None:
        file = self._file
        assert file is not None
        try:
            with memoryview(buffer) as data:
                done = 0
                while done < len(data):  # write(2) may write less than asked (a disk filling up)
                    written = os.write(file.fd, data[done:])
                    file.size += written
                    done += written
            if self.fsync:
                os.fsync(file.fd)
        except OSError as exc:
            exc.filename = exc.filename or str(file.path)  # write(2) errors name no file; the message should
            raise

    def _create(self) -> _File:
        # Strictly increasing microseconds: two rotations in one clock tick still get distinct, ordered names.
        micros = max(int(self._clock() * 1_000_000), self._last_micros + 1)
        for _attempt in range(100):
            stamp = (_EPOCH + dt.timedelta(microseconds=micros)).strftime("%Y%m%dT%H%M%S.%fZ")
            path = self.directory / f"{self.prefix}-{stamp}-{os.getpid()}.jsonl"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
            except FileExistsError:
                micros += 1  # left by an earlier process with our pid (pid reuse); never append to it
                continue
            break
        else:
            raise OSError(errno.EEXIST, "no free file name", str(path))
        self._last_micros = micros
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits off the mode given to open()
            if self.fsync:
                _fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        log.info("jsonl_file_opened", writer=self.name, path=str(path))
        return _File(fd, path, 0, self._clock())

    def _roll_back(self, start: _File | None, start_size: int, created: list[_File], exc: OSError) -> None:
        """Undo a failed batch: drop the files it created and cut the file it started in back to its old size.

        The cut file stays current when the cut worked (appending resumes at a line boundary); if even the
        cut fails, it is abandoned and the next write starts a new file, so nothing is appended after the
        half line it may end with.
        """
        for file in created:
            _close_quietly(file)
            try:
                file.path.unlink()
            except OSError as unlink_exc:
                log.warning("jsonl_unlink_failed", writer=self.name, path=str(file.path), error=_describe(unlink_exc))
        self._file = start
        if start is not None:
            # Unconditionally: a failed write(2) may still have put bytes in the file that ``size`` never saw.
            try:
                os.ftruncate(start.fd, start_size)
                start.size = start_size
            except OSError as cut_exc:
                log.error("jsonl_truncate_failed", writer=self.name, path=str(start.path), size=start_size,
                          error=_describe(cut_exc))
                _close_quietly(start)
                self._file = None
        log.warning("jsonl_batch_failed", writer=self.name, error=_describe(exc),
                    path=str(start.path) if start is not None else None, truncated_to=start_size,
                    removed=[str(f.path) for f in created])

    def _retain(self) -> None:
        try:
            names = sorted(n for n in os.listdir(self.directory) if self._pattern.match(n))
        except OSError as exc:
            log.warning("jsonl_retention_failed", writer=self.name, error=_describe(exc))
            return
        current = self._file.path.name if self._file is not None else None
        for name in names[: max(len(names) - self.keep, 0)]:
            if name == current:
                continue
            try:
                (self.directory / name).unlink()
            except FileNotFoundError:
                pass  # another process sharing the directory removed it first
            except OSError as exc:
                log.warning("jsonl_retention_failed", writer=self.name, path=name, error=_describe(exc))
            else:
                log.info("jsonl_file_removed", writer=self.name, path=str(self.directory / name))

    def _close(self) -> None:
        with self._lock:
            if self._file is not None:
                _close_quietly(self._file)
                self._file = None


def _fsync_directory(directory: Path) -> None:
    # A new file's directory entry is durable only once the directory itself is synced.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_quietly(file: _File) -> None:
    try:
        os.close(file.fd)
    except OSError as exc:
        log.warning("jsonl_close_failed", path=str(file.path), error=_describe(exc))


def _describe(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    where = f" on {exc.filename}" if exc.filename else ""
    return f"{code} ({exc.strerror or exc}){where}"


__all__ = ["DEFAULT_MAX_BYTES", "JsonlWriter", "parse_size"]
