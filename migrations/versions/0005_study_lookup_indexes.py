"""Studies are looked up by accession number and study date: index both

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

A reader finds a study by the accession number the RIS gives (`GET /v1/studies?accession_number=`)
and lists a day's or a week's studies by study date; without these indexes each lookup reads the
whole table.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])


def downgrade() -> None:
    op.drop_index("ix_studies_study_date", table_name="studies")
    op.drop_index("ix_studies_accession_number", table_name="studies")
