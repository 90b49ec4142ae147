"""CSV export of reports: incremental by id, byte-identical on re-runs, pseudonymized, uploaded to S3 (moto)."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import stat
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from aggregator import (
    AggregatorError,
    ConfigError,
    InvalidInput,
    Report,
    billing,
    export,
    meters,
    privacy,
    reports,
    schema,
    store,
)
from tests.helpers import T0, WINDOW, FakeClock, ids, manual

KEY = "k" * 32
WS, USERS = ids(2), ids(50, offset=1000)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[store.Store]:
    opened = store.Store(database_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


async def add_reports(url: str, clock: FakeClock, count: int) -> list[Report]:
    """``count`` more reports, the real way: track, flush, let the windows close, collect.

    Window k (counted from T0) gets k + 1 allowed requests, so every row is recognizable.
    """
    first = int((clock.t - T0) // WINDOW)
    async with manual(url, clock) as agg:
        for k in range(first, first + count):
            clock.t = max(clock.t, T0 + k * WINDOW + 1)  # the clock never runs backwards
            agg.track(WS[0], USERS[k], allowed=k + 1)
        await agg.aflush()
        clock.past_window(T0 + (first + count - 1) * WINDOW)
        return await agg.acollect()


async def insert_report(url: str, window_start: int, *, replicas_missing: int | None = None, **counts: int) -> int:
    """One report row written straight into the reports table (as a collector of any version would); its id.

    ``replicas_missing=None`` leaves the column out, as a collector from before the column does.
    """
    row: dict[str, Any] = {name: 0 for name in ("unique_workspaces", "unique_users", "allowed_requests",
                                                 "denied_requests", "late_allowed_requests", "late_denied_requests",
                                                 "late_unique_workspaces", "late_unique_users")}
    row.update(window_start=window_start, window_end=window_start + WINDOW, replicas=1,
               generated_at=float(window_start + WINDOW + 5), generated_by="collector-1", **counts)
    if replicas_missing is not None:
        row["replicas_missing"] = replicas_missing
    db = store.Store(url)
    try:
        async with db.transaction() as conn:
            return int((await conn.execute(sa.insert(schema.reports).values(**row)
                                           .returning(schema.reports.c.id))).scalar_one())
    finally:
        await db.close()


def content(result: export.ExportResult) -> bytes:
    assert result.path is not None
    return result.path.read_bytes()


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(), newline="")))


async def test_first_export_holds_a_header_and_every_report(db: store.Store, database_url: str, clock: FakeClock,
                                                           tmp_path: Path) -> None:
    """Since 0: header in FIELDS order, one row per report in id order, named after the id range."""
    made = await add_reports(database_url, clock, 3)
    result = await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, out_dir=tmp_path / "out")
    last = made[-1].id
    assert export.ExportResult(path=tmp_path / "out" / f"usage_reports-000000000000-{last:012d}.csv", rows=3,
                               first_id=made[0].id, last_id=last, next_cursor=last) == result
    assert result.path is not None
    text = result.path.read_text()
    assert ",".join(reports.FIELDS) + "\n" == text.splitlines(keepends=True)[0]
    expected = [("1", "1", "1"), ("2", "1", "1"), ("3", "1", "1")]
    assert expected == [(r["allowed_requests"], r["unique_users"], r["unique_workspaces"]) for r in rows(result.path)]
    assert [str(r.id) for r in made] == [r["id"] for r in rows(result.path)]
    assert "\r" not in text
    leftovers = [p.name for p in result.path.parent.iterdir() if p != result.path]
    assert (stat.S_IMODE(result.path.stat().st_mode), leftovers) == (0o640, [])


# The columns of the first release, in their order: a loader that reads by position relies on it.
COLUMNS_1_0 = ("id,window_start,window_end,unique_workspaces,unique_users,allowed_requests,denied_requests,"
               "replicas,late_allowed_requests,late_denied_requests,late_unique_workspaces,late_unique_users,"
               "generated_at,generated_by")


async def test_replicas_missing_is_the_last_column_after_the_old_ones(db: store.Store, database_url: str,
                                                                       tmp_path: Path) -> None:
    """The columns of the first release keep their order; replicas_missing is appended; an incomplete report
    shows how many replicas it misses, and a row written without the column reads 0."""
    old = await insert_report(database_url, T0)
    incomplete = await insert_report(database_url, T0 + WINDOW, replicas_missing=2, allowed_requests=9)
    result = await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, out_dir=tmp_path / "out")
    assert result.path is not None
    header, *lines = result.path.read_text().splitlines()
    assert COLUMNS_1_0 + ",replicas_missing" == header == ",".join(reports.FIELDS)
    digest_ = digest("collector-1")
    assert [f"{old},2027-01-15T08:00:00Z,2027-01-15T08:01:00Z,0,0,0,0,1,0,0,0,0,2027-01-15T08:01:05Z,{digest_},0",
            f"{incomplete},2027-01-15T08:01:00Z,2027-01-15T08:02:00Z,0,0,9,0,1,0,0,0,0,2027-01-15T08:02:05Z,"
            f"{digest_},2"] == lines


async def test_same_cursor_gives_the_same_name_and_bytes(db: store.Store, database_url: str, clock: FakeClock,
                                                         tmp_path: Path) -> None:
    """Re-running with the same cursor and no new report rewrites the same file, byte for byte."""
    await add_reports(database_url, clock, 2)
    pseudonymizer = privacy.Pseudonymizer(KEY)
    first = await export.export_csv(db, pseudonymizer, since=0, out_dir=tmp_path / "a")
    second = await export.export_csv(db, pseudonymizer, since=0, out_dir=tmp_path / "b")
    assert first.path is not None and second.path is not None
    assert (first.path.name, first.path.read_bytes()) == (second.path.name, second.path.read_bytes())


async def test_next_cursor_exports_only_newer_reports(db: store.Store, database_url: str, clock: FakeClock,
                                                      tmp_path: Path) -> None:
    """The next run, from next_cursor, holds exactly the reports written since; with none, there is no file."""
    await add_reports(database_url, clock, 2)
    pseudonymizer = privacy.Pseudonymizer(KEY)
    first = await export.export_csv(db, pseudonymizer, since=0, out_dir=tmp_path / "out")
    newer = await add_reports(database_url, clock, 3)
    second = await export.export_csv(db, pseudonymizer, since=first.next_cursor, out_dir=tmp_path / "out")
    assert second.path is not None
    assert [str(r.id) for r in newer] == [r["id"] for r in rows(second.path)]
    assert [r["allowed_requests"] for r in rows(second.path)] == ["3", "4", "5"]
    assert (3, newer[0].id, newer[-1].id, newer[-1].id) == (
        second.rows, second.first_id, second.last_id, second.next_cursor)

    third = await export.export_csv(db, pseudonymizer, since=second.next_cursor, out_dir=tmp_path / "out")
    assert export.ExportResult(path=None, rows=0, first_id=None, last_id=None,
                               next_cursor=second.next_cursor) == third
    assert len(list((tmp_path / "out").iterdir())) == 2


async def test_explicit_until_is_reproducible_after_later_reports(db: store.Store, database_url: str,
                                                                  clock: FakeClock, tmp_path: Path) -> None:
    """(since, until] names the same rows forever: later reports change neither name nor bytes."""
    made = await add_reports(database_url, clock, 3)
    pseudonymizer = privacy.Pseudonymizer(KEY)
    before = await export.export_csv(db, pseudonymizer, since=made[0].id, until=made[1].id, out_dir=tmp_path / "a")
    await add_reports(database_url, clock, 2)
    after = await export.export_csv(db, pseudonymizer, since=made[0].id, until=made[1].id, out_dir=tmp_path / "b")
    assert before.path is not None and after.path is not None
    assert f"usage_reports-{made[0].id:012d}-{made[1].id:012d}.csv" == after.path.name
    assert (before.path.name, before.path.read_bytes()) == (after.path.name, after.path.read_bytes())
    assert [str(made[1].id)] == [r["id"] for r in rows(after.path)]


async def test_paging_does_not_change_the_bytes(db: store.Store, database_url: str, clock: FakeClock,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the store two rows at a time gives the same file as reading it at once, with or without until."""
    made = await add_reports(database_url, clock, 5)
    pseudonymizer = privacy.Pseudonymizer(KEY)
    whole = await export.export_csv(db, pseudonymizer, since=0, out_dir=tmp_path / "whole")
    part = await export.export_csv(db, pseudonymizer, since=0, until=made[2].id, out_dir=tmp_path / "part")
    monkeypatch.setattr(export, "PAGE_SIZE", 2)
    paged = await export.export_csv(db, pseudonymizer, since=0, out_dir=tmp_path / "paged")
    paged_part = await export.export_csv(db, pseudonymizer, since=0, until=made[2].id, out_dir=tmp_path / "pp")
    assert [content(whole), content(part)] == [content(paged), content(paged_part)]
    assert (paged.rows, paged_part.rows) == (5, 3)


