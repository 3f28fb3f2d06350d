"""Studies are counted by status for `/metrics`: index (status, created_at)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27

Every scrape of `/metrics` counts the studies by status and reads the arrival of the oldest one
not yet signed (`tinyllava_med_studies`, `tinyllava_med_studies_oldest_unsigned_timestamp_seconds`);
with this index that read touches the index alone, not the table.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_studies_status_created_at", "studies", ["status", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_studies_status_created_at", table_name="studies")
