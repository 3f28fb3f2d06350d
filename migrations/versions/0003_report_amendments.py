"""Amending signed reports: status 'amended'; each edit keeps the version it replaced and why

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Self-contained, like 0001. A signed report could not change before; now a radiologist may amend
it (new text, a reason, signed again). `report_edits.previous_updated_at` names the replaced
version (its SR instance UID derives from it, so an amended SR can reference its predecessor);
edits made before this revision keep NULL there. Downgrade turns amended reports and edits back
into 'final' (their text, signer and history stay; the reasons are dropped with their column).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("draft", "final")
AFTER = ("draft", "final", "amended")
CHECKED = (("reports", "status"), ("report_edits", "previous_status"), ("report_edits", "new_status"))


def _allow(statuses: Sequence[str]) -> None:
    quoted = ", ".join(f"'{v}'" for v in statuses)
    for table, column in CHECKED:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_{column}"), type_="check")
            batch.create_check_constraint(op.f(f"ck_{table}_{column}"), f"{column} IN ({quoted})")


def upgrade() -> None:
    _allow(AFTER)
    with op.batch_alter_table("report_edits") as batch:
        batch.add_column(
            sa.Column("previous_updated_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("report_edits") as batch:
        batch.drop_column("reason")
        batch.drop_column("previous_updated_at")
    op.execute("UPDATE reports SET status = 'final' WHERE status = 'amended'")
    for column in ("previous_status", "new_status"):
        op.execute(f"UPDATE report_edits SET {column} = 'final' WHERE {column} = 'amended'")
    _allow(BEFORE)
