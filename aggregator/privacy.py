"""Pseudonymization: identifiers are replaced by keyed hashes before anything leaves the system.

Each kind of outgoing record declares which of its fields are identifiers, as paths: ``generated_by``,
``dimensions.project_id``, or ``dimensions.*`` for every value of a map. An identifier becomes
``HMAC-SHA256(key, str(value))`` in hex, deterministic for a given key, so the same id joins across
reports without being readable. Paths on the allowlist leave in clear. Without a key, a writer that
would emit an identifier not on the allowlist refuses to start (``require()``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from aggregator import exceptions

# Identifier paths per kind of outgoing record. Kinds not listed carry no identifiers.
IDENTIFIER_FIELDS: dict[str, tuple[str, ...]] = {
    # The collector that wrote the report: host name, pid and a random suffix.
    "usage_report": ("generated_by",),
}
MIN_KEY_BYTES = 16


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
        """A copy of ``data`` with every identifier of ``kind`` not on the allowlist hashed."""
        out = dict(data)
        for path in self.fields.get(kind, ()):
            head, _, rest = path.partition(".")
            if head not in out or out[head] is None:
                continue
            if not rest:
                if path not in self.allowlist:
                    out[head] = self.hash(out[head])
            elif isinstance(out[head], Mapping):
                out[head] = self._apply_map(head, rest, out[head])
        return out

    def _apply_map(self, head: str, rest: str, values: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(values)
        names = list(out) if rest == "*" else [rest] if rest in out else []
        for name in names:
            if out[name] is not None and f"{head}.{name}" not in self.allowlist:
                out[name] = self.hash(out[name])
        return out


__all__ = ["IDENTIFIER_FIELDS", "MIN_KEY_BYTES", "Pseudonymizer"]
