"""Pseudonymization: identifiers are replaced by keyed hashes before anything leaves the system.

Each kind of outgoing record declares which of its fields are identifiers, as dotted paths of any depth:
``generated_by``, ``dimensions.project_id``, or ``metadata.dimensions.*`` (``*``: every key of a map).
An identifier becomes ``HMAC-SHA256(key, str(value))`` in hex, deterministic for a given key, so the same
id joins across reports without being readable. Allowlisted paths leave in clear: a declared path (all
it matches) or a concrete one (``metadata.dimensions.runner``). Without a key, a writer that would emit
an identifier not on the allowlist refuses to start (``require()``).

Event ids are derived from what an item counts, so that a redelivery carries the same id; for some kinds
that includes identifiers (a billable group's dimensions, a journey's correlation id), and anyone could
confirm a guess against an unkeyed id. The store keeps that unkeyed id (the outbox's idempotency key);
what leaves is ``event_id()``: the same UUID version, its other bits from HMAC-SHA256 under the key.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
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
# Kinds whose event ids are derived from identifiers, with the payload field that repeats the id (None:
# only the envelope carries it). Their ids leave keyed; other kinds' ids (a report's window, an SLI's
# window, experience and urgency) are derived from no identifier and leave as they are.
KEYED_EVENT_IDS: dict[str, str | None] = {"billable_usage": "event_id", "experience_failure": None}
MIN_KEY_BYTES = 16
_UUID_BITS = (1 << 128) - 1
_VERSION_AND_VARIANT = 0xF << 76 | 0b11 << 62
_UUID7_TIME = ((1 << 48) - 1) << 80  # unix_ms: ids keep sorting by their window
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
        # Event ids get a key of their own, so no pseudonym of a value can ever equal an id's bits.
        self._id_key = None if key is None else hmac.new(key, b"aggregator event id", hashlib.sha256).digest()
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

    def event_id(self, kind: str, internal: uuid.UUID) -> uuid.UUID:
        """The id that item ``internal`` (the id the store keeps) of ``kind`` leaves with.

        For a kind of ``KEYED_EVENT_IDS``: ``internal``'s version and variant bits (and a UUIDv7's
        millisecond time), the other bits from HMAC-SHA256 of ``internal`` under the key. Deterministic,
        so every delivery of an item, from any replica, carries one id; without the key no guess of the
        identifiers behind it can be checked against it. Without a key the id leaves as it is only if
        the identifiers it derives from leave in clear anyway (all on the allowlist).
        """
        if kind not in KEYED_EVENT_IDS:
            return internal
        if self._id_key is None:
            if self.exposed(kind):
                raise exceptions.ConfigError(
                    f"{kind} event ids are derived from identifiers ({', '.join(self.exposed(kind))}) and no "
                    "pseudonym_key is set; set AGGREGATOR_PSEUDONYM_KEY (at least 16 bytes)")
            return internal
        digest = hmac.new(self._id_key, kind.encode() + b"\x00" + internal.bytes, hashlib.sha256).digest()
        kept = _VERSION_AND_VARIANT | (_UUID7_TIME if internal.version == 7 else 0)
        return uuid.UUID(int=internal.int & kept | int.from_bytes(digest[:16], "big") & ~kept & _UUID_BITS)

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
        a map, is left as it is. An event id in the payload (``KEYED_EVENT_IDS``) becomes ``event_id()``.
        """
        targets: _Tree = {}
        for declared in self.fields.get(kind, ()):
            for keys in _matches(data, declared.split(".")):
                if declared not in self.allowlist and ".".join(map(str, keys)) not in self.allowlist:
                    _plant(targets, keys)
        out = self._rebuild(data, targets)
        field = KEYED_EVENT_IDS.get(kind)
        if field is not None and out.get(field) is not None:
            out[field] = str(self.event_id(kind, uuid.UUID(str(out[field]))))
        return out

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


__all__ = ["IDENTIFIER_FIELDS", "KEYED_EVENT_IDS", "MIN_KEY_BYTES", "Pseudonymizer"]
