"""Replica watermarks: each incarnation's watermark, liveness and clean stop; reports say what is missing.

Adds nullable columns and a column with a default: every existing row and report stays as it was
(old reports read ``replicas_missing = 0``, which is what the collector of that time assumed).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 20:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('flush_sequences') as batch:
        batch.add_column(sa.Column('watermark', sa.Float(), nullable=True))
        batch.add_column(sa.Column('heartbeat_at', sa.Float(), nullable=True))
        batch.add_column(sa.Column('stopped_at', sa.Float(), nullable=True))
    # Incarnations from before watermarks published none; they hold no window back (a NULL watermark
    # is ignored by the collector too, for replicas of the older version still running during an upgrade).
    op.execute("UPDATE flush_sequences SET stopped_at = updated_at")
    with op.batch_alter_table('reports') as batch:
        batch.add_column(sa.Column('replicas_missing', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('reports') as batch:
        batch.drop_column('replicas_missing')
    with op.batch_alter_table('flush_sequences') as batch:
        batch.drop_column('stopped_at')
        batch.drop_column('heartbeat_at')
        batch.drop_column('watermark')
