"""Data access for studies, images, reports, audit events and jobs, and the rules they keep.

Every function takes the session first (the per-answer writes and read also take a plain
`Connection`), identifiers positionally, everything else by keyword.
Functions `flush` (so ids and defaults are set) but never commit: the caller owns the
transaction, so an action and its audit event are stored together or not at all.

Report rules: `answer` (the model's output) never changes; `text` starts as a copy of it and is
edited; every change is kept as a `ReportEdit`; a signed report (`final`) changes only by an
amendment (new text and a reason, signed again: `amended`).
API keys live in `tinyllava_med.server.auth` (creation, hashing, verification, roles).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, NamedTuple, NotRequired, TypedDict, Unpack

from sqlalchemy import Select, Text, bindparam, cast, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, object_session, selectinload

from tinyllava_med import __version__
from tinyllava_med.server.db.models import (
    IMAGE_KINDS,
    OUTCOMES,
    REPORT_STATUSES,
    SIGNED_STATUSES,
    STUDY_STATUSES,
    ApiKey,
    AuditEvent,
    Base,
    Image,
    ImageKind,
    Job,
    Outcome,
    Report,
    ReportEdit,
    ReportStatus,
    Study,
    new_id,
    utcnow,
)

MAX_PAGE = 1000

# Core statements built once for the per-answer writes and read. Executed on a connection,
# they skip the ORM's bulk-statement machinery, which cost more than the database work itself
# (py-spy under load: about half of the event loop's time went to storing answers).
_reports, _audit_events, _studies, _images = (
    Base.metadata.tables[m.__tablename__] for m in (Report, AuditEvent, Study, Image)
)
_INSERT_REPORT = insert(_reports)
_INSERT_AUDIT = insert(_audit_events)
_IMAGE_REF = (
    select(_images.c.id, _images.c.sha256, _studies.c.status)
    .join(_studies, _studies.c.id == _images.c.study_id)
    .where(
        _images.c.study_id == bindparam("study_id"),
        _images.c.n == bindparam("n"),
        _images.c.released_at.is_(None),
    )
)
_MARK_REPORTED = (
    update(_studies)
    .where(_studies.c.id == bindparam("study_id"), _studies.c.status != "reported")
    .values(status="reported")
)


# --- domain errors: the app maps them to HTTP once (`status`, `code` are the suggestion) -----


class DomainError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class ReportFinalized(DomainError):
    """A signed report was asked to change."""

    status = 409
    code = "report_final"


class ReportChanged(DomainError):
    """A report was edited by someone else between this edit's read and its write."""

    status = 409
    code = "report_changed"


class ReportOutdated(DomainError):
    """The change was made to a copy of the report (`If-Match`: its `version`) that another
    edit, signature or amendment has replaced since."""

    status = 412
    code = "report_changed"


class ReportGone(DomainError):
    """A draft was deleted with its study between this request's read and its edit."""

    status = 404
    code = "report_not_found"


class StudyHasSignedReports(DomainError):
    """A study whose reports include a signed one was asked to be deleted."""

    status = 409
    code = "study_has_signed_reports"


class InvalidReportUpdate(DomainError):
    status = 422
    code = "invalid_report_update"


# --- helpers -----------------------------------------------------------------------------------


def parse_dicom_date(value: date | str | None) -> date | None:
    """DICOM DA (`YYYYMMDD`, or `YYYY-MM-DD`) -> date. A malformed date in a received file is
    dropped (None) rather than refusing the study; an empty value is None."""
    if value is None or isinstance(value, date):
        return value
    s = value.strip().replace("-", "").replace(".", "")
    if len(s) != 8 or not s.isdigit():
        return None
    try:
        return date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError:
        return None


def _page(stmt: Select[Any], limit: int, offset: int) -> Select[Any]:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be in 1..{MAX_PAGE}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return stmt.limit(limit).offset(offset)


# --- studies and images ------------------------------------------------------------------------


def create_study(
    session: Session,
    *,
    StudyInstanceUID: str | None = None,
    AccessionNumber: str | None = None,
    Modality: str | None = None,
    BodyPartExamined: str | None = None,
    StudyDate: date | str | None = None,
    description: str | None = None,
) -> Study:
    study = Study(
        StudyInstanceUID=StudyInstanceUID or None,
        AccessionNumber=AccessionNumber or None,
        Modality=Modality or None,
        BodyPartExamined=BodyPartExamined or None,
        StudyDate=parse_dicom_date(StudyDate),
        description=description or None,
        images=[],
        reports=[],
    )
    session.add(study)
    session.flush()
    return study


