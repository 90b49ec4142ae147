"""Quarantine: items a loop set aside (a flush unit, a window, an experience, a billable event, an outbox item).

A new table only: nothing existing changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_BigSerial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table('quarantine',
    sa.Column('id', _BigSerial, autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('ref', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='held', nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='1', nullable=False),
    sa.Column('first_at', sa.Float(), nullable=False),
    sa.Column('last_at', sa.Float(), nullable=False),
    sa.Column('set_aside_by', sa.String(length=200), nullable=True),
    sa.CheckConstraint("status IN ('held', 'retry')", name=op.f('ck_quarantine_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_quarantine')),
    sa.UniqueConstraint('kind', 'ref', name='uq_quarantine_kind_ref'),
    )


def downgrade() -> None:
    op.drop_table('quarantine')
