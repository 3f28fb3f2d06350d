"""Reports are polled by when they were signed: index `reports.signed_at`

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27

A RIS that polls for new results asks `GET /v1/reports?signed_since=T` every few minutes; with
this index that reads the reports signed since T, not the whole table.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_reports_signed_at", "reports", ["signed_at"])


def downgrade() -> None:
    op.drop_index("ix_reports_signed_at", table_name="reports")
