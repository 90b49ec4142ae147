"""Outbox: durable per-writer delivery queue for reports.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 21:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_BigSerial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table('outbox',
    sa.Column('id', _BigSerial, autoincrement=True, nullable=False),
    sa.Column('writer', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('schema_uri', sa.String(length=255), nullable=False),
    sa.Column('occurred_at', sa.Float(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('report_id', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.Float(), nullable=False),
    sa.Column('claimed_by', sa.String(length=200), nullable=True),
    sa.Column('claimed_until', sa.Float(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('delivered_at', sa.Float(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'dead')", name=op.f('ck_outbox_status')),
    sa.ForeignKeyConstraint(['report_id'], ['reports.id'], name=op.f('fk_outbox_report_id_reports')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox')),
    sa.UniqueConstraint('writer', 'event_id', name='uq_outbox_writer_event_id'),
    )
    op.create_index('ix_outbox_due', 'outbox', ['writer', 'status', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_outbox_due', table_name='outbox')
    op.drop_table('outbox')
