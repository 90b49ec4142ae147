"""Billable usage events: stable UUIDv7 ids, field mapping, the shipped schema, pseudonyms, Snowplow delivery."""

from __future__ import annotations

import decimal
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from aggregator import ConfigError, InvalidInput, billing, iglu, meters, privacy, writers
from aggregator.writers.snowplow import SnowplowWriter
from tests.fakes.snowplow import FakeCollector
from tests.helpers import T0, WINDOW

KEY = "k" * 32
CI = meters.Meter("ci_minutes", "sum", "seconds", dimensions=("project_id", "namespace_id", "subject", "runner"),
                  field="duration", decimals=3, billable=True, event_type="ci_build_minutes")
REQUESTS = meters.Meter("api_requests", "count", "requests", dimensions=("region",), billable=True)
DIMENSIONS = {"project_id": "p-1", "namespace_id": "n-2", "subject": "u-3", "runner": "linux-large"}


def event(meter: meters.Meter = CI, **changes: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {"window_start": T0, "window_end": T0 + WINDOW, "dimensions": DIMENSIONS,
                                 "quantity_units": 12345, "late": False, "realm": "saas",
                                 "instance_id": "instance-7", **changes}
    made = billing.billable_event(meter, **arguments)
    assert made is not None
    return made


def digest(value: str) -> str:
    return hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def validator() -> jsonschema.Draft4Validator:
    schema = iglu.load(billing.SCHEMA)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


def test_the_id_is_a_uuid7_with_the_window_as_its_time() -> None:
    """Version 7, RFC 9562 variant, and its 48-bit millisecond time is the window start."""
    eid = billing.event_id("ci_minutes", T0, meters.group_key(DIMENSIONS), False)
    assert (eid.version, eid.variant, eid.int >> 80) == (7, uuid.RFC_4122, T0 * 1000)


def test_the_id_is_stable_and_differs_by_each_input() -> None:
    """Same meter, window, group and lateness: same id; change any one of them: another id."""
    group = meters.group_key(DIMENSIONS)
    base = billing.event_id("ci_minutes", T0, group, False)
    assert base == billing.event_id("ci_minutes", T0, group, False)
    others = [billing.event_id("other", T0, group, False), billing.event_id("ci_minutes", T0 + WINDOW, group, False),
              billing.event_id("ci_minutes", T0, meters.group_key({**DIMENSIONS, "runner": "arm"}), False),
              billing.event_id("ci_minutes", T0, meters.OVERFLOW, False),
              billing.event_id("ci_minutes", T0, group, True)]
    assert len({base, *others}) == 6


def test_ids_sort_by_window() -> None:
    """Sorting ids sorts their windows, whatever the meter and group (they share nothing but the window)."""
    windows = [T0 + k * WINDOW for k in (5, 0, 3, 1, 4, 2)]
    made = {billing.event_id(f"m{k}", start, f'{{"g":"{k}"}}', k % 2 == 0): start for k, start in enumerate(windows)}
    assert sorted(windows) == [made[eid] for eid in sorted(made)]


def test_a_window_out_of_uuid7_range_is_refused() -> None:
    """A negative window start has no UUIDv7 time: InvalidInput names the value."""
    with pytest.raises(InvalidInput, match="window_start=-60 must be epoch seconds"):
        billing.event_id("ci_minutes", -60, "{}", False)


@pytest.mark.parametrize("units", [0, -5])
def test_no_quantity_no_event(units: int) -> None:
    """A group whose quantity is zero (or below) emits nothing."""
    assert billing.billable_event(CI, window_start=T0, window_end=T0 + WINDOW, dimensions=DIMENSIONS,
                                  quantity_units=units, late=False, realm="saas") is None


def test_fields_come_from_the_meter_the_window_and_the_dimensions() -> None:
    """project_id, namespace_id and subject are top-level; other dimensions go to metadata; 12345 units at 3
    decimals are 12.345; the id is the UUIDv7 of (meter, window, group, late)."""
    expected = {
        "event_id": str(billing.event_id("ci_minutes", T0, meters.group_key(DIMENSIONS), False)),
        "event_type": "ci_build_minutes", "unit_of_measure": "seconds", "realm": "saas",
        "timestamp": "2027-01-15T08:01:00Z", "quantity": 12.345, "instance_id": "instance-7", "project_id": "p-1",
        "namespace_id": "n-2", "subject": "u-3",
        "metadata": {"meter": "ci_minutes", "window_start": "2027-01-15T08:00:00Z",
                     "window_end": "2027-01-15T08:01:00Z", "late": False, "dimensions": {"runner": "linux-large"}},
    }
    assert expected == event()
    assert '"quantity": 12.345' in json.dumps(event())


def test_absent_optional_fields_are_left_out_never_null() -> None:
    """A meter without project/namespace/subject dimensions and no instance id: those keys are absent;
    without decimals the quantity is an int and event_type defaults to the meter's name."""
    made = event(REQUESTS, dimensions={"region": "eu"}, quantity_units=7, instance_id=None, late=True)
    assert {"event_id", "event_type", "unit_of_measure", "realm", "timestamp", "quantity", "metadata"} == set(made)
    assert ("api_requests", 7, int) == (made["event_type"], made["quantity"], type(made["quantity"]))
    assert made["metadata"]["dimensions"] == {"region": "eu"}
    assert made["metadata"]["late"] is True
    assert None not in made.values()


def test_the_overflow_group_has_no_dimensions_and_says_so() -> None:
    """The overflow group: id from OVERFLOW, no dimension fields, metadata.overflow true."""
    made = event(dimensions={}, group_key=meters.OVERFLOW)
    assert str(billing.event_id("ci_minutes", T0, meters.OVERFLOW, False)) == made["event_id"]
    assert not {"project_id", "namespace_id", "subject"} & set(made)
    assert (made["metadata"]["dimensions"], made["metadata"]["overflow"]) == ({}, True)
    with pytest.raises(InvalidInput, match="pass dimensions={} with it"):
        event(group_key=meters.OVERFLOW)


@pytest.mark.parametrize(("units", "decimals", "quantity"), [
    (12345, 3, 12.345), (1, 9, 1e-9), (999_999_999_999_999, 9, 999999.999999999), (10**15 - 1, 3, 999999999999.999),
    (5, 0, 5), (2**63 - 1, 0, 2**63 - 1),
])
def test_quantities_are_exact_in_json(units: int, decimals: int, quantity: float) -> None:
    """Below 10**15 units the JSON number reads back as the exact decimal; without decimals it is the integer."""
    meter = meters.Meter("m", "sum", "s", decimals=decimals, billable=True)
    made = event(meter, dimensions={}, quantity_units=units)
    assert (quantity, type(quantity)) == (made["quantity"], type(made["quantity"]))
    assert meter.from_units(units) == decimal.Decimal(json.dumps(made["quantity"]))


def test_every_event_matches_the_shipped_schema(validator: jsonschema.Draft4Validator) -> None:
    """Full, minimal, late, overflow and 256-character dimension events all validate (Draft 4 + formats)."""
    made = [event(), event(late=True), event(REQUESTS, dimensions={"region": "eu"}, instance_id=None),
            event(dimensions={}, group_key=meters.OVERFLOW),
            event(dimensions={name: "x" * 256 for name in DIMENSIONS}, instance_id="i" * 256)]
    assert [[] for _ in made] == [[e.message for e in validator.iter_errors(m)] for m in made]


@pytest.mark.parametrize(("changes", "path"), [
    ({"quantity": 0}, "$.quantity"), ({"project_id": None}, "$.project_id"), ({"extra": 1}, "$"),
    ({"timestamp": "yesterday"}, "$.timestamp"), ({"event_id": "not-a-uuid"}, "$.event_id"),
])
def test_the_schema_refuses_what_billing_never_makes(validator: jsonschema.Draft4Validator,
                                                     changes: dict[str, Any], path: str) -> None:
    """Zero quantity, nulls, unknown fields, bad timestamps and ids are schema errors."""
    errors = list(validator.iter_errors({**event(), **changes}))
    assert [path] == [e.json_path for e in errors]


def test_identifiers_are_hashed_and_allowlisted_paths_stay_clear(validator: jsonschema.Draft4Validator) -> None:
    """instance, project, namespace, subject and dimension values are hashed; metadata.dimensions.runner,
    allowlisted, stays in clear; the result still matches the schema."""
    out = privacy.Pseudonymizer(KEY, allowlist=["metadata.dimensions.runner"]).apply(billing.KIND, event())
    expected = {name: digest(value) for name, value in
                {"instance_id": "instance-7", "project_id": "p-1", "namespace_id": "n-2", "subject": "u-3"}.items()}
    assert expected == {name: out[name] for name in expected}
    assert out["metadata"]["dimensions"] == {"runner": "linux-large"}
    hashed = privacy.Pseudonymizer(KEY).apply(billing.KIND, event())
    assert {"runner": digest("linux-large")} == hashed["metadata"]["dimensions"]
    assert [] == list(validator.iter_errors(out)) == list(validator.iter_errors(hashed))


def test_identifier_paths_have_any_depth_and_wildcards_at_any_level() -> None:
    """``*`` works at every level; a value named by two declared paths is hashed once; allowlisting a declared
    path clears all it matches, a concrete path only itself; None, absent and non-map steps are left alone."""
    fields = {"k": ("*.ids.*", "a.ids.x", "deep.b.c.d")}
    data = {"a": {"ids": {"x": "1", "y": None}}, "b": {"ids": {"z": "2"}, "other": "3"}, "c": "flat",
            "deep": {"b": {"c": {"d": "4"}}}}
    out = privacy.Pseudonymizer(KEY, fields=fields).apply("k", data)
    assert out == {"a": {"ids": {"x": digest("1"), "y": None}}, "b": {"ids": {"z": digest("2")}, "other": "3"},
                   "c": "flat", "deep": {"b": {"c": {"d": digest("4")}}}}
    assert data["a"] == {"ids": {"x": "1", "y": None}}
    cleared = privacy.Pseudonymizer(KEY, allowlist=["*.ids.*", "b.ids.z"], fields=fields).apply("k", data)
    assert cleared["a"]["ids"]["x"] == digest("1")  # still declared as a.ids.x, which is not allowlisted
    assert cleared["b"] == data["b"]


def test_without_a_key_billable_identifiers_must_be_allowlisted() -> None:
    """require() names every billable identifier path until all are allowlisted (the wildcard path itself too)."""
    paths = ["instance_id", "metadata.dimensions.*", "namespace_id", "project_id", "subject"]
    with pytest.raises(ConfigError, match=r"\(" + r", ".join(paths).replace("*", r"\*")):
        privacy.Pseudonymizer(None).require([billing.KIND], "aggregator export")
    privacy.Pseudonymizer(None, allowlist=paths).require([billing.KIND], "aggregator export")


async def test_the_snowplow_writer_delivers_a_billable_event(collector: FakeCollector) -> None:
    """An envelope of kind billable_usage passes the writer's and the collector's schema checks."""
    data = privacy.Pseudonymizer(KEY).apply(billing.KIND, event())
    envelopes = [writers.Envelope(event_id=uuid.UUID(data["event_id"]), kind=billing.KIND, schema=billing.SCHEMA,
                                  occurred_at=T0 + WINDOW, data=data),
                 writers.Envelope(event_id=uuid.uuid4(), kind=billing.KIND, schema=billing.SCHEMA,
                                  occurred_at=T0 + WINDOW, data=event(dimensions={}, group_key=meters.OVERFLOW))]
    writer = SnowplowWriter.from_config("sp", {"collector": collector.url})
    await writer.open()
    try:
        outcomes = await writer.send(envelopes)
    finally:
        await writer.close()
    assert [o.status for o in outcomes] == ["delivered", "delivered"]
    assert collector.invalid == []
    assert [(billing.SCHEMA, e.data) for e in envelopes] == [(g["schema"], g["data"]) for g in collector.good]
