"""`/dicomweb/studies`: STOW-RS, so a PACS (Orthanc, dcm4chee, a modality router) can push studies.

Every part is decoded before anything is stored. Instances are filed under the study with the
same Study Instance UID (created on first sight), an instance already stored is acknowledged
again without a copy, and each study that got new instances gets its automatic report queued
(`auto_report_prompts`) in the same transaction, before the response is sent.

Statuses (PS3.18 §10.5.3): 200 all stored, 202 some failed, 409 none stored (body: the
`application/dicom+json` store response with per-instance Failure Reasons); 400 malformed
multipart and 415 wrong media type get the project's error shape.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tinyllava_med.imaging import ImagingError, StudyFile, load_study_file
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Image, Study
from tinyllava_med.server.deps import SettingsDep, StoreDep, Uploader
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.jobs import schedule_auto_report
from tinyllava_med.server.serving import add_file, create_study_of, limits_of
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore
from tinyllava_med.server.stow import (
    CANNOT_UNDERSTAND,
    MEDIA_TYPE,
    OUT_OF_RESOURCES,
    STUDY_MISMATCH,
    Part,
    StoreResult,
    StowRequestError,
    parse_multipart_related,
)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

_TOO_BIG = {"too_large", "decompression_bomb"}


def _decode(parts: list[Part], settings: Settings) -> list[StudyFile | ImagingError]:
    out: list[StudyFile | ImagingError] = []
    for part in parts:
        try:
            d = load_study_file(part.data, limits=limits_of(settings))
            if d.kind != "dicom":
                raise ImagingError("not_dicom", "the part is not a DICOM instance")
            out.append(d)
        except ImagingError as e:
            out.append(e)
    return out


# STOW requests find or create their study by UID and number its images one at a time. A PACS
# may send a study's instances in parallel requests; each transaction saw no study yet and made
# its own (12 parallel single-instance requests made 9-12 studies, on SQLite and PostgreSQL).
# The decoding, most of a request's work, still runs in parallel, before. Within a process a
# lock orders them; processes sharing a PostgreSQL database also take `_lock_studies`.
_STORING = threading.Lock()


def _lock_studies(session: Session, uids: list[str]) -> None:
    """On PostgreSQL, hold a transaction-scoped advisory lock per Study Instance UID, for
    server processes that share the database (taken in sorted order: two requests for the same
    studies wait for each other, never deadlock)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for uid in sorted(set(uids)):
        key = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(key)))


def _study_for(session: Session, uid: str, cache: dict[str, Study], d: StudyFile) -> Study:
    if uid not in cache:
        found = session.scalar(
            select(Study)
            .where(Study.StudyInstanceUID == uid)
            .order_by(Study.created_at.desc())
            .limit(1)
        )
        cache[uid] = found if found is not None else create_study_of(session, d)
    return cache[uid]


def _already_stored(session: Session, study: Study, sop_instance: str) -> bool:
    return (
        session.scalar(
            select(Image.id).where(Image.study_id == study.id, Image.SOPInstanceUID == sop_instance)
        )
        is not None
    )


def store_instances(
    session: Session,
    store: ImageStore,
    settings: Settings,
    parts: list[Part],
    decoded: list[StudyFile | ImagingError],
    url_study_uid: str | None,
) -> tuple[StoreResult, list[Study]]:
    result = StoreResult()
    uids = [d.metadata.StudyInstanceUID for d in decoded if not isinstance(d, ImagingError)]
    _lock_studies(session, [uid for uid in uids if uid])
    studies: dict[str, Study] = {}
    touched: dict[str, Study] = {}
    for part, d in zip(parts, decoded, strict=True):
        if isinstance(d, ImagingError):
            reason = OUT_OF_RESOURCES if d.code in _TOO_BIG else CANNOT_UNDERSTAND
            result.failed.append((None, None, reason))
            continue
        m = d.metadata
        sop_class, sop_instance, uid = m.SOPClassUID, m.SOPInstanceUID, m.StudyInstanceUID
        if not (sop_class and sop_instance and uid):
            result.failed.append((sop_class, sop_instance, CANNOT_UNDERSTAND))
            continue
        if url_study_uid is not None and uid != url_study_uid:
            result.failed.append((sop_class, sop_instance, STUDY_MISMATCH))
            continue
        study = _study_for(session, uid, studies, d)
        if not _already_stored(session, study, sop_instance):
            add_file(session, store, study, part.data, d, limits_of(settings))
            touched[study.id] = study
        result.stored.append((sop_class, sop_instance))
    session.flush()
    return result, list(touched.values())


async def _stow(
    request: Request,
    store: ImageStore,
    settings: Settings,
    actor: str,
    url_study_uid: str | None,
) -> JSONResponse:
    request.state.audit = (actor, "study.stow", "study", url_study_uid)
    body = await request.body()
    try:
        parts = parse_multipart_related(request.headers.get("content-type"), body)
    except StowRequestError as e:
        raise APIError(e.status, e.code, e.message) from e
    if len(parts) > settings.max_files_per_upload:
        raise APIError(
            413,
            "too_many_files",
            f"at most {settings.max_files_per_upload} instances per request, got {len(parts)}",
        )
    bad_type = [p.content_type for p in parts if p.content_type != "application/dicom"]
    if bad_type:
        raise APIError(
            415,
            "unsupported_media_type",
            f"every part must be application/dicom; got {sorted(set(bad_type))}",
        )
    decoded = await run_in_threadpool(_decode, parts, settings)

    def commit() -> StoreResult:  # in the thread pool too: file writes and inserts
        # committed here, not after the response: the instances and their jobs are durable
        # before the PACS hears "stored"; one request at a time (`_STORING`)
        with _STORING, request.app.state.session_factory.begin() as session:
            result, studies = store_instances(
                session, store, settings, parts, decoded, url_study_uid
            )
            jobs = [job.id for s in studies if (job := schedule_auto_report(session, settings, s))]
            crud.audit(
                session,
                actor=actor,
                action="study.stow",
                resource_type="study",
                resource_id=studies[0].id if len(studies) == 1 else None,
                outcome="ok" if result.stored else "invalid",
                status_code=result.status,
                detail={
                    "stored": len(result.stored),
                    "failed": len(result.failed),
                    "studies": [s.id for s in studies],
                    "jobs": jobs,
                },
            )
        return result

    result = await run_in_threadpool(commit)
    return JSONResponse(result.to_json(), status_code=result.status, media_type=MEDIA_TYPE)


_DOC: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {'multipart/related; type="application/dicom"': {"schema": {}}},
        }
    },
    "responses": {
        200: {"content": {MEDIA_TYPE: {}}, "description": "all instances stored"},
        202: {"content": {MEDIA_TYPE: {}}, "description": "some instances failed"},
        409: {"content": {MEDIA_TYPE: {}}, "description": "no instance stored"},
    },
    "response_class": JSONResponse,
}


@router.post("/studies", **_DOC)
async def stow_studies(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    principal: Uploader,
) -> JSONResponse:
    """STOW-RS: store instances of any studies."""
    return await _stow(request, store, settings, principal.actor, None)


@router.post("/studies/{study_uid}", **_DOC)
async def stow_study(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    principal: Uploader,
    study_uid: str,
) -> JSONResponse:
    """STOW-RS: store instances of one study (others fail with reason 0xA900)."""
    return await _stow(request, store, settings, principal.actor, study_uid)