# Statements that every study read runs, built once: building one per call (and its cache key,
# which SQLAlchemy memoises on the statement object) was a third of the ORM's time in GET study.
_STUDY_BY_ID = (
    select(Study).where(Study.id == bindparam("study_id")).options(selectinload(Study.images))
)
_REPORT_COUNTS = (
    select(
        Report.study_id,
        func.count(),
        func.count().filter(Report.status == "draft"),
    )
    .where(Report.study_id.in_(bindparam("study_ids", expanding=True)))
    .group_by(Report.study_id)
)

ReportState = Literal["none", "draft", "signed"]


class ReportCounts(NamedTuple):
    """A study's reports: how many, and how many are drafts awaiting a signature."""

    total: int = 0
    drafts: int = 0

    @property
    def state(self) -> ReportState:
        """`none` (no report), `draft` (a draft awaits a signature) or `signed` (all signed)."""
        return "none" if not self.total else "draft" if self.drafts else "signed"


def get_study(session: Session, study_id: str) -> Study | None:
    """The study with its images loaded (they stay readable after the session closes)."""
    return session.scalars(_STUDY_BY_ID, {"study_id": study_id}).one_or_none()


def study_by_uid(session: Session, study_uid: str) -> Study | None:
    """The newest study here with this Study Instance UID (pushes and retrieves file into it)."""
    return session.scalar(
        select(Study)
        .where(Study.StudyInstanceUID == study_uid)
        .order_by(Study.created_at.desc())
        .limit(1)
    )


class _Filter:
    """A list route's filters (a dataclass): each set field must match."""

    def used(self) -> list[str]:
        """The names of the fields set (for the audit, which keeps no values)."""
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]
        return [n for n in names if getattr(self, n) not in (None, "")]


@dataclass(frozen=True)
class StudyFilter(_Filter):
    """Which studies a worklist shows: each set field must match (exact values, the accession
    number's letters in either case; `study_date_*`
    bound the DICOM Study Date, both ends included); `report_state` keeps the studies whose
    reports are in that state (see `ReportCounts.state`)."""

    modality: str | None = None
    report_state: ReportState | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    study_date_from: date | None = None
    study_date_to: date | None = None

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        for column, value in (
            (Study.Modality, self.modality),
            (Study.StudyInstanceUID, self.study_instance_uid),
        ):
            if value:
                stmt = stmt.where(column == value)
        if self.accession_number:  # typed by a reader: "ct123" finds the order CT123
            stmt = stmt.where(func.upper(Study.AccessionNumber) == self.accession_number.upper())
        if self.study_date_from is not None:
            stmt = stmt.where(Study.StudyDate >= self.study_date_from)
        if self.study_date_to is not None:
            stmt = stmt.where(Study.StudyDate <= self.study_date_to)
        if self.report_state is not None:
            any_report = select(Report.id).where(Report.study_id == Study.id).exists()
            a_draft = (
                select(Report.id)
                .where(Report.study_id == Study.id, Report.status == "draft")
                .exists()
            )
            stmt = stmt.where(
                {"none": ~any_report, "draft": a_draft, "signed": any_report & ~a_draft}[
                    self.report_state
                ]
            )
        return stmt


ALL_STUDIES = StudyFilter()


def list_studies(
    session: Session, where: StudyFilter = ALL_STUDIES, *, limit: int = 50, offset: int = 0
) -> list[Study]:
    """The studies `where` keeps, newest first, images loaded."""
    stmt = where.apply(select(Study).options(selectinload(Study.images)))
    stmt = stmt.order_by(Study.created_at.desc(), Study.id.desc())
    return list(session.scalars(_page(stmt, limit, offset)))


