"""The local spool: batches round-trip exactly, stay in order and on disk, and pass to the next replica.

Ownership is tested across real processes: a live holder (even a forked child of one) keeps its file,
and a holder killed with SIGKILL leaves it adoptable.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from structlog.testing import capture_logs

from aggregator import experiences, meters, spool, store

WRITER = uuid.UUID("3f2b8c1e-4d5a-4b6c-9e7f-0a1b2c3d4e5f")
HOLD = """
import os, sys, time, uuid
from aggregator import spool, store
box = spool.Spool.create(sys.argv[1], uuid.UUID(sys.argv[2]), "child")
box.append(store.Batch(seq=7, windows={60: store.BatchWindow([1], [2, 3], 4, 5)}, events=9))
if sys.argv[3] == "exit":
    os._exit(0)  # no close(): the file stays, its lock goes with the process
if sys.argv[3] == "fork" and os.fork() == 0:
    print(os.getpid(), flush=True)  # the child speaks: its at-fork hooks have run
    time.sleep(600)
    os._exit(0)
if sys.argv[3] == "hold":
    print(0, flush=True)
time.sleep(600)
"""


def full_batch(seq: int = 41) -> store.Batch:
    """A batch with every field set, including text SQLite and JSON would mangle (a lone surrogate)."""
    metered = meters.MeterBatch()
    metered.groups[(1_800_000_000, "tokens", '{"model":"x"}')] = meters.GroupData(
        {"model": "x"}, quantity=2**70, records=3, distinct={uuid.UUID(int=5), uuid.UUID(int=2**128 - 1)})
    metered.groups[(1_800_000_060, "calls", "{}")] = meters.GroupData({}, quantity=0, records=0)
    metered.identified[("tokens", "evt-1")] = meters.Identified(
        "evt-1", "tokens", 1_800_000_000, '{"model":"é\ud800"}', {"model": "é\ud800"}, 17, uuid.UUID(int=9))
    metered.identified[("calls", "evt-2")] = meters.Identified("evt-2", "calls", -60, "{}", {}, 1, None)
    checkpoints = [
        experiences.Checkpoint("01J9Z3K8Q6W5N2B7R4T1V0X9YC", "checkout", "end", "web", "payments", "sync_fast",
                               1_800_000_000.25, 1_800_000_001.5, "card", "failure", '{"step":2}'),
        experiences.Checkpoint("01J9Z3K8Q6W5N2B7R4T1V0X9YD", "checkout", "start", "web", "payments", "sync_fast",
                               -0.5, 1e-300),
    ]
    windows = {
        1_800_000_000: store.BatchWindow([0, 2**128 - 1, WRITER.int], [12345], allowed=2**40, denied=7),
        1_799_998_200: store.BatchWindow([], [], allowed=0, denied=-1),
    }
    return store.Batch(seq=seq, windows=windows, events=123, meters=metered, checkpoints=checkpoints,
                       watermark=1_800_000_059.123456, final=True)


def small_batch(seq: int) -> store.Batch:
    return store.Batch(seq=seq, windows={60: store.BatchWindow([seq], [seq + 1], seq, 0)}, events=seq)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[spool.Spool]:
    created = spool.Spool.create(tmp_path / "spool", WRITER, "replica-a")
    yield created
    created.close(delete_if_empty=False)


def file_modes(folder: Path) -> dict[str, str]:
    return {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in sorted(folder.iterdir())}


def start_holder(folder: Path, writer_id: uuid.UUID, how: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(writer_id), how],
                            stdout=subprocess.PIPE, text=True)


# Encoding


def test_every_field_round_trips_exactly() -> None:
    """A batch with every field populated decodes to an equal batch, field by field."""
    batch = full_batch()
    assert batch == spool.decode(spool.encode(batch))


def test_the_codec_covers_every_field() -> None:
    """A new field in a batch's dataclasses needs a new FORMAT: this lists the fields FORMAT 1 writes."""
    covered = {
        store.Batch: {"seq", "windows", "events", "meters", "checkpoints", "watermark", "final"},
        store.BatchWindow: {"workspaces", "users", "allowed", "denied"},
        meters.MeterBatch: {"groups", "identified"},
        meters.GroupData: {"dimensions", "quantity", "records", "distinct"},
        meters.Identified: {"event_id", "meter", "window_start", "group", "dimensions", "quantity", "distinct"},
        experiences.Checkpoint: {"correlation_id", "experience_id", "checkpoint", "type", "feature_category",
                                 "urgency", "client_timestamp", "received_at", "checkpoint_category", "outcome",
                                 "meta"},
    }
    assert covered == {kind: {field.name for field in dataclasses.fields(kind)} for kind in covered}


