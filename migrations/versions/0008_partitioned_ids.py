"""PostgreSQL: window ids in day partitions, so that retention drops whole days instead of deleting rows.

The table as it was becomes the partition ``window_ids_legacy`` for every window start up to the end of
today (or of the last day it holds, if later): attached without copying a row (a CHECK constraint spares
the scan), and dropped whole by the collector's prune once all its windows are reported and past
retention. Then a DEFAULT partition and the days ahead. SQLite keeps one table: nothing changes there.
On an empty database no legacy partition is kept.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-15 10:00:00
"""

from __future__ import annotations

import time

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_COLUMNS = "window_start BIGINT NOT NULL, dim SMALLINT NOT NULL, id UUID NOT NULL"
_DAY = 86400
_AHEAD_DAYS = 2  # as aggregator/store/partitions.py at this revision; the engine reads bounds, not names


def _day_name(day: int) -> str:
    return f"window_ids_d{time.strftime('%Y%m%d', time.gmtime(day))}"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    bind = op.get_bind()
    last = bind.exec_driver_sql("SELECT max(window_start) FROM window_ids").scalar()
    op.execute("ALTER TABLE window_ids RENAME TO window_ids_legacy")
    op.execute("ALTER TABLE window_ids_legacy RENAME CONSTRAINT pk_window_ids TO pk_window_ids_legacy")
    op.execute(f"CREATE TABLE window_ids ({_COLUMNS}, CONSTRAINT pk_window_ids PRIMARY KEY (window_start, dim, id)) "
               "PARTITION BY RANGE (window_start)")
    bound = int(max(time.time(), float(last) if last is not None else 0.0)) // _DAY * _DAY + _DAY
    if last is None:
        op.execute("DROP TABLE window_ids_legacy")
    else:
        op.execute(f"ALTER TABLE window_ids_legacy ADD CONSTRAINT ck_window_ids_legacy_bound "
                   f"CHECK (window_start < {bound})")
        op.execute(f"ALTER TABLE window_ids ATTACH PARTITION window_ids_legacy FOR VALUES FROM (MINVALUE) TO ({bound})")
    op.execute("CREATE TABLE window_ids_default PARTITION OF window_ids DEFAULT")
    first = bound if last is not None else int(time.time()) // _DAY * _DAY
    for day in range(first, bound + _AHEAD_DAYS * _DAY, _DAY):
        op.execute(f"CREATE TABLE {_day_name(day)} PARTITION OF window_ids FOR VALUES FROM ({day}) TO ({day + _DAY})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE window_ids RENAME TO window_ids_partitioned")
    op.execute("ALTER TABLE window_ids_partitioned RENAME CONSTRAINT pk_window_ids TO pk_window_ids_partitioned")
    op.execute(f"CREATE TABLE window_ids ({_COLUMNS}, CONSTRAINT pk_window_ids PRIMARY KEY (window_start, dim, id))")
    op.execute("INSERT INTO window_ids SELECT window_start, dim, id FROM window_ids_partitioned")
    op.execute("DROP TABLE window_ids_partitioned")  # its partitions go with it
