"""studies.status: a signed study with a draft awaiting a signature is `reported`

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29

Until now a study stayed `signed` once any of its reports was signed, so a later question's draft
was missing from /metrics' unsigned studies while the worklist listed the study as awaiting a
signature. From now on a new draft takes a signed study back to `reported`, and signing its last
draft makes it `signed` again; this revision corrects the studies stored before. Data only: the
downgrade keeps the corrected statuses (the older code reads them as it reads any `reported`
study).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    studies = sa.table("studies", sa.column("id"), sa.column("status"))
    reports = sa.table("reports", sa.column("study_id"), sa.column("status"))
    a_draft = (
        sa.select(reports.c.study_id)
        .where(reports.c.study_id == studies.c.id, reports.c.status == "draft")
        .exists()
    )
    op.execute(
        studies.update().where(studies.c.status == "signed", a_draft).values(status="reported")
    )


def downgrade() -> None:
    pass