def test_no_meters_and_an_empty_meter_batch_stay_apart() -> None:
    """``meters=None`` and an empty MeterBatch, and a missing watermark, come back as they were."""
    bare = store.Batch(seq=1, windows={}, events=0)
    empty = store.Batch(seq=1, windows={}, events=0, meters=meters.MeterBatch(), watermark=None)
    assert (bare, empty) == (spool.decode(spool.encode(bare)), spool.decode(spool.encode(empty)))


def test_ids_take_16_bytes_each() -> None:
    """An id is 16 bytes of payload; the window around 10,000 of them adds a few bytes only."""
    ids = [uuid.uuid4().int for _ in range(10_000)]
    empty = store.Batch(seq=1, windows={60: store.BatchWindow([], [], 0, 0)}, events=0)
    full = store.Batch(seq=1, windows={60: store.BatchWindow(ids[:1_000], ids[1_000:], 0, 0)}, events=0)
    expected = 16 * 10_000 + 2  # and two counts grow from 1 byte to 2
    assert expected == len(spool.encode(full)) - len(spool.encode(empty))


def test_unknown_version_names_the_source_and_the_fix() -> None:
    """A payload of another format version is refused with a message saying what to run."""
    body = spool.encode(small_batch(1))[5:]
    payload = bytes([9]) + zlib.crc32(body, zlib.crc32(bytes([9]))).to_bytes(4, "big") + body
    with pytest.raises(spool.SpoolVersionError) as raised:
        spool.decode(payload, source="spool file /x/a.spool, batch 1")
    expected = ("spool file /x/a.spool, batch 1 is in format version 9, and this version of aggregator reads "
                "version 1 only: it was written by another version of aggregator; run that version (or a newer "
                "one) on this host to replay it, then this one")
    assert expected == str(raised.value)


@pytest.mark.parametrize("damage", ["flip", "version", "truncate", "empty"])
def test_a_damaged_payload_is_refused_as_corrupt(damage: str) -> None:
    """A flipped bit (in the version byte too), a cut payload or an empty one raises SpoolCorrupt, never a
    wrong batch or a version error."""
    payload = bytearray(spool.encode(full_batch()))
    if damage in ("flip", "version"):
        payload[40 if damage == "flip" else 0] ^= 0x10
    damaged = bytes(payload[:-3] if damage == "truncate" else b"" if damage == "empty" else payload)
    with pytest.raises(spool.SpoolCorrupt) as raised:
        spool.decode(damaged, source="spool file /x/a.spool, batch 41")
    assert str(raised.value).startswith("spool file /x/a.spool, batch 41 is ")


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis caches what it scans in a `.hypothesis` directory even with no example database: keep it in tmp."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


