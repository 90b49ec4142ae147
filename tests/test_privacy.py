"""Pseudonymization: keyed, deterministic, allowlist-aware, general over nested fields; keys are checked."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from aggregator import ConfigError
from aggregator.privacy import IDENTIFIER_FIELDS, Pseudonymizer

KEY = "0123456789abcdef0123456789abcdef"
FIELDS = {"usage_report": ("generated_by",), "billable": ("subject", "dimensions.*"),
          "meter": ("dimensions.project_id",)}


def digest(key: str, value: str) -> str:
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()


def test_identifiers_become_the_hmac_of_their_text_and_other_fields_stay() -> None:
    """generated_by becomes HMAC-SHA256(key, value) in hex; counts are untouched; the input is not modified."""
    record = {"generated_by": "host-1-abc", "unique_users": 3}
    out = Pseudonymizer(KEY).apply("usage_report", record)
    assert out == {"generated_by": digest(KEY, "host-1-abc"), "unique_users": 3}
    assert record["generated_by"] == "host-1-abc"


def test_pseudonyms_are_deterministic_per_key_and_differ_between_keys() -> None:
    """Same key, same pseudonym (joins across reports work); another key, another pseudonym."""
    a, b = Pseudonymizer(KEY), Pseudonymizer(KEY)
    other = Pseudonymizer("f" * 32)
    assert a.hash("ws-1") == b.hash("ws-1") != other.hash("ws-1")
    assert a.hash("ws-1") != a.hash("ws-2")
    assert len(a.hash("ws-1")) == 64


def test_nested_maps_and_the_allowlist() -> None:
    """``dimensions.*`` hashes every value of the map; an allowlisted path leaves in clear; None stays None."""
    p = Pseudonymizer(KEY, allowlist=["dimensions.namespace_id"], fields=FIELDS)
    out = p.apply("billable", {"subject": "u-1", "dimensions": {"project_id": "p-9", "namespace_id": "n-3",
                                                                 "runner": None}, "quantity": 5})
    assert out == {"subject": digest(KEY, "u-1"), "dimensions": {
        "project_id": digest(KEY, "p-9"), "namespace_id": "n-3", "runner": None}, "quantity": 5}
    named = p.apply("meter", {"dimensions": {"project_id": 42, "region": "eu"}})
    assert named == {"dimensions": {"project_id": digest(KEY, "42"), "region": "eu"}}
    assert p.apply("unknown_kind", {"subject": "u-1"}) == {"subject": "u-1"}


def test_without_a_key_a_writer_that_would_emit_identifiers_is_refused() -> None:
    """No key: require() names the fields and both fixes; once they are allowlisted, it passes."""
    with pytest.raises(ConfigError, match=r"writer 'jsonl' would send identifiers \(generated_by\).*"
                                          r"AGGREGATOR_PSEUDONYM_KEY.*pseudonym_allowlist"):
        Pseudonymizer(None).require(["usage_report"], "writer 'jsonl'")
    Pseudonymizer(None, allowlist=["generated_by"]).require(["usage_report"], "writer 'jsonl'")
    Pseudonymizer(KEY).require(IDENTIFIER_FIELDS, "writer 'jsonl'")
    with pytest.raises(ConfigError, match="project_id"):  # billable events carry more identifiers
        Pseudonymizer(None, allowlist=["generated_by"]).require(IDENTIFIER_FIELDS, "writer 'jsonl'")


def test_a_short_key_is_refused_without_echoing_it() -> None:
    """A key under 16 bytes is an error that gives its length and how to make one, never the key."""
    with pytest.raises(ConfigError, match="is 9 bytes; use at least 16") as caught:
        Pseudonymizer("short-key")
    assert "short-key" not in str(caught.value)
