"""images.stored_at: when the image's file was last stored

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28

Image retention counts from it, not from the study's arrival: a released study retrieved again
from the PACS (or an instance that joins an old study) keeps its pixels for another
`image_retention_days`, instead of being released by the next hourly run. Existing images take
their `created_at` (a released image retrieved before this revision counts from its arrival
once more, as it did).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("stored_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE images SET stored_at = created_at")
    with op.batch_alter_table("images") as batch:
        batch.alter_column("stored_at", existing_type=sa.DateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("stored_at")