PROPERTY = hypothesis.settings(max_examples=100, derandomize=True, database=None, deadline=None, print_blob=False)
numbers = st.integers(min_value=-(2**80), max_value=2**80)
texts = st.text(max_size=12)
times = st.floats(allow_nan=False)  # NaN is kept bit for bit, but is not equal to itself
id_lists = st.lists(st.integers(min_value=0, max_value=2**128 - 1), max_size=8)
dimensions = st.dictionaries(texts, texts, max_size=3)
meter_batches = st.builds(
    meters.MeterBatch,
    groups=st.dictionaries(st.tuples(numbers, texts, texts), st.builds(
        meters.GroupData, dimensions=dimensions, quantity=numbers, records=numbers,
        distinct=st.sets(st.uuids(version=None), max_size=4)), max_size=3),
    identified=st.dictionaries(st.tuples(texts, texts), st.builds(
        meters.Identified, event_id=texts, meter=texts, window_start=numbers, group=texts, dimensions=dimensions,
        quantity=numbers, distinct=st.none() | st.uuids(version=None)), max_size=3),
)
checkpoints = st.builds(
    experiences.Checkpoint, **dict.fromkeys(("correlation_id", "experience_id", "checkpoint", "type",
                                             "feature_category", "urgency", "checkpoint_category"), texts),
    client_timestamp=times, received_at=times, outcome=st.none() | texts, meta=st.none() | texts)
batches = st.builds(
    store.Batch, seq=numbers, events=numbers, final=st.booleans(), watermark=st.none() | times,
    windows=st.dictionaries(numbers, st.builds(store.BatchWindow, workspaces=id_lists, users=id_lists,
                                               allowed=numbers, denied=numbers), max_size=3),
    meters=st.none() | meter_batches, checkpoints=st.lists(checkpoints, max_size=3))


@PROPERTY
@hypothesis.given(batches)
def test_any_batch_round_trips(batch: store.Batch) -> None:
    """Whatever a batch holds (any int size, any text, empty or missing parts), it decodes equal."""
    assert batch == spool.decode(spool.encode(batch))


# The file


def test_first_is_the_lowest_number_whatever_the_order_of_appends(box: spool.Spool) -> None:
    """first() gives the lowest seq still spooled, so replay goes in number order."""
    for seq in (5, 2, 9, 3):
        box.append(small_batch(seq))
    seen = []
    while (batch := box.first()) is not None:
        seen.append(batch)
        box.remove(batch.seq)
    assert [small_batch(seq) for seq in (2, 3, 5, 9)] == seen


def test_remove_forgets_one_batch_and_counts_follow(box: spool.Spool) -> None:
    """remove(seq) drops that batch only; len, pending_batches follow; removing twice is harmless."""
    for seq in (1, 2, 3):
        box.append(small_batch(seq))
    box.remove(1)
    box.remove(1)
    box.remove(2)
    assert (1, 1, small_batch(3)) == (len(box), box.pending_batches, box.first())


def test_the_same_batch_twice_is_kept_once_and_a_different_one_is_refused(box: spool.Spool) -> None:
    """Appending a batch again (a retried spill) is a no-op; another batch under the same number is an error."""
    box.append(full_batch(4))
    box.append(full_batch(4))
    with pytest.raises(spool.SpoolError, match="already holds a different batch 4"):
        box.append(small_batch(4))
    assert (1, full_batch(4)) == (len(box), box.first())


def test_batches_survive_close_and_reopen(tmp_path: Path) -> None:
    """A spool closed with batches in it keeps them; the same incarnation reopens them, identity included."""
    folder = tmp_path / "spool"
    first = spool.Spool.create(folder, WRITER, "replica-a")
    first.append(full_batch(1))
    first.append(small_batch(2))
    first.close()  # not empty: kept whatever delete_if_empty says
    again = spool.Spool.create(folder, WRITER, "replica-a")
    try:
        assert (WRITER, "replica-a", 2, full_batch(1)) == (again.writer_id, again.replica_id, len(again),
                                                            again.first())
    finally:
        again.close()


def test_closing_an_empty_spool_deletes_its_files(tmp_path: Path) -> None:
    """Once replayed, close() leaves nothing behind: no database, WAL, shared memory or lock file."""
    folder = tmp_path / "spool"
    box = spool.Spool.create(folder, WRITER, "replica-a")
    box.append(small_batch(1))
    box.remove(1)
    box.close()
    nothing: list[Path] = []
    assert nothing == list(folder.iterdir())