async def test_until_beyond_the_newest_report_is_refused(db: store.Store, database_url: str, clock: FakeClock,
                                                         tmp_path: Path) -> None:
    """An until not yet visible could gain rows later, so it is refused and no file is left behind."""
    made = await add_reports(database_url, clock, 1)
    with pytest.raises(InvalidInput, match=f"until={made[0].id + 5} is beyond the newest report id"):
        await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, until=made[0].id + 5, out_dir=tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(("since", "until", "message"), [
    (-1, None, "since=-1 must be a report id ≥ 0"),
    (5, 4, r"until=4 must be a report id ≥ since \(5\)"),
])
async def test_a_bad_range_is_refused(db: store.Store, tmp_path: Path, since: int, until: int | None,
                                      message: str) -> None:
    """A negative cursor or an until before since is an InvalidInput naming the value."""
    with pytest.raises(InvalidInput, match=message):
        await export.export_csv(db, privacy.Pseudonymizer(KEY), since=since, until=until, out_dir=tmp_path)


async def test_generated_by_is_hashed_or_clear_when_allowlisted(db: store.Store, database_url: str,
                                                                clock: FakeClock, tmp_path: Path) -> None:
    """generated_by leaves as HMAC-SHA256(key, value) in hex, or in clear when on the allowlist."""
    (made,) = await add_reports(database_url, clock, 1)
    hashed = await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, out_dir=tmp_path / "hashed")
    clear = await export.export_csv(db, privacy.Pseudonymizer(None, allowlist=["generated_by"]), since=0,
                                    out_dir=tmp_path / "clear")
    assert hashed.path is not None and clear.path is not None
    expected = hmac.new(KEY.encode(), made.generated_by.encode(), hashlib.sha256).hexdigest()
    assert [expected] == [r["generated_by"] for r in rows(hashed.path)]
    assert [made.generated_by] == [r["generated_by"] for r in rows(clear.path)]


