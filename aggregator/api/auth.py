"""The bearer-token check: which checkpoint types a caller's token is limited to, and who may read and send.

It must never tell by timing which token nearly matched (every token is compared, always), nor let a token
limited to checkpoint types through to track, record or the pull API.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aggregator import metrics, options

BEARER = HTTPBearer(auto_error=False, description="a token from api_tokens (AGGREGATOR_API_TOKENS)")


@dataclasses.dataclass(frozen=True)
class Access:
    """One app's token check, as FastAPI dependencies."""

    required: bool  # tokens are configured (else: loopback only, see options)
    scope: Callable[..., frozenset[str] | None]  # the checkpoint types a token is limited to (None: any use)
    authorized: Callable[..., None]  # track, record and pull: a token not limited to checkpoint types


def access(api_tokens: tuple[str, ...], counters: metrics.Counters) -> Access:
    """The check of ``api_tokens`` (as configured: ``token`` or ``token:type|type``); refusals counted."""
    tokens = [(token.encode(), types) for token, types in options.token_scopes(api_tokens)]

    def scope(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
              ) -> frozenset[str] | None:
        """The checkpoint types the caller's token is limited to (None: any use); 401 without a valid token."""
        if not tokens:
            return None  # no tokens configured: allowed only on a loopback address (see options)
        given = credentials.credentials.encode() if credentials is not None else b""
        # Compare against every token, always, so timing says nothing about which one nearly matched.
        found: frozenset[str] | None = None
        matched = False
        for token, types in tokens:
            hit = hmac.compare_digest(given, token)
            matched |= hit
            if hit:
                found = types
        if not matched:
            counters.rejected["unauthorized"] += 1
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        return found

    # The dependency as a default, not in Annotated: `scope` is local, and annotations here are strings.
    def authorized(types: frozenset[str] | None = Depends(scope)) -> None:  # noqa: B008
        """Track, record and pull need a token that is not limited to checkpoint types."""
        if types is not None:
            counters.rejected["forbidden"] += 1
            raise HTTPException(403, "this token may only send checkpoints (of types "
                                     f"{', '.join(sorted(types))})")

    return Access(bool(tokens), scope, authorized)


__all__ = ["BEARER", "Access", "access"]
