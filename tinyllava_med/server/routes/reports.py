"""`/v1/reports`: list, read, edit and sign the answers stored as reports."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from tinyllava_med.server.auth import deny_unless
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import SIGNED_STATUSES, Report
from tinyllava_med.server.db.session import after_commit
from tinyllava_med.server.deps import (
    AccessionNumber,
    Limit,
    MetricsDep,
    Offset,
    ReportEditor,
    ReportReader,
    SessionDep,
    SettingsDep,
    StoreDep,
    StudyInstanceUid,
    as_utc,
)
from tinyllava_med.server.dicom_sr import report_sr, signer_name
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.fhir import MEDIA_TYPE as FHIR_MEDIA_TYPE
from tinyllava_med.server.fhir import build_diagnostic_report
from tinyllava_med.server.jobs import schedule_push
from tinyllava_med.server.schemas import (
    ReportEditPublic,
    ReportHistory,
    ReportList,
    ReportPublic,
    ReportStatus,
    ReportUpdate,
)
from tinyllava_med.server.serving import load_audited, report_public

router = APIRouter(prefix="/v1/reports", tags=["reports"])


@router.get("", response_model=ReportList)
def list_reports(
    session: SessionDep,
    principal: ReportReader,
    status: ReportStatus | None = None,
    study_id: str | None = None,
    accession_number: AccessionNumber = None,
    study_instance_uid: StudyInstanceUid = None,
    signed_since: Annotated[
        datetime | None,
        Query(
            description="signed or amended at or after (ISO 8601; UTC without an offset): "
            "a RIS polling for new results"
        ),
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> ReportList:
    """Newest first; every filter given must match."""
    where = crud.ReportFilter(
        status=status,
        study_id=study_id,
        accession_number=accession_number.strip() if accession_number else None,
        study_instance_uid=study_instance_uid.strip() if study_instance_uid else None,
        signed_since=as_utc(signed_since),
    )
    rows = crud.list_reports(session, where, limit=limit, offset=offset)
    crud.audit(
        session,
        actor=principal.actor,
        action="report.list",
        resource_type="report",
        resource_id=None,
        outcome="ok",
        status_code=200,
        # which filters were used, never their values; which reports (and whose studies) the
        # page showed, by this server's ids
        detail={
            "count": len(rows),
            "filters": where.used(),
            "reports": [r.id for r in rows],
            "studies": list(dict.fromkeys(r.study_id for r in rows)),
        },
    )
    names = crud.key_names(session, (r.signed_by for r in rows))
    return ReportList(
        data=[report_public(r, signer_name=names.get(r.signed_by or "")) for r in rows],
        count=crud.count_reports(session, where),
    )


@router.get("/{report_id}", response_model=ReportPublic)
def get_report(
    request: Request,
    response: Response,
    session: SessionDep,
    report_id: str,
    principal: ReportReader,
) -> ReportPublic:
    """The report, its `version` also as the `ETag` header."""
    report = _public(session, _read(request, session, report_id, principal.actor, "report.read"))
    response.headers["ETag"] = f'"{report.version}"'
    return report


@router.patch("/{report_id}", response_model=ReportPublic)
def update_report(
    request: Request,
    response: Response,
    session: SessionDep,
    report_id: str,
    body: ReportUpdate,
    principal: ReportEditor,
    settings: SettingsDep,
    metrics: MetricsDep,
    if_match: Annotated[
        str | None,
        Header(
            description='the `version` the user read, as `"<version>"`: 412 `report_changed` '
            "when the report is another version now (someone else edited, signed or amended "
            "it), so nobody signs text they have not seen"
        ),
    ] = None,
) -> ReportPublic:
    if body.text is None and body.status is None:
        raise APIError(422, "empty_update", "send `text`, `status` or both")
    if body.status in SIGNED_STATUSES:  # editing is `report.edit`'s; signing is not
        deny_unless(request, principal, "report.sign")
    # a refused signature or amendment is audited as one too, as a failed one (409, 422)
    actions = {"final": "report.sign", "amended": "report.amend"}
    action = actions.get(body.status or "", "report.edit")
    report = load_audited(
        request, session, "report", report_id, actor=principal.actor, action=action
    )
    version = report.updated_at
    crud.update_report(
        session,
        report,
        text=body.text,
        status=body.status,
        actor=principal.actor,
        reason=body.reason,
        version=_version_of(if_match),
    )
    if report.status in SIGNED_STATUSES and report.updated_at != version:
        schedule_push(session, settings, report)  # the PACS gets the signed (or amended) SR
        variant = report.variant or report.model
        signed = (report.status, variant, report.text, report.answer)
        after_commit(session, lambda: metrics.on_signed(*signed))
    crud.audit(
        session,
        actor=principal.actor,
        action=action,
        resource_type="report",
        resource_id=report.id,
        outcome="ok",
        status_code=200,
    )
    session.flush()
    session.refresh(report)
    public = _public(session, report)
    response.headers["ETag"] = f'"{public.version}"'
    return public


def _version_of(if_match: str | None) -> str | None:
    """The version an `If-Match` header names (`"v"` or `W/"v"`); None for none or `*`."""
    if if_match is None or if_match.strip() == "*":
        return None
    tags = [t.strip().removeprefix("W/").strip('"') for t in if_match.split(",")]
    if len(tags) != 1 or not tags[0]:
        raise APIError(400, "bad_if_match", 'If-Match names one version: "<version>"')
    return tags[0]


@router.get("/{report_id}/history", response_model=ReportHistory)
def get_report_history(
    request: Request, session: SessionDep, report_id: str, principal: ReportReader
) -> ReportHistory:
    """Every change to the report, oldest first: edits, the signature, amendments (with the
    signed text each replaced and why)."""
    report = _read(request, session, report_id, principal.actor, "report.history")
    edits = [ReportEditPublic.model_validate(e, from_attributes=True) for e in report.edits]
    return ReportHistory(data=edits, count=len(edits))


def _public(session: Session, report: Report) -> ReportPublic:
    return report_public(report, signer_name=signer_name(session, report))


def _read(request: Request, session: Session, report_id: str, actor: str, action: str) -> Report:
    """The report, or a 404; either way the read is audited as `action`."""
    report = load_audited(request, session, "report", report_id, actor=actor, action=action)
    crud.audit(
        session,
        actor=actor,
        action=action,
        resource_type="report",
        resource_id=report.id,
        outcome="ok",
        status_code=200,
    )
    return report


@router.get(
    "/{report_id}/sr",
    response_class=Response,
    responses={200: {"content": {"application/dicom": {}}, "description": "DICOM SR, Part 10"}},
)
def get_report_sr(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    report_id: str,
    principal: ReportReader,
) -> Response:
    """The report as a DICOM Comprehensive SR (409 when its image is PNG/JPEG)."""
    report = _read(request, session, report_id, principal.actor, "report.export_sr")
    data = report_sr(session, store, report, settings.institution_name)
    return Response(
        data,
        media_type="application/dicom",
        headers={"Content-Disposition": f'attachment; filename="report-{report.id}.dcm"'},
    )


@router.get(
    "/{report_id}/fhir",
    response_class=Response,
    responses={200: {"content": {FHIR_MEDIA_TYPE: {}}, "description": "FHIR DiagnosticReport"}},
)
def get_report_fhir(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    report_id: str,
    principal: ReportReader,
) -> Response:
    """The report as a FHIR R4B DiagnosticReport."""
    report = _read(request, session, report_id, principal.actor, "report.export_fhir")
    resource = build_diagnostic_report(
        report,
        signer_name=signer_name(session, report),
        institution=settings.institution_name,
    )
    return Response(resource.model_dump_json(), media_type=FHIR_MEDIA_TYPE)
