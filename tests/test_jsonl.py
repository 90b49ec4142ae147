"""The jsonl writer: line format, rotation by size and age, retention, file modes, config and I/O errors."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from aggregator import ConfigError, iglu, writers
from aggregator.writers import Envelope, Outcome, jsonl
from tests.helpers import T0, FakeClock
from tests.test_snowplow import USAGE_REPORT_1_0_0, old_report_data, report_data

SCHEMA = iglu.USAGE_REPORT
NAME = re.compile(r"^aggregator-\d{8}T\d{6}\.\d{6}Z-\d+\.jsonl$")


def envelope(i: int, pad: int = 0, **data: Any) -> Envelope:
    return Envelope(event_id=uuid.UUID(int=i + 1), kind="usage_report", schema=SCHEMA, occurred_at=T0,
                    data={"n": i, "pad": "x" * pad, **data})


def writer(directory: Path, **options: Any) -> jsonl.JsonlWriter:
    return jsonl.JsonlWriter.from_config("files", {"directory": str(directory), **options})


def clocked(directory: Path, clock: FakeClock, **kwargs: Any) -> jsonl.JsonlWriter:
    """A writer on a fake clock (a constructor argument: configuration cannot carry one)."""
    return jsonl.JsonlWriter("files", directory=directory, clock=clock, **kwargs)


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if NAME.match(p.name))


def lines(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_each_envelope_is_one_compact_sorted_json_line(tmp_path: Path) -> None:
    """A line is the envelope's dict, keys sorted, no spaces; batches append in order."""
    w = writer(tmp_path / "out")
    await w.open()
    assert [Outcome.delivered()] * 2 == await w.send([envelope(0), envelope(1)])
    assert [Outcome.delivered()] == await w.send([envelope(2)])
    await w.close()
    (path,) = files(tmp_path / "out")
    expected = "".join(
        json.dumps(envelope(i).to_dict(), sort_keys=True, separators=(",", ":")) + "\n" for i in range(3))
    assert expected == path.read_text()
    assert [str(uuid.UUID(int=i + 1)) for i in range(3)] == [line["event_id"] for line in lines([path])]


async def test_build_uses_defaults(tmp_path: Path) -> None:
    """``[writers.jsonl]`` with only a directory gets the documented defaults."""
    w = writers.build("jsonl", {"directory": str(tmp_path)})
    assert isinstance(w, jsonl.JsonlWriter)
    expected = (64 * 1024**2, 3600.0, 48, "aggregator", True)
    assert expected == (w.max_bytes, w.max_age, w.keep, w.prefix, w.fsync)


async def test_size_rotation_keeps_every_file_under_max_bytes(tmp_path: Path) -> None:
    """Many envelopes with a small max_bytes spread over several files, none above the limit, none lost."""
    w = writer(tmp_path, max_bytes=1000, keep=100, fsync=False)
    await w.open()
    for start in range(0, 60, 7):
        await w.send([envelope(i) for i in range(start, min(start + 7, 60))])
    await w.close()
    paths = files(tmp_path)
    assert len(paths) > 3
    assert [p.name for p in paths if p.stat().st_size > 1000] == []
    assert list(range(60)) == [line["data"]["n"] for line in lines(paths)]


async def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    """A single line over the limit is written whole rather than refused or split."""
    w = writer(tmp_path, max_bytes=200)
    await w.open()
    await w.send([envelope(0), envelope(1, pad=500), envelope(2)])
    await w.close()
    assert [[line["data"]["n"] for line in lines([p])] for p in files(tmp_path)] == [[0], [1], [2]]


async def test_age_rotation_follows_the_injected_clock(tmp_path: Path) -> None:
    """A file older than max_age is closed at the next write; a younger one is kept."""
    clock = FakeClock(T0)
    w = clocked(tmp_path, clock, max_age=600.0)
    await w.open()
    await w.send([envelope(0)])
    clock.t += 599
    await w.send([envelope(1)])
    clock.t += 1  # now exactly 10 minutes after the first file was opened
    await w.send([envelope(2)])
    await w.close()
    assert [[line["data"]["n"] for line in lines([p])] for p in files(tmp_path)] == [[0, 1], [2]]


async def test_a_restarted_writer_starts_a_new_file(tmp_path: Path) -> None:
    """A new writer never appends to an existing file, not even its own predecessor's."""
    for i in range(2):
        w = writer(tmp_path)
        await w.open()
        await w.send([envelope(i)])
        await w.close()
    assert [[line["data"]["n"] for line in lines([p])] for p in files(tmp_path)] == [[0], [1]]