def test_a_closed_spool_refuses_use(box: spool.Spool) -> None:
    """Using a spool after close() raises SpoolError naming the file, not a sqlite3 error."""
    box.close()
    with pytest.raises(spool.SpoolError, match=f"spool file {box.path} is closed"):
        box.append(small_batch(1))


def test_bytes_on_disk_follow_the_batches(box: spool.Spool) -> None:
    """bytes_on_disk counts the file and its WAL: at least the payloads written."""
    before = box.bytes_on_disk
    box.append(store.Batch(seq=1, windows={60: store.BatchWindow(list(range(5_000)), [], 0, 0)}, events=0))
    assert box.bytes_on_disk - before >= 16 * 5_000


def test_files_and_directory_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """The directory is created 0700, the database, its WAL and shared memory, and the lock 0600."""
    previous = os.umask(0)
    try:
        box = spool.Spool.create(tmp_path / "state" / "spool", WRITER, "replica-a")
        box.append(small_batch(1))
        stem = WRITER.hex
        expected = {f"{stem}.lock": "0o600", f"{stem}.spool": "0o600", f"{stem}.spool-shm": "0o600",
                    f"{stem}.spool-wal": "0o600"}
        assert (expected, "0o700") == (file_modes(box.path.parent),
                                       oct(stat.S_IMODE(box.path.parent.stat().st_mode)))
        box.close()
    finally:
        os.umask(previous)


def test_the_same_writer_cannot_be_opened_twice(box: spool.Spool) -> None:
    """A second create() for a writer_id whose file is held says so instead of sharing the file."""
    with pytest.raises(spool.SpoolError, match="is held already"):
        spool.Spool.create(box.path.parent, WRITER, "replica-a")


# Ownership across processes


def test_a_spool_held_in_this_process_is_no_orphan(box: spool.Spool) -> None:
    """This process's own open spool is not adopted, and neither is an orphan adopted already."""
    box.append(small_batch(1))
    own = spool.Spool.orphans(box.path.parent)
    box.close()
    adopted = spool.Spool.orphans(box.path.parent)
    try:
        expected: tuple[list[spool.Spool], list[uuid.UUID], list[spool.Spool]] = ([], [WRITER], [])
        assert expected == (own, [s.writer_id for s in adopted], spool.Spool.orphans(box.path.parent))
    finally:
        for orphan in adopted:
            orphan.close()


@pytest.mark.parametrize("how", ["hold", "fork"])
def test_a_live_holder_keeps_its_spool_until_killed(tmp_path: Path, how: str) -> None:
    """While its process lives the file is not adoptable; after SIGKILL it is, with its identity and batches.

    ``fork``: the holder has forked a child that outlives it; the child must not keep the lock.
    """
    folder = tmp_path / "spool"
    writer = uuid.uuid4()
    holder = start_holder(folder, writer, how)
    grandchild = 0
    try:
        assert holder.stdout is not None
        grandchild = int(holder.stdout.readline() or "-1")
        assert grandchild >= 0, "the holding process failed"
        nothing: list[spool.Spool] = []
        assert nothing == spool.Spool.orphans(folder)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        adopted = spool.Spool.orphans(folder)
        try:
            assert [(writer, "child", 1, 7)] == [(s.writer_id, s.replica_id, len(s), s.first().seq)  # type: ignore[union-attr]
                                                 for s in adopted]
        finally:
            for orphan in adopted:
                orphan.close()
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
        if grandchild > 0:
            os.kill(grandchild, signal.SIGKILL)


def test_a_spool_left_by_a_process_that_exited_is_adopted(tmp_path: Path) -> None:
    """A process that ends without close() (a crash, os._exit) leaves its batches to the next replica."""
    folder = tmp_path / "spool"
    writer = uuid.uuid4()
    subprocess.run([sys.executable, "-c", HOLD, str(folder), str(writer), "exit"], timeout=60, check=True)
    adopted = spool.Spool.orphans(folder)
    try:
        batch = store.Batch(seq=7, windows={60: store.BatchWindow([1], [2, 3], 4, 5)}, events=9)
        assert [(writer, batch)] == [(s.writer_id, s.first()) for s in adopted]
    finally:
        for orphan in adopted:
            orphan.close()


