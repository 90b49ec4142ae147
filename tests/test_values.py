"""The one edge (aggregator/values.py): every value bounded before conversion, every refusal an AggregatorError.

Each finding of the hostile-input review has a test named after it; property tests (hypothesis) check
the contract over generated input: a call is either refused with an AggregatorError and changes
nothing, or accepted and counted exactly.
"""

from __future__ import annotations

import datetime as dt
import decimal
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import Aggregator, AggregatorError, InvalidInput, InvalidType, values
from tests.helpers import T0, WINDOW, FakeClock, manual
from tests.test_cli import aggregator as run_cli

UTC = dt.timezone.utc
CID = "01J9Z3K8Q6W5N2B7R4T1V0X9YC"
METERS: dict[str, dict[str, Any]] = {
    "cpu": {"aggregation": "sum", "unit": "seconds", "decimals": 3, "dimensions": ["project"], "billable": True},
    "seen": {"aggregation": "distinct", "field": "item", "unit": "items", "dimensions": []},
}


@pytest.fixture
def agg(tmp_path: Path) -> Aggregator:
    """Not started: calls buffer in memory, so the edge needs no database; the clock stands at T0 + 1."""
    return manual(f"sqlite:///{tmp_path / 'x.db'}", FakeClock(), meters=METERS)


def pending(agg: Aggregator) -> tuple[int, int, int]:
    return agg.status()["pending_events"], agg._recorder.pending(), agg._checkpoints.pending()


def refused(agg: Aggregator, call: Callable[[], object], error: type[Exception] = InvalidInput,
            match: str | None = None) -> str:
    """``call`` raises ``error`` (an AggregatorError), names what is wrong, and keeps nothing."""
    before = pending(agg)
    with pytest.raises(error, match=match) as raised:
        call()
    assert isinstance(raised.value, AggregatorError)
    assert pending(agg) == before
    return str(raised.value)


def checkpoint(agg: Aggregator, **fields: Any) -> float:
    args: dict[str, Any] = {"correlation_id": CID, "experience_id": "search", "checkpoint": "start", "type": "api",
                            "feature_category": "search", "urgency": "sync_fast"} | fields
    return agg.checkpoint(**args)


# ---- the findings, one test each ---------------------------------------------------------------------


def test_checkpoint_from_year_one_is_refused(agg: Aggregator) -> None:
    """A client_timestamp of 0001-01-01T00:00:00+14:00 once stopped every report when it timed out."""
    message = refused(agg, lambda: checkpoint(agg, client_timestamp="0001-01-01T00:00:00+14:00"))
    assert "client_timestamp='0001-01-01T00:00:00+14:00'" in message and "1970" in message


def test_track_at_1e300_is_refused_and_the_events_after_it_are_reported(tmp_path: Path) -> None:
    """track(at=1e300) once poisoned every flush; now it is refused and the good events go on."""
    clock = FakeClock()
    with manual(f"sqlite:///{tmp_path / 'a.db'}", clock) as agg:
        message = refused(agg, lambda: agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=1e300))
        assert "at=1e+300" in message
        agg.track(uuid.UUID(int=1), uuid.UUID(int=2), allowed=3)
        agg.flush()
        clock.past_window(T0)
        agg.flush()
        agg.collect()
        (report,) = agg.reports()
        assert (report.unique_users, report.allowed_requests) == (1, 3)


def test_track_at_1e12_a_window_in_the_year_33658_is_refused(agg: Aggregator) -> None:
    refused(agg, lambda: agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=1e12), match="between 1970 and 2100")


def test_times_outside_max_event_age_and_future_are_refused_naming_the_settings(agg: Aggregator) -> None:
    """The declared range around now: 1 day back, 5 minutes ahead by default; its edges are accepted."""
    now = T0 + 1
    agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=now - 86400)
    agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=now + 300)
    message = refused(agg, lambda: agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=now - 86401))
    assert "86401s in the past" in message and "max_event_age" in message
    message = refused(agg, lambda: agg.record("cpu", 1, {"project": "p"}, at=now + 301))
    assert "301s in the future" in message and "max_event_future" in message
    refused(agg, lambda: checkpoint(agg, client_timestamp=dt.datetime.fromtimestamp(now + 301, UTC)),
            match="max_event_future")


