"""Quantization labels longer than 16 characters: widen `reports.quantization` to 48

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-29

A label names the scheme and what it quantized beyond the default skip list
(`cpu-int8+tower+lm_head`, 22 characters: `LoadedModel.quantization_label`); PostgreSQL refused
it in a VARCHAR(16), and no answer of such a model could be stored. Going back cuts a longer
label to its scheme (`cpu-int8`), which `migrate.LOSSES` names before it does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LONG = "length(quantization) > 16"


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.alter_column(
            "quantization", existing_type=sa.String(16), type_=sa.String(48), existing_nullable=False
        )


def downgrade() -> None:
    op.execute(
        "UPDATE reports SET quantization = CASE "
        + " ".join(
            f"WHEN quantization LIKE '{scheme}+%' THEN '{scheme}'"
            for scheme in ("cpu-int8", "4bit", "8bit")
        )
        + f" ELSE substr(quantization, 1, 16) END WHERE {LONG}"
    )
    with op.batch_alter_table("reports") as batch:
        batch.alter_column(
            "quantization", existing_type=sa.String(48), type_=sa.String(16), existing_nullable=False
        )