ADOPT = """
import sys
from aggregator import spool
print("ready", flush=True)
sys.stdin.readline()  # all at once
print(len(spool.Spool.orphans(sys.argv[1])), flush=True)
sys.stdin.read()  # what it adopted stays held until the test is done counting
"""


@pytest.mark.slow
def test_replicas_starting_together_adopt_an_orphan_once(tmp_path: Path) -> None:
    """Four processes looking for orphans at the same moment: each file goes to exactly one of them."""
    folder = tmp_path / "spool"
    for writer in (uuid.uuid4(), uuid.uuid4()):
        box = spool.Spool.create(folder, writer, "old")
        box.append(small_batch(1))
        box.close()
    replicas = [subprocess.Popen([sys.executable, "-c", ADOPT, str(folder)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        pipes = [(replica.stdin, replica.stdout) for replica in replicas]
        ready = ["ready\n"] * 4
        assert ready == [out.readline() for _, out in pipes if out is not None]
        for into, _ in pipes:
            assert into is not None
            into.write("go\n")
            into.flush()
        counts = [int(out.readline()) for _, out in pipes if out is not None]
    finally:
        for replica in replicas:
            replica.communicate(timeout=60)
    expected = 2
    assert expected == sum(counts), counts


def test_orphans_are_adopted_oldest_first_and_leftovers_cleared(tmp_path: Path) -> None:
    """Orphans come oldest first; an empty file of an interrupted create and a lone lock file are removed."""
    folder = tmp_path / "spool"
    writers = [uuid.uuid4(), uuid.uuid4()]
    for writer in writers:
        box = spool.Spool.create(folder, writer, "old")
        box.append(small_batch(1))
        box.close()
    (folder / f"{uuid.uuid4().hex}.spool").touch()
    (folder / f"{uuid.uuid4().hex}.lock").touch()
    adopted = spool.Spool.orphans(folder)
    try:
        names = {f"{writer.hex}{suffix}" for writer in writers for suffix in (".spool", ".lock")}
        left = {path.name for path in folder.iterdir() if not path.name.endswith(("-wal", "-shm"))}
        assert (writers, names) == ([s.writer_id for s in adopted], left)
    finally:
        for orphan in adopted:
            orphan.close()


# Damaged and foreign files


def test_a_corrupt_file_is_set_aside_and_the_others_adopted(tmp_path: Path) -> None:
    """A file that is not a database is renamed ``*.corrupt`` (logged with the fix); a good orphan is still adopted."""
    folder = tmp_path / "spool"
    good = spool.Spool.create(folder, WRITER, "replica-a")
    good.append(small_batch(1))
    good.close()
    bad = folder / f"{uuid.uuid4().hex}.spool"
    bad.write_bytes(b"this is not a SQLite database, it was damaged on disk" * 100)
    with capture_logs() as logs:
        adopted = spool.Spool.orphans(folder)
    try:
        expected = ([WRITER], False, True, [("spool_set_aside", str(bad))])
        assert expected == ([s.writer_id for s in adopted], bad.exists(),
                            bad.with_name(f"{bad.name}.corrupt").exists(), [(e["event"], e["path"]) for e in logs])
        assert "sqlite3" in logs[0]["error"] and "set_aside" in logs[0]["error"]
    finally:
        for orphan in adopted:
            orphan.close()


def test_an_unreadable_batch_raises_corrupt_and_set_aside_moves_the_file(tmp_path: Path) -> None:
    """A damaged payload raises SpoolCorrupt naming file and batch; set_aside() moves the file and its WAL."""
    folder = tmp_path / "spool"
    box = spool.Spool.create(folder, WRITER, "replica-a")
    box.append(small_batch(1))
    box.close()
    with sqlite3.connect(folder / f"{WRITER.hex}.spool") as db:
        db.execute("UPDATE batches SET payload = ? WHERE seq = 1", (bytes([1, 0, 0, 0, 0, 2]),))
    db.close()
    [orphan] = spool.Spool.orphans(folder)
    with pytest.raises(spool.SpoolCorrupt) as raised:
        orphan.first()
    moved = orphan.set_aside()
    orphan.close()  # what a caller's finally does: harmless now
    assert (f"spool file {orphan.path}, batch 1 is damaged (checksum mismatch)", [f"{WRITER.hex}.spool.corrupt"]) \
        == (str(raised.value), sorted(path.name for path in folder.iterdir() if not path.name.endswith("-wal")))
    assert moved == folder / f"{WRITER.hex}.spool.corrupt"
    with sqlite3.connect(moved) as db:  # what was set aside can still be read by hand
        rows = [(1,)]
        assert rows == db.execute("SELECT seq FROM batches").fetchall()
    db.close()


def test_a_file_of_a_newer_version_is_left_for_it(tmp_path: Path) -> None:
    """A spool file of an unknown file format is neither adopted nor moved; the log says what to run."""
    folder = tmp_path / "spool"
    box = spool.Spool.create(folder, WRITER, "replica-a")
    box.append(small_batch(1))
    box.close()
    path = folder / f"{WRITER.hex}.spool"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 2")
    db.close()
    with capture_logs() as logs:
        adopted = spool.Spool.orphans(folder)
    expected = (f"spool file {path} is in format version 2, and this version of aggregator reads version 1 "
                "only: it was written by another version of aggregator; run that version (or a newer one) on this "
                "host to replay it, then this one")
    assert ([], [("spool_skipped", expected)], True) == (adopted, [(e["event"], e["error"]) for e in logs],
                                                         path.exists())


# Where and how much


def test_default_directory_is_beside_a_sqlite_database(tmp_path: Path) -> None:
    """With SQLite, the spool directory is ``spool/`` next to the database file."""
    assert tmp_path / "spool" == spool.default_directory(f"sqlite+aiosqlite:///{tmp_path}/aggregator.db")


@pytest.mark.parametrize("env", [
    {"STATE_DIRECTORY": "/var/lib/aggregator:/var/lib/other", "XDG_STATE_HOME": "/x"},
    {"XDG_STATE_HOME": "/home/u/.state"},
    {"HOME": "/home/u"},
])
def test_default_directory_follows_the_state_directory(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """With PostgreSQL: systemd's STATE_DIRECTORY, else XDG_STATE_HOME/aggregator, else ~/.local/state/aggregator."""
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expected = {"STATE_DIRECTORY": Path("/var/lib/aggregator/spool"),
                "XDG_STATE_HOME": Path("/home/u/.state/aggregator/spool"),
                "HOME": Path("/home/u/.local/state/aggregator/spool")}[next(iter(env))]
    assert expected == spool.default_directory("postgresql://user:secret@db.example/aggregator")


def test_batch_bytes_is_near_what_the_flusher_holds() -> None:
    """batch_bytes() is within 0.8-1.25x of tracemalloc's count for a batch of 100,000 ids and their set.

    Sets of fewer than 50,000 ids swing wider (they grow fourfold): up to 1.6x BYTES_PER_ID just past
    a resize. Large sets, the ones a budget is about, grow twofold and stay near it.
    """
    rng = random.Random(4)
    drawn = [rng.getrandbits(127) for _ in range(100_000)]

    def build() -> tuple[store.Batch, set[int]]:
        batch = full_batch()
        users = {value | 1 << 127 for value in drawn}  # new 128-bit int objects, as the tracker keeps
        batch.windows[60] = store.BatchWindow([], list(users), 0, 0)
        return batch, users

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = build()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    ratio = spool.batch_bytes(held[0]) / traced
    assert 0.8 <= ratio <= 1.25, ratio