def test_the_range_is_a_setting(tmp_path: Path) -> None:
    agg = manual(f"sqlite:///{tmp_path / 'x.db'}", FakeClock(), max_event_age="7d", max_event_future="1h")
    agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=T0 - 6 * 86400)
    agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=T0 + 3500)
    assert pending(agg)[0] == 2
    with pytest.raises(AggregatorError, match="max_event_future='2d' is longer than 1 days"):
        manual(f"sqlite:///{tmp_path / 'x.db'}", FakeClock(), max_event_future="2d")


def test_billable_record_at_1900_is_refused(agg: Aggregator) -> None:
    refused(agg, lambda: agg.record("cpu", 1, {"project": "p"}, at=dt.datetime(1900, 1, 1, tzinfo=UTC)),
            match="between 1970 and 2100")


@pytest.mark.parametrize("value", ["1e300000", "1e999000", "1e999999999", "9" * 65, "1e-99999", "0x10", "1_000",
                                   "1000000000000000000000000000040",  # hypothesis found: 31 digits, over 1e30
                                   " 1", "1e", "--1", "Infinity", "NaN", "-0.5"])
def test_decimal_text_is_checked_on_digits_and_exponent_before_conversion(agg: Aggregator, value: str) -> None:
    """'1e300000' once blocked 5 s (in-process '1e999000': 83 s) converting; '1e999999999' raised
    decimal.Overflow. Now the text is refused by its form before any conversion."""
    refused(agg, lambda: agg.record("cpu", value, {"project": "p"}), match="record\\('cpu'\\): value=")


@pytest.mark.parametrize("value", [2**63, -(2**63), 10**5000], ids=["2**63", "-2**63", "10**5000"])
def test_int_dimension_of_5000_digits_is_invalid_input(agg: Aggregator, value: int) -> None:
    """10**5000 once raised a bare ValueError (int digit limit) out of record()."""
    message = refused(agg, lambda: agg.record("cpu", 1, {"project": value}))
    assert len(message) < 300  # names the value without printing 5,000 digits


def test_meta_nested_5000_deep_is_invalid_input(agg: Aggregator) -> None:
    """Once a RecursionError out of checkpoint(); now refused by its depth, without recursion."""
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(5000):
        inner["a"] = {}
        inner = inner["a"]
    refused(agg, lambda: checkpoint(agg, meta=deep), match="nested deeper than 32")
    refused(agg, lambda: checkpoint(agg, meta={"n": 10**5000}), match="out of range")
    refused(agg, lambda: checkpoint(agg, meta={"x": float("nan")}), match="not a finite number")


@pytest.mark.parametrize("field", ["experience_id", "type", "feature_category"])
def test_names_are_matched_whole_so_a_trailing_newline_is_refused(agg: Aggregator, field: str) -> None:
    """"e\\n" once passed the name pattern (its `$`) and became an SLI row of its own."""
    refused(agg, lambda: checkpoint(agg, **{field: "search\n"}), match="must be 1-64 characters")
    refused(agg, lambda: checkpoint(agg, correlation_id=CID + "\n"), match="must be a ULID")


@pytest.mark.parametrize("value", ["a\x00b", "\ud800", "tab\there", "new\nline", "\x7f"])
def test_nul_control_characters_and_lone_surrogates_are_refused_in_dimensions(agg: Aggregator, value: str) -> None:
    """PostgreSQL cannot store NUL, nor anything a lone surrogate: once accepted, such a value failed every
    flush of its batch. Refused at the edge, naming the character and where it is."""
    message = refused(agg, lambda: agg.record("cpu", 1, {"project": value}), match="control character or lone")
    refused(agg, lambda: agg.record("seen", value), match="control character or lone")
    assert "remove it" in message


