"""Accession numbers up to 64 characters: `studies.accession_number` VARCHAR(16) -> (64)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27

DICOM gives an accession number (VR SH) 16 characters, but some RIS issue longer ones, and on
PostgreSQL a file carrying one was refused whole (a 500). The imaging layer keeps them up to 64
(`imaging.metadata.MAX_LENGTH`).

A downgrade refuses while a study holds a longer one: cut to 16 characters (as it did before),
it could be another order's accession number, and a RIS matching results by it would file the
report there. `tinyllava-med db downgrade REV --clear-long-accession-numbers` empties them
instead (the older version then has no accession number for those studies; the Study Instance
UID still names them).
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
    long = "length(accession_number) > 16"
    n = op.get_bind().execute(sa.text(f"SELECT count(*) FROM studies WHERE {long}")).scalar_one()
    if n and not op.get_context().config.attributes.get("clear_long_accession_numbers"):
        from tinyllava_med.server.db.migrate import MigrationError

        raise MigrationError(
            f"{n} studies hold accession numbers longer than 16 characters, which revision "
            "0007 cannot: cut short, one could be another order's. Downgrade with "
            "--clear-long-accession-numbers to empty them (the Study Instance UID still names "
            "those studies), or stay on this version"
        )
    op.execute(f"UPDATE studies SET accession_number = NULL WHERE {long}")
    with op.batch_alter_table("studies") as batch:
        batch.alter_column(
            "accession_number",
            existing_type=sa.String(64),
            type_=sa.String(16),
            existing_nullable=True,
        )
