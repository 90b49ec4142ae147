"""CSV export for a warehouse COPY: incremental by id, idempotent, optionally uploaded to S3.

Two kinds: usage reports (``usage_report``) and billable usage events (``billable_usage``). A file holds
the rows of one kind with ``since < id <= until``. Both ids follow commit order (the collector lock),
so once ``until`` is visible that set never changes: the same range always gives the same bytes under
the same name, and uploading it again overwrites the same object with the same content. That holds for
one set of columns. Columns added later go at the end (``replicas_missing``, after ``generated_by``):
readers by header name or by position of the old columns keep working, a strict COPY needs the column
added to its table first, and a range exported before the upgrade gives longer rows if exported again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from aggregator import billing, exceptions, logs, privacy, reports, store

log = logs.get_logger("aggregator.export")

FILE_MODE = 0o640
PAGE_SIZE = 1000
KIND = "usage_report"


@dataclasses.dataclass(frozen=True, slots=True)
class _Kind:
    """How one kind of row is read, named and written."""

    file_prefix: str
    noun: str  # in messages: "report id", "exported 2 report(s)"
    columns: tuple[str, ...]
    fetch: Callable[[store.Store, int, int], Awaitable[list[dict[str, Any]]]]  # (store, after_id, limit)
    values: Callable[[Mapping[str, Any], privacy.Pseudonymizer], list[object]]  # one row's cells, in column order


def _report_values(row: Mapping[str, Any], pseudonymizer: privacy.Pseudonymizer) -> list[object]:
    data = pseudonymizer.apply(KIND, reports.Report.from_row(row).to_dict())
    return [data[name] for name in reports.FIELDS]


def _billable_values(row: Mapping[str, Any], pseudonymizer: privacy.Pseudonymizer) -> list[object]:
    data = pseudonymizer.apply(billing.KIND, json.loads(row["payload"]))
    # One cell for the nested metadata; sorted and compact so the same event always gives the same bytes.
    data["metadata"] = json.dumps(data["metadata"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return [data.get(name) for name in billing.FIELDS]


KINDS: dict[str, _Kind] = {
    KIND: _Kind("usage_reports", "report", tuple(reports.FIELDS),
                lambda db, after, limit: db.reports(after_id=after, limit=limit), _report_values),
    billing.KIND: _Kind(billing.KIND, "billable event", billing.FIELDS,
                        lambda db, after, limit: db.billable_events(after_id=after, limit=limit), _billable_values),
}


@dataclasses.dataclass(frozen=True, slots=True)
class ExportResult:
    """What one export wrote; ``next_cursor`` is the ``since`` of the next incremental run."""

    path: Path | None  # None when no row lies after the cursor
    rows: int
    first_id: int | None
    last_id: int | None
    next_cursor: int
    s3_key: str | None = None
    kind: str = KIND


def file_name(since: int, until: int, kind: str = KIND) -> str:
    """The export file's name for the id range ``(since, until]``; zero-padded so names sort by range."""
    return f"{_kind(kind).file_prefix}-{since:012d}-{until:012d}.csv"


def summary(result: ExportResult) -> str:
    """One line for the CLI."""
    noun = _kind(result.kind).noun
    if result.path is None:
        return f"no {noun}s after cursor {result.next_cursor}; next cursor {result.next_cursor}"
    uploaded = f", uploaded as {result.s3_key}" if result.s3_key else ""
    return (f"exported {result.rows} {noun}(s), ids {result.first_id}..{result.last_id}, to {result.path}"
            f"{uploaded}; next cursor {result.next_cursor}")


async def export_csv(store: store.Store, pseudonymizer: privacy.Pseudonymizer, *, since: int, out_dir: Path,
                     until: int | None = None, s3_url: str | None = None,
                     s3_endpoint_url: str | None = None, kind: str = KIND) -> ExportResult:
    """Write the rows of ``kind`` with ``since < id <= until`` (default: up to the newest) to a CSV file in ``out_dir``.

    ``kind`` is ``usage_report`` (reports, by report id) or ``billable_usage`` (billable events, by their
    row id). Raises InvalidInput for a bad range or an ``until`` that is not yet visible (a later run
    could then find more rows in the range), ConfigError for an unknown kind, a bad S3 URL or a missing
    pseudonym key, and AggregatorError if the upload fails (the local file is kept; re-running uploads it).
    """
    spec = _kind(kind)
    _check_range(since, until, spec.noun)
    pseudonymizer.require([kind], "aggregator export")
    target = _parse_s3_url(s3_url) if s3_url is not None else None
    if s3_endpoint_url is not None and target is None:
        raise exceptions.ConfigError(
            f"s3_endpoint_url={s3_endpoint_url!r} is set but there is no s3 URL; add --s3 s3://bucket/prefix")
    if target is not None:
        _import_boto3()  # fail before the export, not after it

    first_id: int | None = None
    last_id: int | None = None
    count = 0
    with _AtomicFile(out_dir, spec.file_prefix) as out:
        async with contextlib.aclosing(_pages(store, spec, since, until)) as pages:
            async for rows in pages:
                header = first_id is None
                first_id = rows[0]["id"] if first_id is None else first_id
                last_id, count = rows[-1]["id"], count + len(rows)
                await asyncio.to_thread(out.write, _encode(spec, rows, pseudonymizer, header=header))
        if last_id is None:
            return ExportResult(path=None, rows=0, first_id=None, last_id=None, next_cursor=since, kind=kind)
        path = out_dir / file_name(since, until if until is not None else last_id, kind)
        await asyncio.to_thread(out.commit, path)
    log.info("export_written", kind=kind, path=str(path), rows=count, first_id=first_id, last_id=last_id)

    s3_key = None
    if target is not None:
        bucket, prefix = target
        s3_key = f"{prefix}/{path.name}" if prefix else path.name
        await asyncio.to_thread(_upload, path, bucket, s3_key, s3_endpoint_url)
        log.info("export_uploaded", bucket=bucket, key=s3_key)
    return ExportResult(path=path, rows=count, first_id=first_id, last_id=last_id, next_cursor=last_id,
                        s3_key=s3_key, kind=kind)


