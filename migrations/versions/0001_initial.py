"""initial schema: studies, images, reports, report edits, API keys, audit events, jobs

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Self-contained: it imports nothing from tinyllava_med, so it keeps meaning what it meant when
the models change. Names follow the models' naming convention (pk_/fk_/uq_/ck_/ix_); CHECK
names are wrapped in `op.f()` because the convention would otherwise prefix them again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT on PostgreSQL (BIGSERIAL when a primary key); INTEGER on SQLite (rowid autoincrement).
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _choice(table: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    quoted = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({quoted})", name=op.f(f"ck_{table}_{column}"))


REPORT_STATUSES = ("draft", "final")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        _ts("last_used_at", nullable=True),
        _choice("api_keys", "role", ("pacs", "radiologist", "admin")),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
    )

    op.create_table(
        "audit_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        _ts("at"),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(32), nullable=False),
        sa.Column("resource_id", sa.String(128), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        _choice("audit_events", "outcome", ("ok", "denied", "not_found", "invalid", "error")),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_actor_at", "audit_events", ["actor", "at"])
    op.create_index(
        "ix_audit_events_resource_type_resource_id",
        "audit_events",
        ["resource_type", "resource_id"],
    )

    op.create_table(
        "studies",
        sa.Column("id", sa.String(36), nullable=False),
        _ts("created_at"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("accession_number", sa.String(16), nullable=True),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("body_part_examined", sa.String(64), nullable=True),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("description", sa.String(256), nullable=True),
        _choice("studies", "status", ("received", "reported", "signed")),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
    )
    op.create_index("ix_studies_created_at", "studies", ["created_at"])
    op.create_index("ix_studies_modality", "studies", ["modality"])
    op.create_index("ix_studies_study_instance_uid", "studies", ["study_instance_uid"])

    op.create_table(
        "images",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("study_id", sa.String(36), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("n_frames", sa.Integer(), nullable=False),
        sa.Column("safe_metadata", sa.JSON(), nullable=False),
        _ts("created_at"),
        _choice("images", "kind", ("dicom", "png", "jpeg")),
        sa.CheckConstraint("n >= 0", name=op.f("ck_images_n_nonnegative")),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name="fk_images_study_id_studies", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("study_id", "n", name="uq_images_study_id_n"),
    )
    op.create_index("ix_images_sha256", "images", ["sha256"])
    op.create_index("ix_images_sop_instance_uid", "images", ["sop_instance_uid"])

    op.create_table(
        "reports",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("study_id", sa.String(36), nullable=False),
        sa.Column("image_id", sa.String(36), nullable=True),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("variant", sa.String(64), nullable=True),
        sa.Column("quantization", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=True),
        sa.Column("server_version", sa.String(32), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("signed_by", sa.String(64), nullable=True),
        _ts("signed_at", nullable=True),
        _ts("updated_at"),
        _choice("reports", "status", REPORT_STATUSES),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name="fk_reports_study_id_studies", ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name="fk_reports_image_id_images", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reports"),
    )
    op.create_index("ix_reports_study_id", "reports", ["study_id"])
    op.create_index("ix_reports_image_id", "reports", ["image_id"])
    op.create_index("ix_reports_status_created_at", "reports", ["status", "created_at"])

    op.create_table(
        "report_edits",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("report_id", sa.String(36), nullable=False),
        sa.Column("previous_text", sa.Text(), nullable=False),
        sa.Column("new_text", sa.Text(), nullable=False),
        sa.Column("previous_status", sa.String(8), nullable=False),
        sa.Column("new_status", sa.String(8), nullable=False),
        sa.Column("edited_by", sa.String(64), nullable=False),
        _ts("edited_at"),
        _choice("report_edits", "previous_status", REPORT_STATUSES),
        _choice("report_edits", "new_status", REPORT_STATUSES),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reports.id"],
            name="fk_report_edits_report_id_reports",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_report_edits"),
    )
    op.create_index("ix_report_edits_report_id", "report_edits", ["report_id"])

    op.create_table(
        "jobs",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("study_id", sa.String(36), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("run_after"),
        _ts("created_at"),
        _ts("updated_at"),
        sa.Column("locked_by", sa.String(128), nullable=True),
        _ts("locked_at", nullable=True),
        _choice("jobs", "status", ("queued", "running", "done", "failed")),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name="fk_jobs_study_id_studies", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status_run_after", "jobs", ["status", "run_after"])
    op.create_index("ix_jobs_study_id", "jobs", ["study_id"])


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes.
    for table in (
        "jobs",
        "report_edits",
        "reports",
        "images",
        "studies",
        "audit_events",
        "api_keys",
    ):
        op.drop_table(table)
