"""reports.frame: which frame of a multi-frame image the model saw

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28

The SR's image reference names that frame (Referenced Frame Number), so a PACS opens an
enhanced CT, a tomosynthesis or a cine loop where the model looked. Existing reports keep NULL,
which means the middle frame (what a question without a frame, and every automatic report, saw).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("frame", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("frame")