async def test_without_a_key_the_export_refuses(db: store.Store, tmp_path: Path) -> None:
    """No pseudonym key and generated_by not allowlisted: a ConfigError before anything is read or written."""
    with pytest.raises(ConfigError, match=r"aggregator export would send identifiers \(generated_by\)"):
        await export.export_csv(db, privacy.Pseudonymizer(None), since=0, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cells_are_quoted_as_rfc_4180_says() -> None:
    """Commas, quotes, CR and LF are quoted (quotes doubled); everything else is left bare."""
    assert export._line(["a", "b,c", 'say "hi"', "x\ry", "1\n2", None, 7]) == 'a,"b,c","say ""hi""","x\ry","1\n2",,7\n'


def test_summary_says_what_was_exported() -> None:
    """The CLI's one-line summary names rows, ids, file, key and the next cursor."""
    result = export.ExportResult(path=Path("/x/f.csv"), rows=2, first_id=4, last_id=5, next_cursor=5,
                                 s3_key="p/f.csv")
    nothing = export.ExportResult(path=None, rows=0, first_id=None, last_id=None, next_cursor=3)
    expected = ["exported 2 report(s), ids 4..5, to /x/f.csv, uploaded as p/f.csv; next cursor 5",
                "no reports after cursor 3; next cursor 3"]
    assert expected == [export.summary(result), export.summary(nothing)]


# S3, against moto's server on 127.0.0.1.


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A moto S3 server on a free loopback port, with dummy credentials and no host AWS config."""
    from moto.server import ThreadedMotoServer

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "NO_PROXY": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        if server._server is not None:  # stop() leaves the listening socket open: a ResourceWarning later
            server._server.server_close()


def s3_client(endpoint: str) -> object:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


async def test_upload_puts_the_same_bytes_under_prefix_and_name(db: store.Store, database_url: str,
                                                                clock: FakeClock, tmp_path: Path,
                                                                s3_endpoint: str) -> None:
    """The object at prefix/<file name> equals the local file; uploading again leaves identical content."""
    await add_reports(database_url, clock, 2)
    client = s3_client(s3_endpoint)
    try:
        client.create_bucket(Bucket="warehouse")  # type: ignore[attr-defined]
        pseudonymizer = privacy.Pseudonymizer(KEY)
        results = [await export.export_csv(db, pseudonymizer, since=0, out_dir=tmp_path / f"run{i}",
                                           s3_url="s3://warehouse/usage/daily/", s3_endpoint_url=s3_endpoint)
                   for i in range(2)]
        assert results[0].path is not None
        key = f"usage/daily/{results[0].path.name}"
        assert [key, key] == [r.s3_key for r in results]
        body = client.get_object(Bucket="warehouse", Key=key)["Body"]  # type: ignore[attr-defined]
        try:
            assert results[0].path.read_bytes() == body.read()
        finally:
            body.close()
        listed = client.list_objects_v2(Bucket="warehouse")["Contents"]  # type: ignore[attr-defined]
        assert [key] == [o["Key"] for o in listed]
    finally:
        client.close()  # type: ignore[attr-defined]


async def test_a_failed_upload_is_an_aggregator_error_and_keeps_the_file(db: store.Store, database_url: str,
                                                                         clock: FakeClock, tmp_path: Path,
                                                                         s3_endpoint: str) -> None:
    """Uploading to a missing bucket raises AggregatorError naming the target; the local file stays."""
    await add_reports(database_url, clock, 1)
    with pytest.raises(AggregatorError, match="to s3://absent/usage_reports-.* failed: .*NoSuchBucket"):
        await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, out_dir=tmp_path / "out", s3_url="s3://absent",
                                s3_endpoint_url=s3_endpoint)
    assert len(list((tmp_path / "out").glob("usage_reports-*.csv"))) == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"s3_url": "https://bucket/x"}, "s3 URL 'https://bucket/x' is not of the form s3://bucket/prefix"),
    ({"s3_url": "s3:///x"}, "s3 URL 's3:///x' is not of the form"),
    ({"s3_endpoint_url": "http://127.0.0.1:9000"}, "there is no s3 URL; add --s3"),
])
async def test_bad_s3_settings_are_config_errors(db: store.Store, tmp_path: Path, options: dict[str, Any],
                                                 message: str) -> None:
    """A malformed S3 URL, or an endpoint without one, is refused before exporting."""
    with pytest.raises(ConfigError, match=message):
        await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, out_dir=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


async def test_without_boto3_the_upload_says_what_to_install(db: store.Store, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """If boto3 is not importable, the ConfigError names the extra to install."""
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'aggregator\[s3\]'"):
        await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, out_dir=tmp_path, s3_url="s3://b/p")


# Billable usage events (kind="billable_usage").


async def add_billable(database_url: str, count: int, first_window: int = T0) -> list[dict[str, Any]]:
    """``count`` billable events of one window each, written straight into billable_events under one report."""
    meter = meters.Meter("ci_minutes", "sum", "seconds", dimensions=("project_id", "runner"), decimals=3,
                         billable=True)
    db = store.Store(database_url)
    try:
        async with db.transaction() as conn:
            report = {name: 0 for name in ("unique_workspaces", "unique_users", "allowed_requests",
                                           "denied_requests", "replicas", "late_allowed_requests",
                                           "late_denied_requests", "late_unique_workspaces", "late_unique_users")}
            inserted = await conn.execute(sa.insert(schema.reports).values(
                window_start=first_window, window_end=first_window + WINDOW, generated_at=float(first_window + WINDOW),
                generated_by="collector-1", **report).returning(schema.reports.c.id))
            report_id = inserted.scalar_one()
            events = []
            for k in range(count):
                start = first_window + k * WINDOW
                made = billing.billable_event(meter, window_start=start, window_end=start + WINDOW,
                                              dimensions={"project_id": f"p-{k}", "runner": "linux, large"},
                                              quantity_units=1500 + k, late=False, realm="saas")
                assert made is not None
                events.append(made)
            await conn.execute(sa.insert(schema.billable_events), [
                {"event_id": uuid.UUID(e["event_id"]), "window_start": first_window + k * WINDOW, "meter": "ci_minutes",
                 "report_id": report_id, "payload": json.dumps(e, sort_keys=True)} for k, e in enumerate(events)])
    finally:
        await db.close()
    return events


async def test_billable_export_writes_every_event_pseudonymized(db: store.Store, database_url: str,
                                                               tmp_path: Path) -> None:
    """kind=billable_usage: header in billing.FIELDS order, one row per event in id order, project_id hashed,
    metadata as sorted compact JSON, absent fields empty; named billable_usage-<since>-<until>.csv."""
    events = await add_billable(database_url, 3)
    result = await export.export_csv(db, privacy.Pseudonymizer(KEY, allowlist=["metadata.dimensions.runner"]),
                                     since=0, out_dir=tmp_path / "out", kind="billable_usage")
    assert result.path is not None and result.last_id is not None
    assert f"billable_usage-000000000000-{result.last_id:012d}.csv" == result.path.name
    assert (3, result.last_id, "billable_usage") == (result.rows, result.next_cursor, result.kind)
    lines = result.path.read_text().splitlines()
    assert ",".join(billing.FIELDS) == lines[0]
    exported = rows(result.path)
    assert [keyed(e["event_id"]) for e in events] == [r["event_id"] for r in exported]
    assert [digest(e["project_id"]) for e in events] == [r["project_id"] for r in exported]
    assert [r["quantity"] for r in exported] == ["1.5", "1.501", "1.502"]
    assert [(r["instance_id"], r["namespace_id"], r["subject"]) for r in exported] == [("", "", "")] * 3
    metadata = {**events[0]["metadata"], "dimensions": {"runner": "linux, large"}}
    assert json.dumps(metadata, sort_keys=True, separators=(",", ":")) == exported[0]["metadata"]
    assert "exported 3 billable event(s)" in export.summary(result)


async def test_billable_export_is_idempotent_and_incremental(db: store.Store, database_url: str,
                                                             tmp_path: Path) -> None:
    """Same cursor: same name and bytes; the next cursor finds only events committed since, then nothing."""
    await add_billable(database_url, 2)
    pseudonymizer = privacy.Pseudonymizer(KEY)
    first = await export.export_csv(db, pseudonymizer, since=0, out_dir=tmp_path / "a", kind="billable_usage")
    again = await export.export_csv(db, pseudonymizer, since=0, out_dir=tmp_path / "b", kind="billable_usage")
    assert first.path is not None and again.path is not None
    assert (first.path.name, first.path.read_bytes()) == (again.path.name, again.path.read_bytes())
    newer = await add_billable(database_url, 2, first_window=T0 + 10 * WINDOW)
    second = await export.export_csv(db, pseudonymizer, since=first.next_cursor, out_dir=tmp_path / "a",
                                     kind="billable_usage")
    assert second.path is not None
    assert [keyed(e["event_id"]) for e in newer] == [r["event_id"] for r in rows(second.path)]
    third = await export.export_csv(db, pseudonymizer, since=second.next_cursor, out_dir=tmp_path / "a",
                                    kind="billable_usage")
    assert export.ExportResult(path=None, rows=0, first_id=None, last_id=None, next_cursor=second.next_cursor,
                               kind="billable_usage") == third
    assert f"no billable events after cursor {second.next_cursor}" in export.summary(third)


async def test_billable_export_refuses_an_until_not_yet_visible(db: store.Store, database_url: str,
                                                                tmp_path: Path) -> None:
    """As for reports: an until beyond the newest billable event id is refused, naming the kind's id."""
    await add_billable(database_url, 1)
    with pytest.raises(InvalidInput, match="until=9 is beyond the newest billable event id"):
        await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, until=9, out_dir=tmp_path,
                                kind="billable_usage")


async def test_billable_export_without_a_key_names_the_identifiers(db: store.Store, tmp_path: Path) -> None:
    """No key and nothing allowlisted: ConfigError listing the billable identifier paths; no file."""
    with pytest.raises(ConfigError, match=r"would send identifiers \(instance_id, metadata\.dimensions\.\*"):
        await export.export_csv(db, privacy.Pseudonymizer(None), since=0, out_dir=tmp_path / "out",
                                kind="billable_usage")
    assert not (tmp_path / "out").exists()


async def test_an_unknown_kind_is_a_config_error(db: store.Store, tmp_path: Path) -> None:
    """An unknown kind names itself and the kinds that can be exported."""
    with pytest.raises(ConfigError, match="kind='invoices' cannot be exported; use one of: billable_usage, "
                                          "usage_report"):
        await export.export_csv(db, privacy.Pseudonymizer(KEY), since=0, out_dir=tmp_path, kind="invoices")


def keyed(event_id: str) -> str:
    """A billable event id as it leaves under KEY: keyed, never the stored one (see privacy.py)."""
    return str(privacy.Pseudonymizer(KEY).event_id(billing.KIND, uuid.UUID(event_id)))


def digest(value: str) -> str:
    return hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()
