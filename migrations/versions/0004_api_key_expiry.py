"""API keys may expire: `api_keys.expires_at`

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

Self-contained, like 0001. Keys made before this revision keep NULL (they never expire, as
before); a key past its `expires_at` is refused like a revoked one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("expires_at")
