"""`/v1/jobs`: the background job queue (automatic reports, SR push-back, file sweeps, rejection
notes): read it, and (admins) queue failed jobs again once their cause is fixed."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Job
from tinyllava_med.server.deps import JobId, JobRetrier, Limit, Offset, SessionDep, StudyReader
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.jobs import JobKind, retry_failed
from tinyllava_med.server.schemas import JobList, JobPublic, JobsRetried

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id,
        kind=job.kind,
        status=job.status,
        study_id=job.study_id,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        last_error=job.last_error,
        result=(job.payload or {}).get("result"),
        run_after=job.run_after,
        created_at=job.created_at,
        updated_at=job.updated_at,
    )


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    principal: StudyReader,
    status: Literal["queued", "running", "done", "failed"] | None = None,
    kind: JobKind | None = None,
    study_id: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobList:
    """Newest first."""
    where = [
        c
        for c in (
            Job.status == status if status else None,
            Job.kind == kind if kind else None,
            Job.study_id == study_id if study_id else None,
        )
        if c is not None
    ]
    rows = list(
        session.scalars(
            select(Job).where(*where).order_by(Job.id.desc()).limit(limit).offset(offset)
        )
    )
    count = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    filters = {"status": status, "kind": kind, "study_id": study_id}
    _audit_read(
        session, principal.actor, "job.list", None, rows, [k for k, v in filters.items() if v]
    )
    return JobList(data=[job_public(j) for j in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(session: SessionDep, principal: StudyReader, job_id: JobId) -> JobPublic:
    job = session.get(Job, job_id)
    if job is None:
        raise APIError(404, "job_not_found", "no job with this id")
    _audit_read(session, principal.actor, "job.read", str(job.id), [job], None)
    return job_public(job)


def _audit_read(
    session: Session,
    actor: str,
    action: str,
    resource_id: str | None,
    jobs: list[Job],
    filters: list[str] | None,
) -> None:
    """A job shows its study's id, its error and its result (a retrieve's Study Instance UID):
    reading one is an access to that study, audited as the study and report reads are."""
    detail: dict[str, object] = {
        "studies": list(dict.fromkeys(j.study_id for j in jobs if j.study_id))
    }
    if filters is not None:
        detail |= {"count": len(jobs), "filters": filters, "jobs": [j.id for j in jobs]}
    crud.audit(
        session,
        actor=actor,
        action=action,
        resource_type="job",
        resource_id=resource_id,
        outcome="ok",
        status_code=200,
        detail=detail,
    )


@router.post("/retry", response_model=JobsRetried)
def retry_jobs(
    session: SessionDep, principal: JobRetrier, kind: JobKind | None = None
) -> JobsRetried:
    """Every failed job (of `kind`) queued again with all its attempts: after the PACS or the
    database it needed is back. Audited."""
    return _retry(session, principal.actor, kind=kind)


@router.post("/{job_id}/retry", response_model=JobsRetried)
def retry_job(session: SessionDep, job_id: JobId, principal: JobRetrier) -> JobsRetried:
    """One failed job queued again; 404 for no such job, 409 when it has not failed."""
    job = session.get(Job, job_id)
    if job is None:
        raise APIError(404, "job_not_found", "no job with this id")
    if job.status != "failed":
        raise APIError(
            409, "job_not_failed", f"only a failed job is retried; this one is {job.status}"
        )
    return _retry(session, principal.actor, job_id=job_id)


def _retry(
    session: Session, actor: str, *, job_id: int | None = None, kind: str | None = None
) -> JobsRetried:
    ids = retry_failed(session, job_id=job_id, kind=kind)
    crud.audit(
        session,
        actor=actor,
        action="job.retry",
        resource_type="job",
        resource_id=str(job_id) if job_id is not None else None,
        outcome="ok",
        status_code=200,
        detail={"kind": kind, "retried": ids[:100], "count": len(ids)},
    )
    return JobsRetried(data=ids, count=len(ids))
