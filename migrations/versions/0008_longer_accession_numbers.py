"""Accession numbers up to 64 characters: `studies.accession_number` VARCHAR(16) -> (64)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27

DICOM gives an accession number (VR SH) 16 characters, but some RIS issue longer ones, and on
PostgreSQL a file carrying one was refused whole (a 500). The imaging layer keeps them up to 64
(`imaging.metadata.MAX_LENGTH`). A downgrade cuts longer ones to 16.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.alter_column(
            "accession_number",
            existing_type=sa.String(16),
            type_=sa.String(64),
            existing_nullable=True,
        )


def downgrade() -> None:
    op.execute(
        "UPDATE studies SET accession_number = substr(accession_number, 1, 16) "
        "WHERE length(accession_number) > 16"
    )
    with op.batch_alter_table("studies") as batch:
        batch.alter_column(
            "accession_number",
            existing_type=sa.String(64),
            type_=sa.String(16),
            existing_nullable=True,
        )
