"""Iglu schemas shipped with aggregator (``VENDOR/NAME/jsonschema/X-Y-Z`` layout) and validation against them."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

# The version reports are sent with. Earlier versions stay shipped: an outbox item keeps the schema it
# was queued with (1-0-0 before ``replicas_missing``), and is validated and delivered under it.
USAGE_REPORT = "iglu:dev.aggregator/usage_report/jsonschema/1-0-1"


@functools.cache
def load(uri: str) -> dict[str, Any]:
    """The JSON Schema for ``uri`` (``iglu:VENDOR/NAME/FORMAT/VERSION``) from the package's files."""
    if not uri.startswith("iglu:"):
        raise ValueError(f"{uri!r} is not an Iglu URI (iglu:VENDOR/NAME/FORMAT/VERSION)")
    path = resources.files(__package__).joinpath(*uri.removeprefix("iglu:").split("/"))
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema
