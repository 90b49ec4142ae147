"""Range distinct: a per-day id rollup (exact) and per-window mergeable sketches (append-only).

New tables only, plus one ``aggregator_meta`` row: ``distinct_from``, the first reported window that still
has ids (0 on a new database; else the end of the last reported window if none has). The collector's
rollup fills the day rollup and sketches of the reported windows from it on, whose ids retention keeps
until then; the windows before it may have lost theirs, so they are entered as rolled up (nothing to
do) and range answers start at ``distinct_from``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-14 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_BigSerial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table('day_ids',
    sa.Column('day_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('dim', sa.String(length=80), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.PrimaryKeyConstraint('day_start', 'dim', 'id', name=op.f('pk_day_ids')),
    )
    op.create_table('distinct_sketches',
    sa.Column('id', _BigSerial, autoincrement=True, nullable=False),
    sa.Column('window_start', sa.BigInteger(), nullable=False),
    sa.Column('dim', sa.String(length=80), nullable=False),
    sa.Column('late', sa.Boolean(), nullable=False),
    sa.Column('sketch', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_distinct_sketches')),
    )
    op.create_index('ix_distinct_sketches_dim_window', 'distinct_sketches', ['dim', 'window_start'], unique=False)
    op.create_table('distinct_rollups',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('rolled_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('window_start', name=op.f('pk_distinct_rollups')),
    )
    bind = op.get_bind()
    # Retention drops the ids of reported windows oldest first, so those from the first reported window that
    # has ids on are whole (one primary-key probe per reported window).
    first = bind.scalar(sa.text(
        "SELECT MIN(w.window_start) FROM windows w WHERE w.closed_at IS NOT NULL "
        "AND EXISTS (SELECT 1 FROM window_ids i WHERE i.window_start = w.window_start)"))
    if first is None:
        first = bind.scalar(sa.text("SELECT MAX(window_end) FROM windows WHERE closed_at IS NOT NULL"))
    first = int(first or 0)
    bind.execute(sa.text("INSERT INTO distinct_rollups (window_start, rolled_at) SELECT window_start, 0 "
                         "FROM windows WHERE closed_at IS NOT NULL AND window_start < :first"), {"first": first})
    # Zero-padded so that text order is number order (the prune horizons kept beside it are compared so).
    meta = sa.table('aggregator_meta', sa.column('key', sa.String), sa.column('value', sa.String))
    op.bulk_insert(meta, [{'key': 'distinct_from', 'value': f"{first:020d}"}])


def downgrade() -> None:
    op.execute("DELETE FROM aggregator_meta WHERE key IN ('distinct_from', 'distinct_ids_before', "
               "'distinct_days_before')")
    op.drop_table('distinct_rollups')
    op.drop_index('ix_distinct_sketches_dim_window', table_name='distinct_sketches')
    op.drop_table('distinct_sketches')
    op.drop_table('day_ids')
