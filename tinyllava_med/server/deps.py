"""Typed FastAPI dependencies: settings, database session, engine, image store, principals.

The ones that only read app state are `async`: FastAPI runs a plain `def` dependency in its
thread pool, and a thread hop for each of them on every request costs the event loop more than
the lookup itself (py-spy at 16 clients: a fifth of the loop's time was dependency solving).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session

from tinyllava_med.server.auth import Principal, require
from tinyllava_med.server.db.session import run_after_commit
from tinyllava_med.server.engine import BatchingEngine
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.metrics import Metrics
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, before the response is
    sent (`SessionDep`'s scope), rolled back on error. What a route deferred with
    `after_commit` runs once the commit succeeded."""
    with request.app.state.session_factory.begin() as session:
        yield session
    run_after_commit(session)


async def get_engine(request: Request) -> BatchingEngine:
    return request.app.state.engine


async def get_store(request: Request) -> ImageStore:
    return request.app.state.store


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": FastAPI otherwise ends a dependency with yield after the response is sent,
# so a client was told 200 before the COMMIT ran. A failed commit then lost a signed report the
# client saw as signed, and a client's next write could wait in SQLite's busy handler for the
# lock of a commit not yet run.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
EngineDep = Annotated[BatchingEngine, Depends(get_engine)]
StoreDep = Annotated[ImageStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

# Paging and ids as the list and job routes take them. The upper bounds keep a number within a
# PostgreSQL BIGINT: past it, the query failed there with a 500 instead of a 422.
BIGINT_MAX = 2**63 - 1
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=BIGINT_MAX)]
JobId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
# a study's identifiers as the study and report lists look them up (the columns hold 64)
AccessionNumber = Annotated[
    str | None, Query(max_length=64, description="the study's accession number, exact")
]
StudyInstanceUid = Annotated[
    str | None, Query(max_length=64, description="the study's Study Instance UID")
]


def as_utc(t: datetime | None) -> datetime | None:
    """A time parameter in UTC, as the stored times are; without an offset it is UTC (the
    database layer refuses naive times: they were a 500). One whose offset takes it past year 1
    or 9999 is a 422 (converting it was an OverflowError: a 500)."""
    if t is None:
        return None
    if t.tzinfo is None:
        return t.replace(tzinfo=timezone.utc)
    try:
        return t.astimezone(timezone.utc)
    except OverflowError as e:
        raise APIError(
            422, "invalid_request", "expected a time between the years 1 and 9999 in UTC"
        ) from e


Uploader = Annotated[Principal, Depends(require("study.upload"))]
StudyReader = Annotated[Principal, Depends(require("study.read"))]
StudyDeleter = Annotated[Principal, Depends(require("study.delete"))]
JobRetrier = Annotated[Principal, Depends(require("job.retry"))]
Asker = Annotated[Principal, Depends(require("question.ask"))]
ReportReader = Annotated[Principal, Depends(require("report.read"))]
ReportEditor = Annotated[Principal, Depends(require("report.edit"))]
KeyAdmin = Annotated[Principal, Depends(require("apikey.manage"))]
AuditReader = Annotated[Principal, Depends(require("audit.read"))]