def test_dsn_with_a_non_numeric_port_is_a_message_and_exit_2() -> None:
    """Once a traceback and exit 1; the password stays masked."""
    result = run_cli("config", "check", env={"AGGREGATOR_DATABASE_URL": "postgresql://u:sekret@localhost:abc/db"})
    assert result.returncode == 2
    assert "the port is not a number" in result.stderr and "Traceback" not in result.stderr
    assert "sekret" not in result.stderr + result.stdout


@pytest.mark.parametrize("call", [
    lambda a: a.record_many(5),
    lambda a: a.record_many("cpu"),
    lambda a: a.record_many([5]),
    lambda a: a.record_many([{"meter": "cpu", "valu": 1}]),
    lambda a: a.record_many([{1: 2}]),
    lambda a: a.checkpoint_many(None),
    lambda a: a.checkpoint_many([[1, 2]]),
    lambda a: a.checkpoint_many([{"correlation_id": CID, 7: 1}]),
    lambda a: a.record("x" * 10**6),
    lambda a: a.record("cpu", 1, {"project": "p", **{f"k{i}": i for i in range(10**4)}}),
    lambda a: a.record("seen", 10**5000),
    lambda a: a.record("cpu", decimal.Decimal("1e999999999")),
    lambda a: a.record("cpu", decimal.Decimal("sNaN")),
    lambda a: a.record("cpu", 10**5000, {"project": "p"}),
    lambda a: a.record("cpu", float("inf"), {"project": "p"}),
    lambda a: a.track(uuid.UUID(int=1), uuid.UUID(int=1), at=10**5000),
    lambda a: a.track(uuid.UUID(int=1), uuid.UUID(int=1), at=dt.datetime.max.replace(tzinfo=UTC)),
    lambda a: a.track(uuid.UUID(int=1), uuid.UUID(int=1), at=dt.datetime.min.replace(tzinfo=UTC)),
    lambda a: a.track(uuid.UUID(int=1), uuid.UUID(int=1), at="2026-12-05T00:00:00Z"),
    lambda a: a.track("x" * 10**6, uuid.UUID(int=1)),
    lambda a: checkpoint(a, client_timestamp="9" * 10**5),
    lambda a: checkpoint(a, client_timestamp=10**5000),
    lambda a: checkpoint(a, meta={(1, 2): 3}),
    lambda a: checkpoint(a, meta={"x": object()}),
], ids=lambda _: "")
def test_everything_raised_from_the_public_api_is_an_aggregator_error(agg: Aggregator,
                                                                      call: Callable[[Aggregator], object]) -> None:
    """Hostile calls raise InvalidInput or InvalidType (also ValueError / TypeError), never a bare error,
    and their messages stay short whatever the size of the value."""
    before = pending(agg)
    with pytest.raises(AggregatorError) as raised:
        call(agg)
    assert isinstance(raised.value, InvalidInput | InvalidType)
    assert len(str(raised.value)) < 1000
    assert pending(agg) == before


# ---- the contract over generated input ---------------------------------------------------------------

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=8),
    st.decimals(allow_nan=True, allow_infinity=True), st.uuids(),
    st.datetimes(timezones=st.none() | st.timezones()),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    st.from_regex(r"[+-]?[0-9]{0,40}(\.[0-9]{0,40})?([eE][+-]?[0-9]{0,12})?", fullmatch=True),
)


@given(value=HOSTILE)
@settings(max_examples=400, deadline=None)
def test_every_check_of_the_edge_returns_or_raises_invalid_input(value: object) -> None:
    """Whatever it is given, a check returns a bounded value or raises InvalidInput/InvalidType."""
    checks: list[Callable[[], object]] = [
        lambda: values.uuid_int(value, "v"), lambda: values.count(value, "v"),
        lambda: values.moment(value, "v", now=T0), lambda: values.decimal_number(value, "v"),
        lambda: values.text(value, "v"), lambda: values.json_object({"v": value}, "v"),
        lambda: values.name(value, "v", values.re.compile("[a-z]{1,8}"), "a-z"),
    ]
    for check in checks:
        try:
            result = check()
        except (InvalidInput, InvalidType) as exc:
            assert len(str(exc)) < 1000
        else:
            if isinstance(result, float):
                assert values.EARLIEST <= result <= values.LATEST
            if isinstance(result, decimal.Decimal):
                assert result.is_finite() and 0 <= result <= 10**values.MAX_DECIMAL_EXPONENT


