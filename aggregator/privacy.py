"""Pseudonymization: identifiers are replaced by keyed hashes before anything leaves the system.

Each kind of outgoing record declares which of its fields are identifiers, as dotted paths of any depth:
``generated_by``, ``dimensions.project_id``, or ``metadata.dimensions.*`` (``*``: every key of a map).
An identifier becomes ``HMAC-SHA256(key, str(value))`` in hex, deterministic for a given key, so the same
id joins across reports without being readable. Allowlisted paths leave in clear: a declared path (all
it matches) or a concrete one (``metadata.dimensions.runner``). Without a key, a writer that would emit
an identifier not on the allowlist refuses to start (``require()``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeAlias

from aggregator import exceptions

# Identifier paths per kind of outgoing record. Kinds not listed carry no identifiers.
IDENTIFIER_FIELDS: dict[str, tuple[str, ...]] = {
    # The collector that wrote the report: host name, pid and a random suffix.
    "usage_report": ("generated_by",),
    # Billable usage events: the instance, project, namespace and subject billed, and the other dimensions.
    "billable_usage": ("instance_id", "project_id", "namespace_id", "subject", "metadata.dimensions.*"),
    # A timed-out experience: the journey's correlation id (the service's logs may tie it to a user).
    "experience_failure": ("correlation_id",),
}
MIN_KEY_BYTES = 16
# Identifiers to hash, as a tree of keys: None marks a value to hash whole.
_Tree: TypeAlias = dict[str, "_Tree | None"]


class Pseudonymizer:
    """Replaces identifier fields by HMAC-SHA256 hex digests under ``key``."""

    def __init__(self, key: str | bytes | None, allowlist: Iterable[str] = (),
                 fields: Mapping[str, tuple[str, ...]] | None = None) -> None:
        if isinstance(key, str):
            key = key.encode()
        if key is not None and len(key) < MIN_KEY_BYTES:
            # The key is a secret: say how long it is, never what it is.
            raise exceptions.ConfigError(
                f"pseudonym_key is {len(key)} bytes; use at least {MIN_KEY_BYTES}, e.g. from "
                "`python3 -c 'import secrets; print(secrets.token_hex(32))'`")
        self._key = key
        self.allowlist = frozenset(allowlist)
        self.fields = dict(IDENTIFIER_FIELDS if fields is None else fields)

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def hash(self, value: object) -> str:
        """``value``'s pseudonym: HMAC-SHA256 of its text under the key, hex-encoded."""
        if self._key is None:
            raise exceptions.ConfigError("no pseudonym_key is set; set AGGREGATOR_PSEUDONYM_KEY")
        return hmac.new(self._key, str(value).encode(), hashlib.sha256).hexdigest()

    def exposed(self, kind: str) -> list[str]:
        """Identifier paths of ``kind`` that are not on the allowlist (they leave hashed)."""
        return [path for path in self.fields.get(kind, ()) if path not in self.allowlist]

    def require(self, kinds: Iterable[str], who: str) -> None:
        """Raise ConfigError if ``who`` would emit identifiers of ``kinds`` and there is no key to hash them."""
        if self._key is not None:
            return
        exposed = sorted({path for kind in kinds for path in self.exposed(kind)})
        if exposed:
            raise exceptions.ConfigError(
                f"{who} would send identifiers ({', '.join(exposed)}) and no pseudonym_key is set; set "
                "AGGREGATOR_PSEUDONYM_KEY (at least 16 bytes), or list the fields in pseudonym_allowlist "
                "to send them in clear")

    def apply(self, kind: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``data`` with every identifier of ``kind`` not on the allowlist hashed.

        Maps on the way to an identifier are copied, never changed in place. A value matched by several
        declared paths is hashed once; a None or absent value, or a path through something that is not
        a map, is left as it is.
        """
        targets: _Tree = {}
        for declared in self.fields.get(kind, ()):
            for keys in _matches(data, declared.split(".")):
                if declared not in self.allowlist and ".".join(map(str, keys)) not in self.allowlist:
                    _plant(targets, keys)
        return self._rebuild(data, targets)

    def _rebuild(self, values: Mapping[str, Any], targets: _Tree) -> dict[str, Any]:
        out = dict(values)
        for name, below in targets.items():
            out[name] = self.hash(out[name]) if below is None else self._rebuild(out[name], below)
        return out


def _matches(values: Mapping[str, Any], steps: list[str], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The concrete key paths in ``values`` that ``steps`` (``*`` for every key of a map) names."""
    step, rest = steps[0], steps[1:]
    for name in (list(values) if step == "*" else [step] if step in values else []):
        value = values[name]
        if value is None:
            continue
        if not rest:
            yield (*prefix, name)
        elif isinstance(value, Mapping):
            yield from _matches(value, rest, (*prefix, name))


def _plant(tree: _Tree, keys: tuple[str, ...]) -> None:
    """Add ``keys`` to ``tree``; a value hashed whole absorbs any deeper path into it."""
    head, rest = keys[0], keys[1:]
    if not rest:
        tree[head] = None  # the whole value is hashed, whatever else was declared under it
        return
    below = tree.setdefault(head, {})
    if below is not None:
        _plant(below, rest)


__all__ = ["IDENTIFIER_FIELDS", "MIN_KEY_BYTES", "Pseudonymizer"]