def delete_study(session: Session, study: Study) -> list[str]:
    """Delete `study`, its draft reports (with their edits), images and jobs, and return the
    hashes of its images' files: other studies may hold the same files, so removing them is the
    caller's (`jobs.schedule_sweep`). A study with a signed report is a medical record and is
    not deleted (`StudyHasSignedReports`), nor is one whose draft is signed meanwhile."""
    signed = (
        select(func.count())
        .select_from(Report)
        .where(Report.study_id == study.id, Report.status.in_(SIGNED_STATUSES))
    )
    if n := session.scalar(signed):
        raise StudyHasSignedReports(
            f"the study has {n} signed report(s): they are the medical record and stay; "
            "correct a wrong one by amending it",
            detail={"study_id": study.id, "signed_reports": n},
        )
    hashes = sorted(
        {image.sha256 for image in study.images}
        | {image.header_sha256 for image in study.images if image.header_sha256}
    )
    drafts = delete(Report).where(Report.study_id == study.id, Report.status == "draft")
    session.execute(drafts.execution_options(synchronize_session=False))
    # a report signed since the check is not a draft: the study keeps it, and so RESTRICT
    # refuses the study's deletion below; images, jobs and edits go by ON DELETE CASCADE
    if count_reports(session, ReportFilter(study_id=study.id)):
        raise StudyHasSignedReports(
            "a report of the study was signed meanwhile; it stays",
            detail={"study_id": study.id},
        )
    session.execute(
        delete(Study).where(Study.id == study.id).execution_options(synchronize_session=False)
    )
    session.expunge(study)
    return hashes


def files_in_use(session: Session, hashes: Iterable[str]) -> set[str]:
    """Those of `hashes` the database still needs: files of held images, the headers kept of
    released ones (`retention.py`), and the rejection notes of pushes not yet done (their
    job's payload names them). The others may leave the file store."""
    wanted = list(hashes)
    held = select(Image.sha256).where(Image.sha256.in_(wanted), Image.released_at.is_(None))
    headers = select(Image.header_sha256).where(Image.header_sha256.in_(wanted))
    pushes = select(Job.payload).where(Job.kind == "push_rejection", Job.status != "done")
    notes = {str(payload.get("sha256")) for payload in session.scalars(pushes)}
    return (
        set(session.scalars(held))
        | {h for h in session.scalars(headers) if h}
        | (notes & set(wanted))
    )


def count_studies(session: Session, where: StudyFilter = ALL_STUDIES) -> int:
    return int(session.scalar(where.apply(select(func.count()).select_from(Study))) or 0)


def add_image(
    session: Session,
    *,
    study: Study,
    sha256: str,
    kind: ImageKind,
    size_bytes: int,
    n: int | None = None,
    SOPInstanceUID: str | None = None,
    SeriesInstanceUID: str | None = None,
    SOPClassUID: str | None = None,
    Modality: str | None = None,
    rows: int | None = None,
    columns: int | None = None,
    n_frames: int = 1,
    safe_metadata: Mapping[str, Any] | None = None,
) -> Image:
    """Append an image to `study` (`n` = next index unless given). The file itself is stored
    by `ImageStore.put`; this records its sha256. A study without a modality takes the first
    image's."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"image kind must be one of {', '.join(IMAGE_KINDS)}, got {kind!r}")
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("sha256 must be 64 lowercase hex characters")
    if n is None:
        last = session.scalar(select(func.max(Image.n)).where(Image.study_id == study.id))
        n = 0 if last is None else last + 1
    image = Image(
        study=study,
        n=n,
        sha256=sha256,
        kind=kind,
        size_bytes=size_bytes,
        SOPInstanceUID=SOPInstanceUID or None,
        SeriesInstanceUID=SeriesInstanceUID or None,
        SOPClassUID=SOPClassUID or None,
        Modality=Modality or None,
        rows=rows,
        columns=columns,
        n_frames=n_frames,
        safe_metadata=dict(safe_metadata or {}),
    )
    if study.Modality is None and Modality:
        study.Modality = Modality
    session.add(image)
    session.flush()
    return image


def get_image(session: Session, study_id: str, n: int) -> Image | None:
    stmt = select(Image).where(Image.study_id == study_id, Image.n == n)
    return session.scalars(stmt).one_or_none()


# --- reports -----------------------------------------------------------------------------------


def create_report(
    session: Session,
    *,
    study: Study,
    question: str,
    answer: str,
    model: str,
    quantization: str,
    image: Image | None = None,
    variant: str | None = None,
    model_version: str | None = None,
    model_weights: str | None = None,
    server_version: str = __version__,
    latency_ms: float | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    created_by: str | None = None,
    finish_reason: str | None = None,
) -> Report:
    """A draft report whose editable `text` starts as the model's `answer`."""
    if image is not None and image.study_id != study.id:
        raise ValueError("the image belongs to another study")
    report = Report(
        study=study,
        image=image,
        **_draft(
            question=question,
            answer=answer,
            model=model,
            variant=variant,
            quantization=quantization,
            model_version=model_version,
            model_weights=model_weights,
            server_version=server_version,
            latency_ms=latency_ms,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            created_by=created_by,
            finish_reason=finish_reason,
        ),
    )
    if study.status != "reported":  # received, or signed until this draft is
        study.status = "reported"
    session.add(report)
    session.flush()
    return report


