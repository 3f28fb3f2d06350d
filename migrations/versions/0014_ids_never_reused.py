"""SQLite: job and report-edit ids are never handed out again (AUTOINCREMENT)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29

An INTEGER PRIMARY KEY without AUTOINCREMENT gives the next row max(id) + 1, so once the
newest jobs went with a deleted study (ON DELETE CASCADE), the next job got one of their ids:
`GET /v1/jobs/48`, a retrieve's answer and the audit rows naming job 48 then pointed at another
job. SQLite rebuilds both tables (batch mode) with AUTOINCREMENT, which remembers the largest id
ever used (`sqlite_sequence`) from the rows copied on. PostgreSQL's identity columns never reuse
a value: nothing to do there. The downgrade rebuilds them without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("jobs", "report_edits")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