async def test_names_are_utc_creation_times_in_sortable_order(tmp_path: Path) -> None:
    """Name order is creation order, the stamp is the clock's UTC time, even within one clock tick."""
    clock = FakeClock(T0 + 0.25)
    w = clocked(tmp_path, clock, max_bytes=10, keep=10)
    await w.open()
    await w.send([envelope(i) for i in range(3)])  # three files in the same instant
    await w.close()
    pid = os.getpid()
    expected = [f"aggregator-20270115T080000.2500{i:02d}Z-{pid}.jsonl" for i in range(3)]
    assert expected == [p.name for p in files(tmp_path)]
    assert [line["data"]["n"] for line in lines(files(tmp_path))] == [0, 1, 2]


async def test_retention_keeps_the_newest_files_of_its_own_prefix(tmp_path: Path) -> None:
    """After a rotation only ``keep`` files of the prefix remain (any pid), oldest deleted; others untouched."""
    (tmp_path / "aggregator-20200101T000000.000000Z-1.jsonl").write_text("{}\n")  # another process, older
    foreign = ["other-20200101T000000.000000Z-1.jsonl", "aggregator-notes.txt", "aggregator-x-1.jsonl"]
    for name in foreign:
        (tmp_path / name).write_text("keep me\n")
    clock = FakeClock(T0)
    w = clocked(tmp_path, clock, max_age=1.0, keep=3)
    await w.open()
    for i in range(6):
        await w.send([envelope(i)])
        clock.t += 1
    await w.close()
    assert [[line["data"]["n"] for line in lines([p])] for p in files(tmp_path)] == [[3], [4], [5]]
    assert sorted(foreign) == sorted(p.name for p in tmp_path.iterdir() if not NAME.match(p.name))


async def test_files_are_0640_and_a_new_directory_0750_whatever_the_umask(tmp_path: Path,
                                                                        umask_zero: None) -> None:
    """Modes come from the writer, not from the process umask."""
    w = writer(tmp_path / "a" / "b")
    await w.open()
    await w.send([envelope(0)])
    await w.close()
    (path,) = files(tmp_path / "a" / "b")
    assert (stat.S_IMODE(path.stat().st_mode), stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode)) == (0o640, 0o750)


@pytest.mark.parametrize(("value", "expected"), [
    (4096, 4096), ("500KB", 500_000), ("10MB", 10_000_000), ("64MiB", 64 * 1024**2), ("1GiB", 1024**3),
    ("2048", 2048), ("12 kib", 12 * 1024),
])
def test_max_bytes_accepts_bytes_and_units(tmp_path: Path, value: object, expected: int) -> None:
    """max_bytes is an int, or a number with a decimal (KB, MB) or binary (KiB, MiB, GiB) unit."""
    assert expected == writer(tmp_path, max_bytes=value).max_bytes


