"""The declared schema: one MetaData, which alembic's migrations must reproduce exactly.

Times of windows are whole epoch seconds (UTC); instants are epoch seconds as floats. Both are
portable between SQLite and PostgreSQL and converted to aware datetimes at the edge (reports.py).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# An auto-incrementing 64-bit key; SQLite needs INTEGER PRIMARY KEY for its rowid alias.
_BigSerial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Dimensions of the distinct sets kept per window.
DIM_WORKSPACE = 1
DIM_USER = 2

meta = sa.Table(
    "aggregator_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

windows = sa.Table(
    "windows",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("window_end", sa.BigInteger, nullable=False),
    # NULL while open; set in the same transaction that writes the window's report.
    sa.Column("closed_at", sa.Float, nullable=True),
)

window_ids = sa.Table(
    "window_ids",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("dim", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("id", sa.Uuid(as_uuid=True), primary_key=True),
    # PostgreSQL: one partition per day of window starts, created ahead (store/partitions.py, migration 0008).
    postgresql_partition_by="RANGE (window_start)",
)


def is_partition(name: str | None) -> bool:
    """A partition of ``window_ids`` (the engine creates and drops them; the migrations do not declare them)."""
    return bool(name) and str(name).startswith("window_ids_")


contributions = sa.Table(
    "contributions",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("replica_id", sa.String(200), primary_key=True),
    sa.Column("allowed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("denied", sa.BigInteger, nullable=False, server_default="0"),
    # True once this replica flushed data that belongs to this window (not only late data into it).
    sa.Column("ontime", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("late_allowed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("late_denied", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("late_workspaces", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("late_users", sa.BigInteger, nullable=False, server_default="0"),
)

# One row per replica incarnation (process lifetime), written in each flush batch's own transaction:
# the sequence number of its last applied batch, so a retry after an ambiguous commit is recognised and
# skipped; and its watermark, so the collector knows which windows it may still hold data for.
flush_sequences = sa.Table(
    "flush_sequences",
    metadata,
    sa.Column("writer_id", sa.Uuid(as_uuid=True), primary_key=True),
    sa.Column("replica_id", sa.String(200), nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # The replica's clock when it swapped out the state of its last applied batch: everything it
    # tracked before then is durable. NULL until its first batch. Windows follow the replica's clock.
    sa.Column("watermark", sa.Float, nullable=True),
    # The database's clock at its last applied batch: liveness, compared only with the database's clock.
    sa.Column("heartbeat_at", sa.Float, nullable=True),
    # Set by a clean stop's final batch: a stopped incarnation holds no window back.
    sa.Column("stopped_at", sa.Float, nullable=True),
)

reports = sa.Table(
    "reports",
    metadata,
    # The pull cursor: assigned under the collector lock, so id order is commit order.
    sa.Column("id", _BigSerial, primary_key=True, autoincrement=True),
    sa.Column("window_start", sa.BigInteger, nullable=False, unique=True),
    sa.Column("window_end", sa.BigInteger, nullable=False),
    sa.Column("unique_workspaces", sa.BigInteger, nullable=False),
    sa.Column("unique_users", sa.BigInteger, nullable=False),
    sa.Column("allowed_requests", sa.BigInteger, nullable=False),
    sa.Column("denied_requests", sa.BigInteger, nullable=False),
    sa.Column("replicas", sa.Integer, nullable=False),
    # Incarnations that may have held data of this window and were given up on (lease expired, or
    # the max_collect_delay bound hit): 0 means the report is complete.
    sa.Column("replicas_missing", sa.Integer, nullable=False, server_default="0"),
    sa.Column("late_allowed_requests", sa.BigInteger, nullable=False),
    sa.Column("late_denied_requests", sa.BigInteger, nullable=False),
    sa.Column("late_unique_workspaces", sa.BigInteger, nullable=False),
    sa.Column("late_unique_users", sa.BigInteger, nullable=False),
    sa.Column("generated_at", sa.Float, nullable=False),
    sa.Column("generated_by", sa.String(200), nullable=False),
)

# A single row (id = 1) that a collector locks FOR UPDATE from its report insert to its commit, so
# reports get ids in commit order. Transaction-scoped: works through pools, dies with its holder.
collector_lock = sa.Table(
    "collector_lock",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("holder", sa.String(200), nullable=True),
    sa.Column("acquired_at", sa.Float, nullable=True),
)

# Delivery queue: one row per (item, writer), inserted in the transaction that creates the item (a
# report's own), so nothing written is lost before delivery. Delivery loops lease rows
# (claimed_by/claimed_until), send them outside any transaction, then settle them.
OUTBOX_STATUSES = ("pending", "delivered", "dead")
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", _BigSerial, primary_key=True, autoincrement=True),
    sa.Column("writer", sa.String(64), nullable=False),
    # Stable per (item, writer), so a receiver can drop the duplicates of at-least-once delivery.
    sa.Column("event_id", sa.Uuid(as_uuid=True), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("schema_uri", sa.String(255), nullable=False),
    sa.Column("occurred_at", sa.Float, nullable=False),
    # The item as JSON, identifiers raw: they are pseudonymized on the way out, under the key in force.
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("report_id", sa.BigInteger, sa.ForeignKey("reports.id"), nullable=True),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("claimed_by", sa.String(200), nullable=True),
    sa.Column("claimed_until", sa.Float, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float, nullable=True),
    sa.UniqueConstraint("writer", "event_id", name="uq_outbox_writer_event_id"),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'dead')", name="status"),
)
sa.Index("ix_outbox_due", outbox.c.writer, outbox.c.status, outbox.c.next_attempt_at)

# ---- meters (#6) ----------------------------------------------------------------------------------
# A meter's figures per window and dimension group, added to by every replica's flush. ``late`` rows
# hold data of windows already reported, counted in the window open when it arrived (as in the core).
meter_values = sa.Table(
    "meter_values",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("meter", sa.String(64), primary_key=True),
    sa.Column("group_key", sa.Text, primary_key=True),  # the dimensions as canonical JSON, or __overflow__
    sa.Column("late", sa.Boolean, primary_key=True),
    sa.Column("quantity", sa.BigInteger, nullable=False, server_default="0"),  # sum: units; count: records
    sa.Column("records", sa.BigInteger, nullable=False, server_default="0"),
)

# Per window and meter: the lock a flush takes to admit new groups, and how many it admitted. Records of
# groups beyond the meter's max_groups went to __overflow__ (``overflowed`` counts them).
meter_windows = sa.Table(
    "meter_windows",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("meter", sa.String(64), primary_key=True),
    sa.Column("groups", sa.Integer, nullable=False, server_default="0"),
    sa.Column("overflowed", sa.BigInteger, nullable=False, server_default="0"),
)

# A distinct meter's set per window and group: 128 bits of SHA-256 of each value.
meter_distinct = sa.Table(
    "meter_distinct",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("meter", sa.String(64), primary_key=True),
    sa.Column("group_key", sa.Text, primary_key=True),
    sa.Column("value_hash", sa.Uuid(as_uuid=True), primary_key=True),
)

# Event ids already counted, per meter (one unit of work may feed several meters under one id), kept
# for the dedup horizon: a record whose (meter, event id) is here is ignored.
meter_event_ids = sa.Table(
    "meter_event_ids",
    metadata,
    sa.Column("meter", sa.String(64), primary_key=True),
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("recorded_at", sa.Float, nullable=False, index=True),
)

# A window's meter results, written with its report, in the same commit.
meter_reports = sa.Table(
    "meter_reports",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("meter", sa.String(64), primary_key=True),
    sa.Column("group_key", sa.Text, primary_key=True),
    sa.Column("late", sa.Boolean, primary_key=True),
    sa.Column("report_id", sa.BigInteger, sa.ForeignKey("reports.id"), nullable=False),
    sa.Column("quantity", sa.BigInteger, nullable=False),  # sum: units of 10**-decimals
    sa.Column("decimals", sa.SmallInteger, nullable=False),
    sa.Column("records", sa.BigInteger, nullable=False),
)

# Billable usage events, one per billable meter and group with a quantity, written with the window's
# report; ``id`` follows commit order (the collector lock), so it is an export cursor like a report's.
billable_events = sa.Table(
    "billable_events",
    metadata,
    sa.Column("id", _BigSerial, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.Uuid(as_uuid=True), nullable=False, unique=True),
    sa.Column("window_start", sa.BigInteger, nullable=False, index=True),
    sa.Column("meter", sa.String(64), nullable=False),
    sa.Column("report_id", sa.BigInteger, sa.ForeignKey("reports.id"), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # the event as JSON, identifiers raw
)

# ---- experiences (#7) -----------------------------------------------------------------------------
# One row per experience (journey), from its first checkpoint on. ``start_window`` and ``outcome_window``
# place it in the SLIs of the windows where it started and where it ended (or timed out).
experiences = sa.Table(
    "experiences",
    metadata,
    sa.Column("correlation_id", sa.String(26), primary_key=True),
    sa.Column("experience_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("feature_category", sa.String(64), nullable=False),
    sa.Column("urgency", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # open | succeeded | failed | timed_out
    sa.Column("first_seen_at", sa.Float, nullable=False),  # server time of its first checkpoint
    sa.Column("deadline", sa.Float, nullable=True),  # open: when it times out
    sa.Column("started_at", sa.Float, nullable=True),  # client time of the start
    sa.Column("ended_at", sa.Float, nullable=True),  # client time of the end
    sa.Column("start_window", sa.BigInteger, nullable=True, index=True),
    sa.Column("outcome_window", sa.BigInteger, nullable=True, index=True),
    sa.Column("unknown_start", sa.Boolean, nullable=False, server_default=sa.false()),  # seen before its start
    sa.Column("late_end", sa.Boolean, nullable=False, server_default=sa.false()),  # ended after timing out
    sa.CheckConstraint("status IN ('open', 'succeeded', 'failed', 'timed_out')", name="status"),
)
sa.Index("ix_experiences_due", experiences.c.status, experiences.c.deadline)

# Every distinct checkpoint received: a client's retry of the same one is recognised here and ignored.
experience_checkpoints = sa.Table(
    "experience_checkpoints",
    metadata,
    sa.Column("correlation_id", sa.String(26), primary_key=True),
    sa.Column("checkpoint", sa.String(16), primary_key=True),
    sa.Column("checkpoint_category", sa.String(64), primary_key=True),
    sa.Column("client_timestamp", sa.Float, primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
    sa.Column("outcome", sa.String(16), nullable=True),
    sa.Column("meta", sa.Text, nullable=True),
)

# The checkpoint categories seen per experience, to bound them: beyond the cap they are stored as __other__.
experience_categories = sa.Table(
    "experience_categories",
    metadata,
    sa.Column("experience_id", sa.String(64), primary_key=True),
    sa.Column("checkpoint_category", sa.String(64), primary_key=True),
)

# SLIs per window, experience and urgency, written with the window's report.
experience_slis = sa.Table(
    "experience_slis",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("experience_id", sa.String(64), primary_key=True),
    sa.Column("urgency", sa.String(32), primary_key=True),
    sa.Column("report_id", sa.BigInteger, sa.ForeignKey("reports.id"), nullable=False),
    sa.Column("started", sa.BigInteger, nullable=False),
    sa.Column("succeeded", sa.BigInteger, nullable=False),
    sa.Column("failed", sa.BigInteger, nullable=False),
    sa.Column("timed_out", sa.BigInteger, nullable=False),
    sa.Column("completed", sa.BigInteger, nullable=False),
    sa.Column("duration_p50_s", sa.Float, nullable=True),
    sa.Column("duration_p90_s", sa.Float, nullable=True),
    sa.Column("duration_p99_s", sa.Float, nullable=True),
)

# ---- quarantine (#12) -----------------------------------------------------------------------------
# Items a loop set aside because they failed for a reason of their own (a value out of range, a row
# edited by hand, a bug), so that everything else goes on: one row per item, by kind and reference.
# ``held`` items are skipped by their loop; ``retry`` (set by `aggregator quarantine retry`) lets the loop
# take them again, and the commit that processes one deletes its row. Retention never prunes them.
QUARANTINE_KINDS = ("flush", "window", "experience", "billable", "delivery")
QUARANTINE_STATUSES = ("held", "retry")
quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", _BigSerial, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("ref", sa.String(255), nullable=False),  # what the item is: a window start, a correlation id...
    sa.Column("status", sa.String(16), nullable=False, server_default="held"),
    sa.Column("reason", sa.Text, nullable=False),  # the exception's type and message, bounded
    sa.Column("payload", sa.Text, nullable=True),  # JSON: what a retry needs
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("first_at", sa.Float, nullable=False),
    sa.Column("last_at", sa.Float, nullable=False),
    sa.Column("set_aside_by", sa.String(200), nullable=True),  # the replica whose loop set it aside last
    sa.UniqueConstraint("kind", "ref", name="uq_quarantine_kind_ref"),
    sa.CheckConstraint("status IN ('held', 'retry')", name="status"),
)

# ---- range distinct (#13) -------------------------------------------------------------------------
# ``dim`` names a distinct set: "workspaces", "users", or "meter:<name>" for a distinct meter.
# Every id of a reported window, per UTC day: written by the window's rollup (after its report, in a
# commit of its own), and by a late flush into a rolled-up window in its own commit; kept for
# ``distinct_retention``.
day_ids = sa.Table(
    "day_ids",
    metadata,
    sa.Column("day_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("dim", sa.String(80), primary_key=True),
    sa.Column("id", sa.Uuid(as_uuid=True), primary_key=True),
)

# Mergeable sketches (serialized DataSketches HLL) of a reported window's ids. Append-only: one row per
# window and dim written by its rollup, one more per late flush into it after, so no writer updates a row.
distinct_sketches = sa.Table(
    "distinct_sketches",
    metadata,
    sa.Column("id", _BigSerial, primary_key=True, autoincrement=True),
    sa.Column("window_start", sa.BigInteger, nullable=False),
    sa.Column("dim", sa.String(80), nullable=False),
    sa.Column("late", sa.Boolean, nullable=False),
    sa.Column("sketch", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
sa.Index("ix_distinct_sketches_dim_window", distinct_sketches.c.dim, distinct_sketches.c.window_start)

# Range distinct's rollup of reported windows. A row with ``rolled_at`` NULL: being rolled up (late flushes
# into it write the day rollup and a sketch themselves from then on); set: done, its ids are in ``day_ids``
# and its sketches written, so retention may drop its ids. Until then a reported window keeps every id in
# ``window_ids``. Migration 0007 enters the windows reported before ``distinct_from`` (outside every range)
# as done.
distinct_rollups = sa.Table(
    "distinct_rollups",
    metadata,
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("rolled_at", sa.Float, nullable=True),
)
