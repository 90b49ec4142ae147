"""What the store's parts (outbox, meters, experiences, ...) may use of the Store, and how to read its errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error as SQLAlchemy wraps it (``orig``, or the driver's own under it)."""
    orig = getattr(exc, "orig", None) or exc
    for candidate in (orig, orig.__cause__):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


class StoreBase(Protocol):
    dialect: str
    url: str
    quarantined: dict[str, int] | None
    quarantine_statuses: dict[str, dict[str, int]]

    def transaction(self) -> Any: ...

    def read(self) -> Any: ...

    def _insert(self, table: sa.Table) -> Any: ...

    async def _share_windows(self, conn: AsyncConnection, starts: Sequence[int], window: int) -> set[int]: ...

    async def _open_window_from(self, conn: AsyncConnection, start: int, window: int, closed: set[int]) -> int: ...

    async def _lock_window(self, conn: AsyncConnection, start: int, *, wait: bool) -> bool: ...

