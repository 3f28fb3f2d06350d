"""`/v1/studies`: upload DICOM / PNG / JPEG files, retrieve a study from the PACS, list, read and
delete studies, render images."""

from __future__ import annotations

import io
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BeforeValidator

from tinyllava_med.server.db import crud
from tinyllava_med.server.deps import (
    AccessionNumber,
    Limit,
    Offset,
    SessionDep,
    SettingsDep,
    StoreDep,
    StudyDeleter,
    StudyInstanceUid,
    StudyReader,
    Uploader,
)
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.ingest import file_upload
from tinyllava_med.server.jobs import schedule_rejection, schedule_retrieve, schedule_sweep
from tinyllava_med.server.media_import import import_media
from tinyllava_med.server.pull import PacsError, find_studies
from tinyllava_med.server.rejection import pushed_srs, rejection_note
from tinyllava_med.server.schemas import (
    ImportResult,
    RetrieveQueued,
    RetrieveRequest,
    StudyList,
    StudyPublic,
)
from tinyllava_med.server.serving import (
    Upload,
    image_of,
    load_audited,
    render,
    study_public,
)


def _date_param(value: Any) -> Any:
    """DICOM's YYYYMMDD (how a PACS writes a Study Date) as a date; other digits are refused,
    not read as seconds since 1970 (pydantic's reading of a number)."""
    if isinstance(value, str) and value.isdigit():
        if (parsed := crud.parse_dicom_date(value)) is None:
            raise ValueError("a date is YYYY-MM-DD or YYYYMMDD")
        return parsed
    return value


router = APIRouter(prefix="/v1/studies", tags=["studies"])

# studies one retrieve queues at most: an accession number names one study, or a few (one order
# for several examinations); more is a mistake on the RIS side, not a study to fetch
MAX_RETRIEVE_STUDIES = 10