@pytest.mark.parametrize(("options", "message"), [
    ({"directoy": "/x"}, "unknown key(s) directoy"),
    ({"max_bytes": "64 megs"}, "writers.files.max_bytes='64 megs' is not a size"),
    ({"max_bytes": 0}, "writers.files.max_bytes=0 must be more than zero"),
    ({"max_bytes": True}, "writers.files.max_bytes=True is not a size"),
    ({"max_bytes": 1.5}, "writers.files.max_bytes=1.5 is not a size"),
    ({"keep": 0}, "writers.files.keep=0 must be"),
    ({"keep": "3"}, "writers.files.keep='3' must be"),
    ({"max_age": "soon"}, "writers.files.max_age='soon' is not a duration"),
    ({"prefix": "../up"}, "writers.files.prefix='../up' must be"),
    ({"fsync": "yes"}, "writers.files.fsync='yes' must be true or false"),
])
def test_bad_options_name_the_key_and_value(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    """Each bad setting is a ConfigError naming writers.NAME.KEY and the value."""
    with pytest.raises(ConfigError) as caught:
        jsonl.JsonlWriter.from_config("files", {"directory": str(tmp_path), **options})
    assert message in str(caught.value)


def test_directory_is_required() -> None:
    """Without a directory there is nowhere to write."""
    with pytest.raises(ConfigError, match=r"writers\.files\.directory=None: set it"):
        jsonl.JsonlWriter.from_config("files", {})


async def test_a_directory_that_cannot_be_created_fails_open(tmp_path: Path) -> None:
    """A path under a regular file fails at open() with a ConfigError naming the path (root-proof)."""
    (tmp_path / "plain").write_text("")
    w = writer(tmp_path / "plain" / "events")
    with pytest.raises(ConfigError) as caught:
        await w.open()
    assert f"writers.files.directory='{tmp_path / 'plain' / 'events'}' cannot be created or written" in str(
        caught.value)


async def test_failed_rotation_rolls_the_batch_back(tmp_path: Path) -> None:
    """A batch that fails halfway (its rotation cannot create a file) is retried whole and leaves no trace.

    Root ignores permissions, so the directory is swapped for a regular file: the open file keeps
    working, the next file cannot be created (ENOTDIR).
    """
    directory = tmp_path / "out"
    w = writer(directory, max_bytes=300)
    await w.open()
    await w.send([envelope(0)])
    (first,) = files(directory)
    before = first.read_bytes()
    directory.rename(tmp_path / "moved")
    directory.write_text("not a directory")

    outcomes = await w.send([envelope(i) for i in range(1, 8)])  # the first lines fit, then it must rotate

    assert {"retry"} == {o.status for o in outcomes}
    assert outcomes[0].error is not None and "ENOTDIR" in outcomes[0].error and str(directory) in outcomes[0].error
    assert [before] == [p.read_bytes() for p in files(tmp_path / "moved")]
    directory.unlink()
    (tmp_path / "moved").rename(directory)
    assert [Outcome.delivered()] * 7 == await w.send([envelope(i) for i in range(1, 8)])
    await w.close()
    assert list(range(8)) == [line["data"]["n"] for line in lines(files(directory))]


async def test_a_short_write_then_error_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full after half a batch: the file is cut back to its last whole line and the batch is retried.

    A real ENOSPC needs a full file system; os.write is replaced, for this one send() only, by one that
    writes half the bytes and then fails as a full disk does.
    """
    w = writer(tmp_path)
    await w.open()
    await w.send([envelope(0)])
    (path,) = files(tmp_path)
    before = path.read_bytes()
    real_write = os.write
    calls = 0

    def half_then_full(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:  # a short write, as write(2) does when the disk fills up mid-buffer
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    outcomes = await w.send([envelope(1), envelope(2)])
    monkeypatch.undo()

    assert calls == 2
    expected_error = f"jsonl writer files: ENOSPC (No space left on device) on {path}; the batch was not written"
    assert [Outcome.retry(expected_error)] * 2 == outcomes
    assert before == path.read_bytes()
    assert [Outcome.delivered()] * 2 == await w.send([envelope(1), envelope(2)])
    await w.close()
    assert [line["data"]["n"] for line in lines([path])] == [0, 1, 2]


async def test_an_envelope_that_is_not_json_is_rejected_alone(tmp_path: Path) -> None:
    """Retrying cannot fix unserializable data: that envelope is rejected, the rest of the batch delivered."""
    w = writer(tmp_path)
    await w.open()
    outcomes = await w.send([envelope(0), envelope(1, bad=object()), envelope(2, ratio=float("nan"))])
    await w.close()
    assert [o.status for o in outcomes] == ["delivered", "rejected", "rejected"]
    assert [line["data"]["n"] for line in lines(files(tmp_path))] == [0]


async def test_report_lines_validate_against_the_schema_they_name(tmp_path: Path) -> None:
    """A report line names usage_report 1-0-1 and carries replicas_missing; an item queued as 1-0-0 keeps
    its schema and payload. Each line's data is valid under the schema the line names."""
    current = Envelope(event_id=uuid.UUID(int=1), kind="usage_report", schema=iglu.USAGE_REPORT, occurred_at=T0,
                       data=report_data(1, replicas_missing=2))
    queued_before = Envelope(event_id=uuid.UUID(int=2), kind="usage_report", schema=USAGE_REPORT_1_0_0,
                             occurred_at=T0, data=old_report_data(2))
    w = writer(tmp_path)
    await w.open()
    assert [Outcome.delivered()] * 2 == await w.send([current, queued_before])
    await w.close()
    written = lines(files(tmp_path))
    expected = [("iglu:dev.aggregator/usage_report/jsonschema/1-0-1", 2), (USAGE_REPORT_1_0_0, None)]
    assert expected == [(line["schema"], line["data"].get("replicas_missing")) for line in written]
    for line in written:
        jsonschema.Draft4Validator(iglu.load(line["schema"])).validate(line["data"])
