"""Range distinct: a per-day id rollup (exact) and per-window mergeable sketches (append-only).

New tables only, plus one ``aggregator_meta`` row: ``distinct_from``, the end of the last window reported
before this revision (0 on a new database). Windows reported before it have no rollup or sketch, so
range answers start after it.

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
    # Zero-padded so that text order is number order (the prune horizons kept beside it are compared so).
    last_end = op.get_bind().scalar(sa.text("SELECT MAX(window_end) FROM windows WHERE closed_at IS NOT NULL"))
    meta = sa.table('aggregator_meta', sa.column('key', sa.String), sa.column('value', sa.String))
    op.bulk_insert(meta, [{'key': 'distinct_from', 'value': f"{int(last_end or 0):020d}"}])


def downgrade() -> None:
    op.execute("DELETE FROM aggregator_meta WHERE key IN ('distinct_from', 'distinct_ids_before', "
               "'distinct_days_before')")
    op.drop_index('ix_distinct_sketches_dim_window', table_name='distinct_sketches')
    op.drop_table('distinct_sketches')
    op.drop_table('day_ids')
