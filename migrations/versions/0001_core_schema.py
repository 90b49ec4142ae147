"""Core schema: windows, distinct ids, contributions, flush sequences, reports, collector lock.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-24 18:48:27.380836
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('aggregator_meta',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_aggregator_meta'))
    )
    op.create_table('collector_lock',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('holder', sa.String(length=200), nullable=True),
    sa.Column('acquired_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_collector_lock'))
    )
    op.create_table('contributions',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('replica_id', sa.String(length=200), nullable=False),
    sa.Column('allowed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('denied', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('ontime', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('late_allowed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('late_denied', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('late_workspaces', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('late_users', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('window_start', 'replica_id', name=op.f('pk_contributions'))
    )
    op.create_table('flush_sequences',
    sa.Column('writer_id', sa.Uuid(), nullable=False),
    sa.Column('replica_id', sa.String(length=200), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('writer_id', name=op.f('pk_flush_sequences'))
    )
    op.create_table('reports',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('window_start', sa.BigInteger(), nullable=False),
    sa.Column('window_end', sa.BigInteger(), nullable=False),
    sa.Column('unique_workspaces', sa.BigInteger(), nullable=False),
    sa.Column('unique_users', sa.BigInteger(), nullable=False),
    sa.Column('allowed_requests', sa.BigInteger(), nullable=False),
    sa.Column('denied_requests', sa.BigInteger(), nullable=False),
    sa.Column('replicas', sa.Integer(), nullable=False),
    sa.Column('late_allowed_requests', sa.BigInteger(), nullable=False),
    sa.Column('late_denied_requests', sa.BigInteger(), nullable=False),
    sa.Column('late_unique_workspaces', sa.BigInteger(), nullable=False),
    sa.Column('late_unique_users', sa.BigInteger(), nullable=False),
    sa.Column('generated_at', sa.Float(), nullable=False),
    sa.Column('generated_by', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reports')),
    sa.UniqueConstraint('window_start', name=op.f('uq_reports_window_start'))
    )
    op.create_table('window_ids',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('dim', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.PrimaryKeyConstraint('window_start', 'dim', 'id', name=op.f('pk_window_ids'))
    )
    op.create_table('windows',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('window_end', sa.BigInteger(), nullable=False),
    sa.Column('closed_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('window_start', name=op.f('pk_windows'))
    )
    # The one row a collector locks FOR UPDATE while it writes a report.
    op.execute(sa.text("INSERT INTO collector_lock (id) VALUES (1)"))


def downgrade() -> None:
    op.drop_table('windows')
    op.drop_table('window_ids')
    op.drop_table('reports')
    op.drop_table('flush_sequences')
    op.drop_table('contributions')
    op.drop_table('collector_lock')
    op.drop_table('aggregator_meta')