def _kind(kind: str) -> _Kind:
    spec = KINDS.get(kind)
    if spec is None:
        raise exceptions.ConfigError(f"kind={kind!r} cannot be exported; use one of: {', '.join(sorted(KINDS))}")
    return spec


def _check_range(since: object, until: object, noun: str) -> None:
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise exceptions.InvalidInput(f"since={since!r} must be a {noun} id ≥ 0 (0 exports from the start)")
    if until is not None and (isinstance(until, bool) or not isinstance(until, int) or until < since):
        raise exceptions.InvalidInput(f"until={until!r} must be a {noun} id ≥ since ({since}), or omitted")


async def _pages(store: store.Store, spec: _Kind, since: int,
                 until: int | None) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Rows after ``since`` (up to ``until``) in id order, a page at a time.

    Pages are read without an upper bound: seeing an id beyond ``until`` is what proves that ``until``
    is visible (ids have gaps, so the row ``until`` itself may never exist).
    """
    cursor = since
    while until is None or cursor < until:
        page = await spec.fetch(store, cursor, PAGE_SIZE)
        rows = [row for row in page if until is None or row["id"] <= until]
        if rows:
            yield rows
        if page:
            cursor = page[-1]["id"]
        if len(page) < PAGE_SIZE:
            break
    if until is not None and cursor < until:
        # A row with an id up to ``until`` may still commit: a later run could find more in the range.
        newest = f"the newest is {cursor}" if cursor > since else f"none is newer than {since}"
        raise exceptions.InvalidInput(
            f"until={until} is beyond the newest {spec.noun} id ({newest}), so the file would not be "
            "reproducible; omit --until, or pass an id that exists")


def _encode(spec: _Kind, rows: Iterable[Mapping[str, Any]], pseudonymizer: privacy.Pseudonymizer, *,
            header: bool) -> str:
    lines = [_line(spec.columns)] if header else []
    lines.extend(_line(spec.values(row, pseudonymizer)) for row in rows)
    return "".join(lines)


def _line(values: Iterable[object]) -> str:
    """One RFC 4180 record. Written by hand: the csv module leaves a lone CR unquoted when lines end in LF."""
    return ",".join(_cell(value) for value in values) + "\n"


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


class _AtomicFile:
    """A temporary file in the target directory that becomes ``path`` on commit() and vanishes otherwise."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self._file: IO[bytes] | None = None
        self._temp: Path | None = None

    def __enter__(self) -> _AtomicFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._file is not None:
            self._file.close()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)

    def write(self, text: str) -> None:
        if self._file is None:
            self._open()
        assert self._file is not None and self._temp is not None
        try:
            self._file.write(text.encode())
        except OSError as exc:
            raise exceptions.AggregatorError(f"writing {self._temp} failed: {exc}; nothing was exported") from exc

    def _open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.directory, prefix=f".{self.prefix}-", suffix=".tmp")
        except OSError as exc:
            raise exceptions.ConfigError(
                f"out_dir={str(self.directory)!r} cannot be created or written ({exc}); "
                "choose a writable directory") from exc
        self._temp = Path(name)
        self._file = os.fdopen(fd, "wb")
        os.fchmod(fd, FILE_MODE)  # mkstemp makes it 0600: the warehouse loader usually reads by group

    def commit(self, path: Path) -> None:
        assert self._file is not None and self._temp is not None
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._temp, path)
            self._temp = None
            with _directory_fd(self.directory) as fd:
                os.fsync(fd)  # makes the rename itself durable
        except OSError as exc:
            raise exceptions.AggregatorError(f"writing {path} failed: {exc}; re-run the same export") from exc


@contextlib.contextmanager
def _directory_fd(directory: Path) -> Iterator[int]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _parse_s3_url(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise exceptions.ConfigError(f"s3 URL {url!r} is not of the form s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise exceptions.ConfigError(
            "uploading to S3 needs boto3, which is not installed; run pip install 'aggregator[s3]'") from exc
    return boto3


def _upload(path: Path, bucket: str, key: str, endpoint_url: str | None) -> None:
    boto3 = _import_boto3()
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as body:
        for chunk in iter(lambda: body.read(1 << 20), b""):
            digest.update(chunk)
    # S3-compatible stores (MinIO and the like) are usually addressed by path, not by bucket host name.
    client_config = Config(s3={"addressing_style": "path"}) if endpoint_url else None
    client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=client_config)
    try:
        with path.open("rb") as body:
            # Content-MD5 lets the server refuse a body that changed on the way.
            client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="text/csv; charset=utf-8",
                              ContentMD5=base64.b64encode(digest.digest()).decode())
    except (BotoCoreError, ClientError) as exc:
        raise exceptions.AggregatorError(
            f"uploading {path} to s3://{bucket}/{key} failed: {exc}; the local file is kept, "
            "re-run the same export to upload it again") from exc
    finally:
        client.close()


__all__ = ["KINDS", "ExportResult", "export_csv", "file_name", "summary"]