TRACK_CALL = st.fixed_dictionaries({
    "workspace_id": st.one_of(st.integers(1, 3).map(lambda i: uuid.UUID(int=i)), HOSTILE),
    "user_id": st.one_of(st.integers(1, 5).map(lambda i: str(uuid.UUID(int=i))), HOSTILE),
    "allowed": st.one_of(st.integers(0, 5), HOSTILE),
    "denied": st.one_of(st.integers(0, 2), HOSTILE),
    "at": st.one_of(st.none(), st.floats(T0 - 100, T0 + WINDOW - 1), HOSTILE),
})


def _fresh(tmp: str, clock: FakeClock) -> Aggregator:
    return manual(f"sqlite:///{tmp}/a.db", clock, meters=METERS, collect=True)


@given(calls=st.lists(TRACK_CALL, min_size=1, max_size=30))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_track_either_refuses_and_changes_nothing_or_counts_exactly(calls: list[dict[str, Any]]) -> None:
    """Over generated calls: refused ones raise an AggregatorError and leave the pending state as it was;
    the accepted ones, and only they, are in the reports, exactly."""
    clock = FakeClock(T0 + WINDOW - 1)
    truth: dict[int, list[Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, _fresh(tmp, clock) as agg:
        for call in calls:
            before = pending(agg)
            try:
                agg.track(**call)
            except AggregatorError:
                assert pending(agg) == before
                continue
            at = clock() if call["at"] is None else values.moment(call["at"])
            window = int(at // WINDOW) * WINDOW
            t = truth.setdefault(window, [set(), set(), 0, 0])
            t[0].add(values.uuid_int(call["workspace_id"], "w"))
            t[1].add(values.uuid_int(call["user_id"], "u"))
            t[2] += call["allowed"]
            t[3] += call["denied"]
        agg.flush()
        clock.t = T0 + 3 * WINDOW
        agg.flush()
        agg.collect()
        got = {int(r.window_start.timestamp()): (r.unique_workspaces, r.unique_users, r.allowed_requests,
                                                 r.denied_requests) for r in agg.reports()}
        assert {w: g for w, g in got.items() if g != (0, 0, 0, 0)} == {
            w: (len(t[0]), len(t[1]), t[2], t[3]) for w, t in truth.items()}


RECORD_VALUE = st.one_of(
    st.integers(0, 10**6), st.decimals(0, 10**6, places=4).map(str), st.floats(0, 10**6).map(lambda f: f),
    HOSTILE,
)


@given(amounts=st.lists(RECORD_VALUE, min_size=1, max_size=30))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_record_either_refuses_and_changes_nothing_or_sums_exactly(amounts: list[Any]) -> None:
    """A sum meter's values over generated input: refused ones change nothing, accepted ones add up to the
    millisecond (the meter's decimals), rounded half-even per record."""
    clock = FakeClock(T0 + 1)
    expected = decimal.Decimal(0)
    with tempfile.TemporaryDirectory() as tmp, _fresh(tmp, clock) as agg:
        for amount in amounts:
            before = pending(agg)
            try:
                agg.record("cpu", amount, {"project": "p"})
            except AggregatorError:
                assert pending(agg) == before
                continue
            exact = decimal.Decimal(repr(amount) if isinstance(amount, float) else amount)
            expected += exact.quantize(decimal.Decimal("0.001"), decimal.ROUND_HALF_EVEN)
        agg.flush()
        clock.past_window(T0)
        agg.flush()
        agg.collect()
        got = sum((r.quantity for r in agg.meter_results(meter="cpu")), decimal.Decimal(0))
        assert got == expected
