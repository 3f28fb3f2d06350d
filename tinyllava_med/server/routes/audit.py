"""`/v1/audit`: admins read the audit log (who did what to which resource, and how it ended).

Reading it is itself audited. Events never hold patient data (`crud.audit` refuses it), so the
log can be handed to a privacy officer as it is.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Outcome
from tinyllava_med.server.deps import AuditReader, Limit, Offset, SessionDep, as_utc
from tinyllava_med.server.schemas import AuditEventList, AuditEventPublic

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=AuditEventList)
def list_audit_events(
    session: SessionDep,
    principal: AuditReader,
    actor: str | None = None,
    action: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    outcome: Outcome | None = None,
    since: Annotated[
        datetime | None, Query(description="at or after (ISO 8601; UTC without an offset)")
    ] = None,
    until: Annotated[
        datetime | None, Query(description="before (ISO 8601; UTC without an offset)")
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> AuditEventList:
    """Newest first. E.g. everything done to one report: `?resource_type=report&resource_id=`;
    who saw one study, its own events and the list pages that showed it: `?resource_id=<study
    id>`; everything one key did: `?actor=<key id>`; refusals: `?outcome=denied`."""
    since, until = as_utc(since), as_utc(until)
    query: crud.AuditQuery = {
        "actor": actor,
        "action": action,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "outcome": outcome,
        "since": since,
        "until": until,
    }
    rows = crud.list_audit_events(session, limit=limit, offset=offset, **query)
    events = [AuditEventPublic.model_validate(e, from_attributes=True) for e in rows]
    count = crud.count_audit_events(session, **query)
    crud.audit(
        session,
        actor=principal.actor,
        action="audit.read",
        resource_type="audit",
        resource_id=None,
        outcome="ok",
        status_code=200,
        detail={"count": len(events)},
    )
    return AuditEventList(data=events, count=count)
