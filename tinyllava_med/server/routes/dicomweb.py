"""`/dicomweb/studies`: STOW-RS, so a PACS (Orthanc, dcm4chee, a modality router) can push studies.

Every part is decoded before anything is stored, then filed by `ingest.file_instances` (the study
with the same Study Instance UID, automatic reports queued in the same transaction) before the
response is sent.

Statuses (PS3.18 §10.5.3): 200 all stored, 202 some failed, 409 none stored (body: the
`application/dicom+json` store response with per-instance Failure Reasons); 400 malformed
multipart and 415 wrong media type get the project's error shape. The response is JSON whatever
the Accept header asks (RFC 9110 lets a server answer so): dcm4che's `stowrs` asks for XML by
default, and refusing it (406) would lose the images over the reply's format.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from tinyllava_med.server.deps import SettingsDep, StoreDep, Uploader
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.ingest import audit_as, decode, file_instances
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore
from tinyllava_med.server.stow import (
    MEDIA_TYPE,
    StowRequestError,
    parse_multipart_related,
)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])


async def _stow(
    request: Request,
    store: ImageStore,
    settings: Settings,
    actor: str,
    url_study_uid: str | None,
) -> JSONResponse:
    request.state.audit = (actor, "study.stow", "study", url_study_uid)
    body = await request.body()
    try:  # off the event loop: a body of up to max_upload_bytes takes a while to split
        parts = await run_in_threadpool(
            parse_multipart_related,
            request.headers.get("content-type"),
            body,
            settings.max_files_per_upload,
        )
    except StowRequestError as e:
        raise APIError(e.status, e.code, e.message) from e
    bad_type = [p.content_type for p in parts if p.content_type != "application/dicom"]
    if bad_type:
        raise APIError(
            415,
            "unsupported_media_type",
            f"every part must be application/dicom; got {sorted(set(bad_type))}",
        )
    decoded = await run_in_threadpool(decode, parts, settings, store)

    # committed here, not after the response: the instances and their jobs are durable before
    # the PACS hears "stored" (in the thread pool: file writes and inserts)
    result, _, _ = await run_in_threadpool(
        file_instances,
        request.app.state.session_factory,
        store,
        settings,
        parts,
        decoded,
        url_study_uid,
        audit_as(actor, "study.stow"),
    )
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