def _draft(*, answer: str, **fields: Any) -> dict[str, Any]:
    return {**fields, "answer": answer, "text": answer, "status": "draft"}


def _connection(db: Session | Connection) -> Connection:
    return db.connection() if isinstance(db, Session) else db


def draft_report_row(
    *, study_id: str, image_id: str | None, answer: str, frame: int | None = None, **fields: Any
) -> dict[str, Any]:
    """Every column of a new draft report, as `insert_draft_reports` writes it (every row the
    same columns: they are inserted together)."""
    now = utcnow()
    return {
        "id": new_id(),
        "study_id": study_id,
        "image_id": image_id,
        "frame": frame,
        "created_at": now,
        "updated_at": now,
        "server_version": __version__,
        **_draft(answer=answer, **fields),
    }


def insert_draft_reports(
    db: Session | Connection, rows: list[dict[str, Any]], mark: Iterable[str] | None = None
) -> None:
    """`create_report` for the answering hot path: one INSERT (of all `rows`) and one UPDATE
    per study to mark `reported` (all the rows' studies, or those in `mark`: a study that
    `image_ref` saw `reported` already needs no UPDATE), without loading studies or images. A
    study deleted meanwhile fails the transaction with an IntegrityError (foreign key)."""
    conn = _connection(db)
    conn.execute(_INSERT_REPORT, rows)
    to_mark = dict.fromkeys(r["study_id"] for r in rows) if mark is None else mark
    if marks := [{"study_id": sid} for sid in dict.fromkeys(to_mark)]:
        conn.execute(_MARK_REPORTED, marks)


def image_ref(db: Session | Connection, study_id: str, n: int) -> tuple[str, str, str] | None:
    """(id, sha256, study status) of image `n` of a study, or None (also for a released image:
    the caller says which): the question path's one read, in Core."""
    row = _connection(db).execute(_IMAGE_REF, {"study_id": study_id, "n": n}).first()
    return None if row is None else (row[0], row[1], row[2])


def get_report(session: Session, report_id: str) -> Report | None:
    return session.get(Report, report_id)


@dataclass(frozen=True)
class ReportFilter(_Filter):
    """Which reports a list shows: each set field must match. `accession_number` and
    `study_instance_uid` are the study's; `signed_since` keeps the reports signed (or amended,
    which signs again) at or after that time, for a RIS that polls for new results."""

    status: ReportStatus | None = None
    study_id: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    signed_since: datetime | None = None

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        for column, value in (
            (Report.status, self.status),
            (Report.study_id, self.study_id),
        ):
            if value:
                stmt = stmt.where(column == value)
        if self.signed_since is not None:
            stmt = stmt.where(Report.signed_at >= self.signed_since)
        studies = StudyFilter(
            accession_number=self.accession_number, study_instance_uid=self.study_instance_uid
        )
        if studies.used():
            stmt = stmt.where(Report.study_id.in_(studies.apply(select(Study.id))))
        return stmt


ALL_REPORTS = ReportFilter()


def list_reports(
    session: Session, where: ReportFilter = ALL_REPORTS, *, limit: int = 50, offset: int = 0
) -> list[Report]:
    """The reports `where` keeps, newest first."""
    stmt = where.apply(select(Report)).order_by(Report.created_at.desc(), Report.id.desc())
    return list(session.scalars(_page(stmt, limit, offset)))


def count_reports(session: Session, where: ReportFilter = ALL_REPORTS) -> int:
    return int(session.scalar(where.apply(select(func.count()).select_from(Report))) or 0)


