"""Images may be released: `images.released_at`, `images.header_sha256`

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27

With `image_retention_days` set, the pixel data of old studies whose reports are all signed is
removed from the file store (the PACS keeps the images); the row stays, with when it was
released and, for DICOM, the content address of its header without pixels, which the study's
SRs are built from. Rows made before this revision are held (NULL).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("header_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("header_sha256")
        batch.drop_column("released_at")
