"""reports.model_weights: the sha256 of the weight files that answered

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29

Name, variant, quantization and version say which model answered; two checkpoints trained or
converted by the same version under the same name do not differ in any of them. The digest
(`sha256:` + 64 hex digits over the checkpoint's weight files) does. Existing reports keep NULL:
which weights answered them is not known.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("model_weights", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("model_weights")
