"""reports.finish_reason: why the model stopped (stop / length), so a reader sees a cut answer

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Self-contained, like 0001. Existing reports keep NULL (not recorded at the time).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("finish_reason", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("finish_reason")