@router.post(
    "",
    status_code=201,
    response_model=StudyPublic,
    responses={200: {"model": StudyPublic, "description": "every file was held already"}},
)
async def upload_study(
    request: Request,
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    principal: Uploader,
    files: Annotated[list[UploadFile], File(description="DICOM Part 10, PNG or JPEG")],
) -> StudyPublic:
    """Upload one study's files. DICOM files are filed under the study held with their Study
    Instance UID, if there is one (as STOW-RS and imports file them): 201 when files were new,
    200 when all were held already; an instance is never stored twice. Images make a new study.

    Decoding and storing run in the thread pool: a large series must not stall the event
    loop (and with it every question being answered). A refused upload (a broken file, a full
    disk) is audited as such by the error handler."""
    request.state.audit = (principal.actor, "study.upload", "study", None)
    uploads = [Upload(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]

    def store_study() -> StudyPublic:
        filed = file_upload(session, store, settings, uploads, actor=principal.actor)
        response.status_code = 201 if filed.new else 200
        if filed.created:
            return study_public(filed.study)
        # a study held already may have reports
        return study_public(
            filed.study, crud.report_counts(session, [filed.study.id])[filed.study.id]
        )

    return await run_in_threadpool(store_study)


@router.post(
    "/import",
    response_model=ImportResult,
    status_code=201,
    responses={200: {"model": ImportResult, "description": "every image was held already"}},
)
async def import_studies(
    request: Request,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    principal: Uploader,
    files: Annotated[
        list[UploadFile], File(description="the files of a CD, USB stick or folder, or a ZIP")
    ],
) -> ImportResult:
    """Import DICOM media (a patient's CD, a folder, a ZIP): every image is filed under the
    study with its Study Instance UID, so one import may bring several studies; the DICOMDIR,
    objects without pixels and non-DICOM files are skipped. 201 when images were new, 200 when
    all were here already, 422 `no_images` when none was an image."""
    request.state.audit = (principal.actor, "study.import", "study", None)
    sessions = request.app.state.session_factory

    def run() -> ImportResult:
        summary = import_media(
            sessions, store, settings, [f.file for f in files], actor=principal.actor
        )
        if not (summary.stored or summary.already):
            refused = sum(summary.failed.values())
            raise APIError(
                422,
                "no_images",
                f"none of the {len(files)} files could be imported: see detail.failed"
                if refused
                else f"none of the {len(files)} files holds a DICOM image",
                detail={"skipped": dict(summary.skipped), "failed": dict(summary.failed)},
            )
        # every study the images are in, new or held already; in a session of its own, which
        # sees what the import committed. The answer shows them all, so the audit names them
        # all (the import's own events name only those that got new images)
        with sessions.begin() as session:
            studies = [s for u in summary.study_uids if (s := crud.study_by_uid(session, u))]
            counts = crud.report_counts(session, [s.id for s in studies])
            ids = [s.id for s in studies]
            crud.audit(
                session,
                actor=principal.actor,
                action="study.read",
                resource_type="study",
                resource_id=ids[0] if len(ids) == 1 else None,
                outcome="ok",
                status_code=201 if summary.stored else 200,
                detail={"studies": ids, "via": "import"},
            )
            return ImportResult(
                studies=[study_public(s, counts[s.id]) for s in studies],
                stored=summary.stored,
                already=summary.already,
                skipped=dict(summary.skipped),
                failed=dict(summary.failed),
                jobs=summary.jobs,
            )

    result = await run_in_threadpool(run)
    response.status_code = 201 if result.stored else 200
    return result


@router.post("/retrieve", status_code=202, response_model=RetrieveQueued)
def retrieve_from_pacs(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: Uploader,
    body: RetrieveRequest,
) -> RetrieveQueued:
    """Fetch a study that was never pushed here from the PACS (`dicomweb_pull_url` or
    `dimse_pull`): it is found now (QIDO-RS or C-FIND; 404 `not_in_pacs`, 502
    `pacs_unavailable`), and fetched by a job (WADO-RS or C-MOVE) whose result names the
    study here once it is stored."""
    request.state.audit = (principal.actor, "study.retrieve", "study", None)
    if not settings.pulls_from_pacs:
        raise APIError(  # 501, not 503: nothing changes until the operator configures a PACS
            501,
            "pacs_not_configured",
            "no PACS to retrieve from: set TINYLLAVA_MED_DICOMWEB_PULL_URL or _DIMSE_PULL",
        )
    try:
        uids = find_studies(
            settings,
            accession_number=body.accession_number,
            study_uid=body.study_instance_uid,
        )
    except PacsError as e:
        raise APIError(502, "pacs_unavailable", str(e)) from e
    if not uids:
        what = "accession number" if body.accession_number else "Study Instance UID"
        raise APIError(404, "not_in_pacs", f"the PACS holds no study with that {what}")
    if len(uids) > MAX_RETRIEVE_STUDIES:
        raise APIError(
            409,
            "too_many_studies",
            f"the PACS holds {len(uids)} studies with that accession number (at most "
            f"{MAX_RETRIEVE_STUDIES} are retrieved at once): retrieve by Study Instance UID",
        )
    jobs = [schedule_retrieve(session, settings, uid) for uid in uids]
    session.flush()
    crud.audit(
        session,
        actor=principal.actor,
        action="study.retrieve",
        resource_type="study",
        resource_id=None,
        outcome="ok",
        status_code=202,
        detail={"jobs": [j.id for j in jobs], "studies_found": len(uids)},
    )
    return RetrieveQueued(jobs=[j.id for j in jobs], study_instance_uids=uids)


@router.get("", response_model=StudyList)
def list_studies(
    session: SessionDep,
    principal: StudyReader,
    limit: Limit = 50,
    offset: Offset = 0,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    report_status: Annotated[
        crud.ReportState | None,
        Query(description="none, draft (a draft awaits a signature) or signed"),
    ] = None,
    accession_number: AccessionNumber = None,
    study_instance_uid: StudyInstanceUid = None,
    study_date_from: Annotated[
        date | None,
        BeforeValidator(_date_param),
        Query(description="Study Date on or after (YYYY-MM-DD, or DICOM's YYYYMMDD)"),
    ] = None,
    study_date_to: Annotated[
        date | None, BeforeValidator(_date_param), Query(description="Study Date on or before")
    ] = None,
) -> StudyList:
    """Newest first, each with its report counts and state; every filter given must match."""
    if study_date_from and study_date_to and study_date_from > study_date_to:
        raise APIError(
            422, "invalid_request", "study_date_from is after study_date_to", detail=None
        )
    where = crud.StudyFilter(
        modality=modality,
        report_state=report_status,
        accession_number=accession_number.strip() if accession_number else None,
        study_instance_uid=study_instance_uid.strip() if study_instance_uid else None,
        study_date_from=study_date_from,
        study_date_to=study_date_to,
    )
    studies = crud.list_studies(session, where, limit=limit, offset=offset)
    crud.audit(
        session,
        actor=principal.actor,
        action="study.list",
        resource_type="study",
        resource_id=None,
        outcome="ok",
        status_code=200,
        # which filters were used, never their values (an accession number names a patient's
        # examination); which studies the page showed, by this server's ids
        detail={"count": len(studies), "filters": where.used(), "studies": [s.id for s in studies]},
    )
    counts = crud.report_counts(session, [s.id for s in studies])
    return StudyList(
        data=[study_public(s, counts[s.id]) for s in studies],
        count=crud.count_studies(session, where),
    )


@router.get("/{study_id}", response_model=StudyPublic)
def get_study(
    request: Request, session: SessionDep, study_id: str, principal: StudyReader
) -> StudyPublic:
    study = load_audited(
        request, session, "study", study_id, actor=principal.actor, action="study.read"
    )
    crud.audit(
        session,
        actor=principal.actor,
        action="study.read",
        resource_type="study",
        resource_id=study.id,
        outcome="ok",
        status_code=200,
    )
    return study_public(study, crud.report_counts(session, [study.id])[study.id])


@router.delete("/{study_id}", status_code=204)
def delete_study(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    study_id: str,
    principal: StudyDeleter,
) -> None:
    """A study sent by mistake (the wrong patient, say) goes, with its draft reports; one with a
    signed report stays (409). Its files are removed by a job `image_sweep_grace_s` later,
    unless another study holds them. SRs already pushed to the PACS are rejected there by an
    IOCM rejection note (`rejection.py`)."""
    study = load_audited(
        request, session, "study", study_id, actor=principal.actor, action="study.delete"
    )
    images = len(study.images)
    pushed = []  # with no PACS to tell, there is nothing to reject
    if settings.pushes_to_pacs:
        pushed = pushed_srs(session, store, study, settings.institution_name)
    hashes = crud.delete_study(session, study)
    sweep = schedule_sweep(session, settings, hashes)
    rejection = None
    if pushed:
        note = store.put(rejection_note(pushed, settings.institution_name))
        rejection = schedule_rejection(session, settings, note, len(pushed))
    crud.audit(
        session,
        actor=principal.actor,
        action="study.delete",
        resource_type="study",
        resource_id=study_id,
        outcome="ok",
        status_code=204,
        detail={
            "images": images,
            "sweep_job_id": sweep.id if sweep else None,
            "rejected_srs": len(pushed),
            "rejection_job_id": rejection.id if rejection else None,
        },
    )


@router.get(
    "/{study_id}/images/{index}",
    responses={200: {"content": {"image/png": {}}, "description": "the rendered image"}},
    response_class=Response,
)
def get_image(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    study_id: str,
    index: int,
    principal: StudyReader,
    window: Annotated[str | None, Query(description="soft-tissue, lung, bone, brain, ...")] = None,
    frame: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    study = load_audited(
        request, session, "study", study_id, actor=principal.actor, action="image.read"
    )
    image = image_of(study, index)
    pil = render(store, image.sha256, settings, frame=frame, window=window)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    crud.audit(
        session,
        actor=principal.actor,
        action="image.read",
        resource_type="study",
        resource_id=study.id,
        outcome="ok",
        status_code=200,
        detail={"image": index},
    )
    # no-store, as every answer here (`DEFAULT_HEADERS`): a render kept in a browser's cache
    # was shown again without a key, to anyone at that browser, and unaudited
    return Response(buf.getvalue(), media_type="image/png")
