"""Released images are found by their kept header: index `images.header_sha256`

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-29

Which stored files the database still needs (`crud.files_in_use`: every sweep, and the sweep of
unreferenced files `serve` queues as it starts) asks for images by `header_sha256`; without an
index each such question read the whole table.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_images_header_sha256", "images", ["header_sha256"])


def downgrade() -> None:
    op.drop_index("ix_images_header_sha256", table_name="images")
