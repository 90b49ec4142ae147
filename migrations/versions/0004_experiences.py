"""Experiences: journeys from checkpoints, their dedup, and SLIs per window.

Adds tables only: every existing row and report stays as it was.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 21:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('experience_categories',
    sa.Column('experience_id', sa.String(length=64), nullable=False),
    sa.Column('checkpoint_category', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('experience_id', 'checkpoint_category', name=op.f('pk_experience_categories'))
    )
    op.create_table('experience_checkpoints',
    sa.Column('correlation_id', sa.String(length=26), nullable=False),
    sa.Column('checkpoint', sa.String(length=16), nullable=False),
    sa.Column('checkpoint_category', sa.String(length=64), nullable=False),
    sa.Column('client_timestamp', sa.Float(), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('meta', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('correlation_id', 'checkpoint', 'checkpoint_category', 'client_timestamp',
                            name=op.f('pk_experience_checkpoints'))
    )
    op.create_index(op.f('ix_experience_checkpoints_received_at'), 'experience_checkpoints', ['received_at'],
                    unique=False)
    op.create_table('experiences',
    sa.Column('correlation_id', sa.String(length=26), nullable=False),
    sa.Column('experience_id', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('feature_category', sa.String(length=64), nullable=False),
    sa.Column('urgency', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('first_seen_at', sa.Float(), nullable=False),
    sa.Column('deadline', sa.Float(), nullable=True),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('ended_at', sa.Float(), nullable=True),
    sa.Column('start_window', sa.BigInteger(), nullable=True),
    sa.Column('outcome_window', sa.BigInteger(), nullable=True),
    sa.Column('unknown_start', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('late_end', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.CheckConstraint("status IN ('open', 'succeeded', 'failed', 'timed_out')", name=op.f('ck_experiences_status')),
    sa.PrimaryKeyConstraint('correlation_id', name=op.f('pk_experiences'))
    )
    op.create_index('ix_experiences_due', 'experiences', ['status', 'deadline'], unique=False)
    op.create_index(op.f('ix_experiences_outcome_window'), 'experiences', ['outcome_window'], unique=False)
    op.create_index(op.f('ix_experiences_start_window'), 'experiences', ['start_window'], unique=False)
    op.create_table('experience_slis',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('experience_id', sa.String(length=64), nullable=False),
    sa.Column('urgency', sa.String(length=32), nullable=False),
    sa.Column('report_id', sa.BigInteger(), nullable=False),
    sa.Column('started', sa.BigInteger(), nullable=False),
    sa.Column('succeeded', sa.BigInteger(), nullable=False),
    sa.Column('failed', sa.BigInteger(), nullable=False),
    sa.Column('timed_out', sa.BigInteger(), nullable=False),
    sa.Column('completed', sa.BigInteger(), nullable=False),
    sa.Column('duration_p50_s', sa.Float(), nullable=True),
    sa.Column('duration_p90_s', sa.Float(), nullable=True),
    sa.Column('duration_p99_s', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['report_id'], ['reports.id'], name=op.f('fk_experience_slis_report_id_reports')),
    sa.PrimaryKeyConstraint('window_start', 'experience_id', 'urgency', name=op.f('pk_experience_slis'))
    )

def downgrade() -> None:
    op.drop_table('experience_categories')
    op.drop_table('experience_slis')
    op.drop_index(op.f('ix_experiences_start_window'), table_name='experiences')
    op.drop_index(op.f('ix_experiences_outcome_window'), table_name='experiences')
    op.drop_index('ix_experiences_due', table_name='experiences')
    op.drop_table('experiences')
    op.drop_index(op.f('ix_experience_checkpoints_received_at'), table_name='experience_checkpoints')
    op.drop_table('experience_checkpoints')