def report_counts(session: Session, study_ids: Sequence[str]) -> dict[str, ReportCounts]:
    """Each study's report counts (zeros for none), in one grouped COUNT: a study's report
    list can run to hundreds of rows, none of which a count needs to load."""
    rows = session.execute(_REPORT_COUNTS, {"study_ids": list(study_ids)})
    counts = {str(sid): ReportCounts(int(n), int(d)) for sid, n, d in rows}
    return {sid: counts.get(sid, ReportCounts()) for sid in study_ids}


def key_names(session: Session, key_ids: Iterable[str | None]) -> dict[str, str]:
    """The names of these API keys (by id), in one query."""
    ids = sorted({k for k in key_ids if k})
    if not ids:
        return {}
    rows = session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(ids)))
    return {str(i): str(n) for i, n in rows}


def report_version(report: Report) -> str:
    """A token that changes with every change to the report: its ETag, which a client sends
    back (`If-Match`) so that it changes only the version its user has read."""
    t = report.updated_at
    stamp = (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    return hashlib.sha256(f"{report.id}|{report.status}|{stamp}".encode()).hexdigest()[:20]


def update_report(
    session: Session,
    report: Report,
    *,
    text: str | None = None,
    status: ReportStatus | None = None,
    actor: str,
    reason: str | None = None,
    version: str | None = None,
) -> Report:
    """Edit a draft's text and/or sign it (`status="final"`), or amend a signed report (`status=
    "amended"` with its new text and a `reason`: it is signed again, by `actor`), recording a
    `ReportEdit` that keeps the replaced version.

    Raises `ReportFinalized` for any other change to a signed report (it cannot be edited or
    returned to draft), `ReportChanged` when another edit committed since this one read the
    report, and `InvalidReportUpdate` for an unknown status, signing an empty text, amending a
    draft, an amendment that changes nothing or gives no reason, or a reason without one.
    Permission to edit or sign is checked by the caller (see `auth.require`). With `version`
    (`report_version` of the copy the user read), raises `ReportOutdated` when the report is
    another version now: nobody signs or overwrites text they have not seen.
    """
    if status is not None and status not in REPORT_STATUSES:
        raise InvalidReportUpdate(
            f"status must be one of {', '.join(REPORT_STATUSES)}, got {status!r}"
        )
    if reason is not None and status != "amended":
        raise InvalidReportUpdate("a reason is given only with status 'amended'")
    # Re-read under a row lock (PostgreSQL), so two concurrent edits cannot both pass the
    # checks on the report's status.
    _reread(report, with_for_update=True)
    if _repeats_signature(report, text, status, actor):
        return report  # a client retrying a signature whose answer it lost: already done
    if version is not None and version != report_version(report):
        raise ReportOutdated(
            "the report was changed by someone else since you read it: read it again",
            detail={
                "report_id": report.id,
                "status": report.status,
                "updated_at": _iso(report.updated_at),
            },
        )
    _check_change(report, text, status, reason)
    new_text = report.text if text is None else text
    new_status = report.status if status is None else status
    if new_status in SIGNED_STATUSES and not new_text.strip():
        raise InvalidReportUpdate("an empty report cannot be signed")
    if new_text == report.text and new_status == report.status:
        return report  # nothing changed, nothing to record
    now = utcnow()
    # SQLite takes no row lock for that read: write only if the report is still as read (a
    # concurrent edit or signature committed since changed its status or `updated_at`), else
    # read it again and refuse
    claimed = session.execute(
        update(Report)
        .where(
            Report.id == report.id,
            Report.status == report.status,
            Report.updated_at == report.updated_at,
        )
        .values(updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        _reread(report)
        if report.status in SIGNED_STATUSES and status != "amended":
            _check_change(report, text, status, reason)  # signed meanwhile
        raise ReportChanged(
            "the report was edited meanwhile; read it again before editing",
            detail={"report_id": report.id, "updated_at": _iso(report.updated_at)},
        )
    session.add(
        ReportEdit(
            report=report,
            previous_text=report.text,
            new_text=new_text,
            previous_status=report.status,
            new_status=new_status,
            edited_by=actor,
            edited_at=now,
            previous_updated_at=report.updated_at,
            reason=reason.strip() if reason is not None else None,
        )
    )
    report.text = new_text
    report.updated_at = now
    if new_status in SIGNED_STATUSES:
        report.status = new_status
        report.signed_by = actor
        report.signed_at = now
        others = select(Report.id).where(
            Report.study_id == report.study_id, Report.status == "draft", Report.id != report.id
        )
        report.study.status = "reported" if session.scalar(others.exists().select()) else "signed"
    session.flush()
    return report


def _reread(report: Report, *, with_for_update: bool = False) -> None:
    """Refresh `report` from the database; `ReportGone` when its study was deleted meanwhile."""
    session = object_session(report)
    assert session is not None
    stmt = select(Report).where(Report.id == report.id).execution_options(populate_existing=True)
    if session.scalar(stmt.with_for_update() if with_for_update else stmt) is None:
        raise ReportGone("the report was deleted with its study")


def _repeats_signature(
    report: Report, text: str | None, status: ReportStatus | None, actor: str
) -> bool:
    """The request asks for the signature `actor` already gave, with the same text."""
    return (
        report.status == "final"
        and status == "final"
        and report.signed_by == actor
        and (text is None or text == report.text)
    )


def _check_change(
    report: Report, text: str | None, status: ReportStatus | None, reason: str | None
) -> None:
    """Refuse what `report`'s status does not allow: a signed report changes only by an
    amendment (new text and a reason), and only a signed report is amended."""
    if report.status not in SIGNED_STATUSES:
        if status == "amended":
            raise InvalidReportUpdate(
                "only a signed report is amended; a draft is signed with status 'final'"
            )
        return
    if status != "amended":
        raise ReportFinalized(
            f"the report is signed ({report.status}); it can no longer be edited, only amended "
            "(send the corrected text with status 'amended' and a reason)",
            detail={"report_id": report.id, "signed_at": _iso(report.signed_at)},
        )
    if text is None or text == report.text:
        raise InvalidReportUpdate("an amendment must change the report's text")
    if not (reason or "").strip():
        raise InvalidReportUpdate("an amendment needs a reason (why the signed text was wrong)")


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


# --- audit -------------------------------------------------------------------------------------

_PATIENT_KEYS = ("patient", "accessionnumber", "otherpatient", "issuerofpatient")


def _check_no_patient_keys(value: Any, path: str = "detail") -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            norm = str(k).lower().replace("_", "").replace("-", "")
            if norm.startswith(_PATIENT_KEYS):
                raise ValueError(f"{path}: key {k!r} looks like a patient identifier")
            _check_no_patient_keys(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_no_patient_keys(v, f"{path}[{i}]")


class AuditFields(TypedDict):
    actor: str
    action: str
    resource_type: str
    resource_id: str | None
    outcome: Outcome
    status_code: int
    detail: NotRequired[Mapping[str, Any] | None]


def audit_row(**event: Unpack[AuditFields]) -> dict[str, Any]:
    """One audit event's columns, checked: `detail` must not carry patient identifiers (keys
    such as `PatientName` or `AccessionNumber` are refused with ValueError)."""
    outcome, detail = event["outcome"], event.get("detail")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    _check_no_patient_keys(detail)
    return {**event, "detail": dict(detail) if detail is not None else None}


def insert_audit_rows(db: Session | Connection, rows: list[dict[str, Any]]) -> None:
    """Record `audit_row`s in one INSERT."""
    _connection(db).execute(_INSERT_AUDIT, rows)


def audit(db: Session | Connection, **event: Unpack[AuditFields]) -> None:
    """Record one audit event (`audit_row`; a single INSERT, no ORM unit of work: every
    request audits)."""
    insert_audit_rows(db, [audit_row(**event)])


class AuditQuery(TypedDict, total=False):
    """Which audit events to read: each given field must match; `since` (inclusive) and
    `until` (exclusive) bound `at`; `resource_id` also matches an event whose detail names it
    among others (a list page's studies and reports, an import's studies)."""

    actor: str | None
    action: str | None
    resource_type: str | None
    resource_id: str | None
    outcome: Outcome | None
    since: datetime | None
    until: datetime | None


def _audit_filter(stmt: Select[Any], query: AuditQuery) -> Select[Any]:
    for name in ("actor", "action", "resource_type", "outcome"):
        if (value := query.get(name)) is not None:
            stmt = stmt.where(getattr(AuditEvent, name) == value)
    if (resource := query.get("resource_id")) is not None:
        # the event about it, or one that names it among others (a list page, an import)
        named = cast(AuditEvent.detail, Text).contains(json.dumps(resource), autoescape=True)
        stmt = stmt.where(or_(AuditEvent.resource_id == resource, named))
    if (since := query.get("since")) is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if (until := query.get("until")) is not None:
        stmt = stmt.where(AuditEvent.at < until)
    return stmt


def list_audit_events(
    session: Session, *, limit: int = 100, offset: int = 0, **query: Unpack[AuditQuery]
) -> list[AuditEvent]:
    """Newest first."""
    stmt = _audit_filter(select(AuditEvent), query).order_by(AuditEvent.id.desc())
    return list(session.scalars(_page(stmt, limit, offset)))


def count_audit_events(session: Session, **query: Unpack[AuditQuery]) -> int:
    stmt = _audit_filter(select(func.count()).select_from(AuditEvent), query)
    return int(session.scalar(stmt) or 0)


# --- jobs (claimed by workers in a later issue) ------------------------------------------------


def enqueue_job(
    session: Session,
    *,
    kind: str,
    payload: Mapping[str, Any] | None = None,
    study_id: str | None = None,
    max_attempts: int = 3,
) -> Job:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    job = Job(
        kind=kind,
        payload=dict(payload or {}),
        study_id=study_id,
        max_attempts=max_attempts,
        status="queued",
    )
    session.add(job)
    session.flush()
    return job


# --- what waits, for `/metrics` ----------------------------------------------------------------


# how long a key in use that expired stays in `Backlog.keys_expire` (and its alert firing)
KEY_EXPIRED_SHOWN = timedelta(days=7)


class Backlog(NamedTuple):
    """Studies by status (every status, from 0) with the arrival of the oldest unsigned one per
    status, due jobs by kind with the time the longest-waiting one became due, and by role the
    soonest expiry of the API keys in use (not revoked, used at least once, with an expiry, not
    expired more than `KEY_EXPIRED_SHOWN` ago)."""

    studies: dict[str, int]
    oldest_unsigned: dict[str, datetime]
    jobs_due: dict[str, int]
    oldest_due: datetime | None
    keys_expire: dict[str, datetime]


def backlog(session: Session, now: datetime | None = None) -> Backlog:
    """Grouped reads served by the (status, ...) indexes of studies and jobs, and the (few)
    API keys."""
    now = now or utcnow()
    studies = session.execute(
        select(Study.status, func.count(), func.min(Study.created_at)).group_by(Study.status)
    ).all()
    jobs = session.execute(
        select(Job.kind, func.count(), func.min(Job.run_after))
        .where(Job.status == "queued", Job.run_after <= now)
        .group_by(Job.kind)
    ).all()
    keys = session.execute(
        select(ApiKey.role, func.min(ApiKey.expires_at))
        .where(
            ApiKey.revoked_at.is_(None),
            ApiKey.expires_at > now - KEY_EXPIRED_SHOWN,  # its client is refused now: still say
            ApiKey.last_used_at.is_not(None),
        )
        .group_by(ApiKey.role)
    ).all()
    return Backlog(
        studies={**dict.fromkeys(STUDY_STATUSES, 0), **{s: n for s, n, _ in studies}},
        oldest_unsigned={s: at for s, _, at in studies if s != "signed"},
        jobs_due={kind: n for kind, n, _ in jobs},
        oldest_due=min((at for *_, at in jobs), default=None),
        keys_expire={role: at for role, at in keys if at is not None},
    )


__all__ = [
    "ALL_REPORTS",
    "Backlog",
    "DomainError",
    "InvalidReportUpdate",
    "ReportChanged",
    "ReportOutdated",
    "ReportGone",
    "ReportFilter",
    "ReportFinalized",
    "add_image",
    "audit",
    "backlog",
    "count_audit_events",
    "count_reports",
    "count_studies",
    "create_report",
    "create_study",
    "delete_study",
    "enqueue_job",
    "files_in_use",
    "get_image",
    "get_report",
    "get_study",
    "key_names",
    "list_audit_events",
    "list_reports",
    "list_studies",
    "parse_dicom_date",
    "ReportCounts",
    "ReportState",
    "StudyFilter",
    "report_counts",
    "update_report",
]
