"""Meters: per-window values, distinct sets, dedup ids, results, billable events.

Adds tables only: every existing row, report and outbox item stays as it was.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 21:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_BigSerial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table('meter_values',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('meter', sa.String(length=64), nullable=False),
    sa.Column('group_key', sa.Text(), nullable=False),
    sa.Column('late', sa.Boolean(), nullable=False),
    sa.Column('quantity', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('records', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('window_start', 'meter', 'group_key', 'late', name=op.f('pk_meter_values'))
    )
    op.create_table('meter_windows',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('meter', sa.String(length=64), nullable=False),
    sa.Column('groups', sa.Integer(), server_default='0', nullable=False),
    sa.Column('overflowed', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('window_start', 'meter', name=op.f('pk_meter_windows'))
    )
    op.create_table('meter_distinct',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('meter', sa.String(length=64), nullable=False),
    sa.Column('group_key', sa.Text(), nullable=False),
    sa.Column('value_hash', sa.Uuid(), nullable=False),
    sa.PrimaryKeyConstraint('window_start', 'meter', 'group_key', 'value_hash', name=op.f('pk_meter_distinct'))
    )
    op.create_table('meter_event_ids',
    sa.Column('meter', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('recorded_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('meter', 'event_id', name=op.f('pk_meter_event_ids'))
    )
    op.create_index(op.f('ix_meter_event_ids_recorded_at'), 'meter_event_ids', ['recorded_at'], unique=False)
    op.create_table('meter_reports',
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('meter', sa.String(length=64), nullable=False),
    sa.Column('group_key', sa.Text(), nullable=False),
    sa.Column('late', sa.Boolean(), nullable=False),
    sa.Column('report_id', sa.BigInteger(), nullable=False),
    sa.Column('quantity', sa.BigInteger(), nullable=False),
    sa.Column('decimals', sa.SmallInteger(), nullable=False),
    sa.Column('records', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['report_id'], ['reports.id'], name=op.f('fk_meter_reports_report_id_reports')),
    sa.PrimaryKeyConstraint('window_start', 'meter', 'group_key', 'late', name=op.f('pk_meter_reports'))
    )
    op.create_table('billable_events',
    sa.Column('id', _BigSerial, autoincrement=True, nullable=False),
    sa.Column('event_id', sa.Uuid(), nullable=False),
    sa.Column('window_start', sa.BigInteger(), nullable=False),
    sa.Column('meter', sa.String(length=64), nullable=False),
    sa.Column('report_id', sa.BigInteger(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['report_id'], ['reports.id'], name=op.f('fk_billable_events_report_id_reports')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_billable_events')),
    sa.UniqueConstraint('event_id', name=op.f('uq_billable_events_event_id'))
    )
    op.create_index(op.f('ix_billable_events_window_start'), 'billable_events', ['window_start'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_billable_events_window_start'), table_name='billable_events')
    op.drop_table('billable_events')
    op.drop_table('meter_reports')
    op.drop_index(op.f('ix_meter_event_ids_recorded_at'), table_name='meter_event_ids')
    op.drop_table('meter_event_ids')
    op.drop_table('meter_distinct')
    op.drop_table('meter_windows')
    op.drop_table('meter_values')
