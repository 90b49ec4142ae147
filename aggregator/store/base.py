"""What the store's mixins (outbox, meters, experiences) may use of the Store they are mixed into."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection


class StoreBase(Protocol):
    dialect: str
    url: str

    def transaction(self) -> Any: ...

    def read(self) -> Any: ...

    def _insert(self, table: sa.Table) -> Any: ...

    async def _share_windows(self, conn: AsyncConnection, starts: Sequence[int], window: int) -> set[int]: ...

    async def _open_window_from(self, conn: AsyncConnection, start: int, window: int, closed: set[int]) -> int: ...

