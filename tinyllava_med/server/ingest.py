"""Filing DICOM instances into studies by their Study Instance UID: pushed by a PACS (STOW-RS,
`routes/dicomweb.py`, and the DIMSE Storage SCP, `dimse.py`) and uploaded (`POST /v1/studies`,
`POST /v1/ask`: `file_upload`).

Each instance is decoded first (outside any lock or transaction, with the server's image
limits), then filed under the study with the same Study Instance UID (created on first sight);
an instance already stored is acknowledged again without a copy, and one whose pixels were
released (`retention.py`) is filed under its row again. An instance naming a study held for
another patient (a device that reused a UID) is refused: a report would otherwise sit beside
another patient's images. For pushes, in the same transaction every study that got new
instances has its automatic report queued (`auto_report_prompts`), so the instances and their
jobs are durable before the sender hears "stored".

An upload is one study: every file is decoded and validated before anything is stored, so a
bad file rejects the whole upload and leaves the database and the image store as they were.
PNG and JPEG images, which carry no UID, always make a new study.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import event, func, or_, select
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from tinyllava_med.imaging import ImagingError, load_study_file
from tinyllava_med.imaging.dicom import file_meta
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Image, Study, utcnow
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.jobs import schedule_auto_report
from tinyllava_med.server.serving import (
    Decoded,
    Upload,
    add_file,
    create_study_of,
    decode_upload,
    limits_of,
    without_pixels,
)
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore
from tinyllava_med.server.stow import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    STUDY_MISMATCH,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    Part,
    StoreResult,
)

log = logging.getLogger(__name__)

# 0xA700 out of resources: too large for this server's limits, or for its decoding memory now
_TOO_BIG = {"too_large", "decompression_bomb", "decode_busy"}


def decode(
    parts: list[Part], settings: Settings, store: ImageStore
) -> list[Decoded | ImagingError]:
    """Each part as a decoded DICOM instance (its rendering cached, its pixels not held), or
    the reason it is not one (no lock held: this is most of the work, and parallel requests do
    it in parallel)."""
    out: list[Decoded | ImagingError] = []
    limits = limits_of(settings)
    for part in parts:
        try:
            d = load_study_file(part.data, limits=limits)
            if d.kind != "dicom":
                raise ImagingError("not_dicom", "the part is not a DICOM instance")
            out.append(without_pixels(part.data, d, store, limits))
        except ImagingError as e:
            out.append(e)
    return out


def failure_reason(e: ImagingError) -> int:
    """The Storage Service Class Failure Reason for an instance that could not be decoded: a
    sender can tell an object this server does not store (no pixels: an SR, a PDF) or a
    transfer syntax it cannot decode from a broken file, and that resending will not help."""
    if e.code in _TOO_BIG:
        return OUT_OF_RESOURCES
    if e.code == "no_pixel_data":
        return SOP_CLASS_NOT_SUPPORTED
    if e.code == "unsupported_transfer_syntax":
        return TRANSFER_SYNTAX_NOT_SUPPORTED
    return CANNOT_UNDERSTAND


def _uids_of(data: bytes, e: ImagingError) -> tuple[str | None, str | None, str | None]:
    """The SOP Class, SOP Instance and Study Instance UIDs of a part that could not be decoded,
    where its header can be read, so the sender learns which instance failed (and a STOW-RS
    to a study's URL, that it was another study's). A deflate bomb's data set is not inflated
    again: its UIDs come from the file meta, which names no study."""
    if e.code == "decompression_bomb":
        found = file_meta(data)
        ds: Dataset = found[0] if found is not None else Dataset()
        return (
            ds.get("MediaStorageSOPClassUID") or None,
            ds.get("MediaStorageSOPInstanceUID") or None,
            None,
        )
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
    except Exception:  # noqa: BLE001 - not DICOM at all: no UIDs to give
        return None, None, None
    return (
        ds.get("SOPClassUID") or None,
        ds.get("SOPInstanceUID") or None,
        ds.get("StudyInstanceUID") or None,
    )


# Senders find or create their study by UID and number its images one at a time. A PACS may send
# a study's instances in parallel requests or associations; each transaction saw no study yet and
# made its own (12 parallel single-instance STOW requests made 9-12 studies, on SQLite and
# PostgreSQL). Within a process a lock orders them; processes sharing the database (a second
# server on PostgreSQL, `tinyllava-med import` beside the server on SQLite) also take
# `_lock_studies`.
_STORING = threading.Lock()
# SQLite: this process's filings take the database's write lock one at a time, in this order.
# Waiting on SQLite's own lock, a filing slept in its busy handler (1, 2, 5 ... 100 ms between
# tries) and lost the lock again to newer ones: at 16 clients uploading, 180-460 ms of waiting at
# p90 and up to 1.4 s; a thread lock wakes the next one as the last commits. Released as the
# transaction ends, commit or rollback (`_release_writer`), in whichever thread that happens.
_SQLITE_WRITER = threading.Lock()
_WRITER_KEY = "sqlite_writer_held"


@event.listens_for(Session, "after_transaction_end")
def _release_writer(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and session.info.pop(_WRITER_KEY, False):
        _SQLITE_WRITER.release()


def _lock_studies(session: Session, uids: list[str]) -> None:
    """Order this filing after any other's, before the studies are looked up.

    PostgreSQL: a transaction-scoped advisory lock per Study Instance UID (taken in sorted
    order: two requests for the same studies wait for each other, never deadlock). SQLite: the
    database's write lock, taken now (`BEGIN IMMEDIATE`) rather than at the first insert, so the
    other process waits (the busy timeout) until this one commits and then finds its study; a
    deferred transaction had already read "no such study" (6 processes importing one file made
    3 studies). Within this process, `_SQLITE_WRITER` orders them first."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        connection = session.connection()
        if not connection.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
            if not session.info.get(_WRITER_KEY):
                _SQLITE_WRITER.acquire()
                session.info[_WRITER_KEY] = True
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        for uid in sorted(set(uids)):
            key = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big", signed=True)
            session.execute(select(func.pg_advisory_xact_lock(key)))


def _study_for(session: Session, uid: str, cache: dict[str, Study], d: Decoded) -> Study:
    if uid not in cache:
        found = crud.study_by_uid(session, uid)
        cache[uid] = found if found is not None else create_study_of(session, d.metadata)
    return cache[uid]


def other_accession(study: Study, d: Decoded) -> bool:
    """Whether an instance filed under `study` (by its Study Instance UID) names another
    accession number than the study's. It is filed all the same (its UID is the study's), with
    a warning naming no value: a RIS waiting for a result under the other number will not find
    one, so the merge (an order merged or corrected at the modality) must be seen."""
    theirs = (d.metadata.AccessionNumber or "").strip() if d.kind == "dicom" else ""
    ours = (study.AccessionNumber or "").strip()
    if not (theirs and ours and theirs != ours):
        return False
    log.warning(
        "an instance filed in study %s names another accession number than the study's "
        "(an order merged or corrected at the modality?): it is reported under the study's",
        study.id,
    )
    return True


def _log_other_patient(study: Study) -> None:
    log.warning(
        "refused an instance whose Study Instance UID names study %s, held for another "
        "patient (a sending device reused a UID?)",
        study.id,
    )


def _held_elsewhere(session: Session, sop_instance: str, study_uid: str | None) -> str | None:
    """The id of a study of another Study Instance UID that holds an image with this SOP
    Instance UID. UIDs are unique the world over: the same one under two studies is a device's
    error, or an object edited apart from its original, and filing it would give one image
    two studies, each with its own reports and SRs. Asked before the instance's study is made,
    so a refusal leaves no empty study. A file without a Study Instance UID makes a study of
    its own each time, as an image does: not asked."""
    if not study_uid:
        return None
    return session.scalar(
        select(Image.study_id)
        .join(Study, Image.study_id == Study.id)
        .where(
            Image.SOPInstanceUID == sop_instance,
            # a database from before filing by UID may hold two studies of one UID: one study
            or_(Study.StudyInstanceUID.is_(None), Study.StudyInstanceUID != study_uid),
        )
        .limit(1)
    )


def _log_held_elsewhere(study_id: str) -> None:
    log.warning(
        "refused an instance whose SOP Instance UID is held here in another study (%s): a "
        "device that reused a UID, or a copy edited apart from the original",
        study_id,
    )


def _stored(session: Session, study: Study, sop_instance: str) -> Image | None:
    return session.scalar(
        select(Image).where(Image.study_id == study.id, Image.SOPInstanceUID == sop_instance)
    )


# who an instance is of: a re-sent instance must name the same patient as the one released
_PATIENT = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate")
# and a new instance the same patient ID as its study's images (a name or birth date may have
# been corrected since, and the PACS sends the rest of the study with the correction)
_PATIENT_ID = _PATIENT[:2]


def _patient(source: bytes | Path, names: tuple[str, ...] = _PATIENT) -> tuple[str, ...]:
    """The patient a DICOM file (its bytes, or its path in the store) names (`names`); read
    from its header only. Kept in memory, never logged."""
    ds = pydicom.dcmread(
        io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True
    )
    return tuple(str(ds.get(name, "")).strip() for name in names)


# the study's first DICOM images looked at for a readable header (the first one has it, unless
# its file was lost): a study of thousands of images is not loaded for one instance
_HEADERS_TRIED = 8


def _study_patient(session: Session, store: ImageStore, study: Study) -> tuple[str, ...] | None:
    """The patient ID `study`'s first DICOM image with a readable header names (its file, or
    the header kept when its pixels were released); None when it has none."""
    files = session.execute(
        select(Image.sha256, Image.header_sha256, Image.released_at)
        .where(Image.study_id == study.id, Image.kind == "dicom")
        .order_by(Image.n)
        .limit(_HEADERS_TRIED)
    )
    for sha256, header_sha256, released_at in files:
        name = header_sha256 if released_at is not None else sha256
        if name and store.exists(name):
            return _patient(store.path(name), _PATIENT_ID)
    return None


class _Patients:
    """Whether an instance names the patient ID (and issuer) of the study it is filed under,
    reading each study's once per filing (a study with no DICOM image yet takes any)."""

    def __init__(self, session: Session, store: ImageStore) -> None:
        self.session = session
        self.store = store
        self.known: dict[str, tuple[str, ...]] = {}

    def match(self, study: Study, data: bytes) -> bool:
        if study.id not in self.known:
            held = _study_patient(self.session, self.store, study)
            if held is None:
                return True
            self.known[study.id] = held
        return self.known[study.id] == _patient(data, _PATIENT_ID)


def _same_instance(store: ImageStore, image: Image, data: bytes, d: Decoded) -> bool:
    """Whether `data` (decoded: `d`) can be the instance `image` held before its pixels were
    released: the same SOP class, size and frames, and the same patient as its kept header.
    Another patient's object under the same UIDs would otherwise take its place behind signed
    reports, and the next SR would name that patient."""
    m = d.metadata
    rows = d.height if m.Rows is None else m.Rows
    columns = d.width if m.Columns is None else m.Columns
    if (m.SOPClassUID, rows, columns, d.n_frames) != (
        image.SOPClassUID,
        image.rows,
        image.columns,
        image.n_frames,
    ):
        return False
    if image.header_sha256 is None or not store.exists(image.header_sha256):
        return True  # no header kept (lost on a full disk): nothing more to compare
    return _patient(store.path(image.header_sha256)) == _patient(data)


def _restore(store: ImageStore, image: Image, data: bytes, d: Decoded) -> None:
    """A released image received again (`retention.py`): its file is back under its row."""
    image.sha256 = store.put(data, d.sha256)
    image.size_bytes = len(data)
    image.released_at = None
    image.stored_at = utcnow()  # retention counts again from now


def store_instances(
    session: Session,
    store: ImageStore,
    settings: Settings,
    parts: list[Part],
    decoded: list[Decoded | ImagingError],
    url_study_uid: str | None,
) -> tuple[StoreResult, list[Study]]:
    """File the decoded parts; the result per instance and the studies that got new ones."""
    result = StoreResult()
    uids = [d.metadata.StudyInstanceUID for d in decoded if not isinstance(d, ImagingError)]
    _lock_studies(session, [uid for uid in uids if uid])
    studies: dict[str, Study] = {}
    touched: dict[str, Study] = {}
    patients = _Patients(session, store)
    for part, d in zip(parts, decoded, strict=True):
        if isinstance(d, ImagingError):
            sop_class, sop_instance, uid = _uids_of(part.data, d)
            # not of the URL's study comes first (PS3.18 10.5.3), whatever else is wrong with it
            other = url_study_uid is not None and uid is not None and uid != url_study_uid
            reason = STUDY_MISMATCH if other else failure_reason(d)
            result.failed.append((sop_class, sop_instance, reason))
            continue
        m = d.metadata
        sop_class, sop_instance, uid = m.SOPClassUID, m.SOPInstanceUID, m.StudyInstanceUID
        if not (sop_class and sop_instance and uid):
            result.failed.append((sop_class, sop_instance, CANNOT_UNDERSTAND))
            continue
        if url_study_uid is not None and uid != url_study_uid:
            result.failed.append((sop_class, sop_instance, STUDY_MISMATCH))
            continue
        held_by = _held_elsewhere(session, sop_instance, uid)
        if held_by is not None:
            _log_held_elsewhere(held_by)
            result.failed.append((sop_class, sop_instance, PROCESSING_FAILURE))
            continue
        study = _study_for(session, uid, studies, d)
        if not patients.match(study, part.data):
            _log_other_patient(study)
            result.failed.append((sop_class, sop_instance, PROCESSING_FAILURE))
            continue
        held = _stored(session, study, sop_instance)
        if held is not None and held.released_at is not None:
            if not _same_instance(store, held, part.data, d):
                log.warning(
                    "refused an instance whose UIDs name a released one of another "
                    "patient, size or class (image %s)",
                    held.id,
                )
                result.failed.append((sop_class, sop_instance, PROCESSING_FAILURE))
                continue
            _restore(store, held, part.data, d)  # stored; no new automatic report (its
            # reports were read already)
        elif held is not None:
            result.already += 1
        else:
            add_file(session, store, study, part.data, d)
            touched[study.id] = study
            result.accession_conflicts += other_accession(study, d)
        result.stored.append((sop_class, sop_instance))
    session.flush()
    return result, list(touched.values())


Audit = Callable[[Session, StoreResult, list[str], list[int]], None]


def accession_conflicts_detail(n: int) -> dict[str, int]:
    """The audit detail of instances filed under another accession number (`other_accession`),
    when there were any."""
    return {"accession_conflicts": n} if n else {}


def audit_as(actor: str, action: str, *, skips_non_images: bool = False) -> Audit:
    """The `audit` of `file_instances` for a sender's request: one event, the study when there
    is one, the STOW-RS status, and counts (new, already held, failed), studies and jobs.
    `skips_non_images` (a retrieve, which takes a whole study and keeps its images): objects
    that are no image (0x0122) are counted as `skipped`, not as `failed`."""

    def audit(session: Session, result: StoreResult, studies: list[str], jobs: list[int]) -> None:
        skipped = result.not_images if skips_non_images else 0
        crud.audit(
            session,
            actor=actor,
            action=action,
            resource_type="study",
            resource_id=studies[0] if len(studies) == 1 else None,
            outcome="ok" if result.stored else "invalid",
            status_code=result.status,
            detail={
                "stored": len(result.stored) - result.already,
                "already": result.already,
                "failed": len(result.failed) - skipped,
                **({"skipped": skipped} if skips_non_images else {}),
                "studies": studies,
                "jobs": jobs,
                **accession_conflicts_detail(result.accession_conflicts),
            },
        )

    return audit


def file_instances(
    session_factory: sessionmaker[Session],
    store: ImageStore,
    settings: Settings,
    parts: list[Part],
    decoded: list[Decoded | ImagingError],
    url_study_uid: str | None = None,
    audit: Audit | None = None,
) -> tuple[StoreResult, list[str], list[int]]:
    """Store the parts and queue their studies' automatic reports in one committed transaction
    (one sender at a time, `_STORING`); `audit(session, result, study_ids, job_ids)` runs in it.
    The result, the ids of the studies that got new instances, and the queued jobs' ids.
    Blocking: call it from a worker thread."""
    with _STORING, session_factory.begin() as session:
        result, studies = store_instances(session, store, settings, parts, decoded, url_study_uid)
        jobs = [job.id for s in studies if (job := schedule_auto_report(session, settings, s))]
        ids = [s.id for s in studies]
        if audit is not None:
            audit(session, result, ids, jobs)
    return result, ids, jobs


@dataclass(frozen=True)
class Filed:
    """An upload as filed: its study, the image each file is (in the upload's order; new, or
    held already), how many files were new to the server, and whether the study is new."""

    study: Study
    images: list[Image]
    new: int
    created: bool


def file_upload(
    session: Session, store: ImageStore, settings: Settings, uploads: list[Upload], *, actor: str
) -> Filed:
    """Decode every upload, then file them as one study, audited as `actor`'s upload.

    The files must be one study's: DICOM instances of one Study Instance UID, or images
    (PNG/JPEG), not both (422 `mixed_studies`): a report about one image is filed under the
    study's UID and accession number. DICOM files go under the study held with their UID, as
    pushes do; an instance held already is not stored again. 409 `patient_mismatch` when that
    study (or another file of the upload) is another patient's; 409 `instance_conflict` when an
    instance whose pixels were released comes back as another object."""
    if not uploads:
        raise APIError(422, "no_files", "send one or more files in the multipart field `files`")
    if len(uploads) > settings.max_files_per_upload:
        raise APIError(
            413,
            "too_many_files",
            f"at most {settings.max_files_per_upload} files per upload, got {len(uploads)}",
        )
    limits = limits_of(settings)
    files = [without_pixels(u.data, decode_upload(u, settings), store, limits) for u in uploads]
    _one_study(files, uploads)
    uid = files[0].metadata.StudyInstanceUID if files[0].kind == "dicom" else None
    _lock_studies(session, [uid] if uid else [])  # SQLite: the write lock, for PNG/JPEG too
    study = crud.study_by_uid(session, uid) if uid else None
    created = study is None
    if study is None:
        study = create_study_of(session, files[0].metadata)
    patients = _Patients(session, store)
    images: list[Image] = []
    new = 0
    conflicts = 0
    for upload, d in zip(uploads, files, strict=True):
        image, is_new = _file_one(session, store, study, upload, d, patients)
        images.append(image)
        new += is_new
        conflicts += is_new and other_accession(study, d)
    crud.audit(
        session,
        actor=actor,
        action="study.upload",
        resource_type="study",
        resource_id=study.id,
        outcome="ok",
        status_code=201 if new else 200,
        detail={
            "files": len(uploads),
            "new": new,
            "new_study": created,
            **accession_conflicts_detail(conflicts),
        },
    )
    session.flush()
    session.refresh(study)
    return Filed(study, images, new, created)


def _file_one(
    session: Session,
    store: ImageStore,
    study: Study,
    upload: Upload,
    d: Decoded,
    patients: _Patients,
) -> tuple[Image, bool]:
    """One uploaded file filed under `study`: its image, and whether it is new here."""
    if d.kind == "dicom" and not patients.match(study, upload.data):
        _log_other_patient(study)
        raise APIError(
            409,
            "patient_mismatch",
            "the file's Study Instance UID names a study held here under another Patient ID (a "
            "device that reused a UID, or a copy de-identified apart from the study held); "
            "nothing was stored",
            {"file": upload.filename, "study_id": study.id},
        )
    sop_instance = d.metadata.SOPInstanceUID if d.kind == "dicom" else None
    held_by = (
        _held_elsewhere(session, sop_instance, study.StudyInstanceUID) if sop_instance else None
    )
    if held_by is not None:
        _log_held_elsewhere(held_by)
        raise APIError(
            409,
            "instance_conflict",
            "the file's SOP Instance UID names an image held here in another study (a device "
            "that reused a UID, or a copy edited apart from the original); nothing was stored",
            {"file": upload.filename, "study_id": held_by},
        )
    held = _stored(session, study, sop_instance) if sop_instance else None
    if held is None:
        return add_file(session, store, study, upload.data, d), True
    if held.released_at is None:
        return held, False
    if not _same_instance(store, held, upload.data, d):
        raise APIError(
            409,
            "instance_conflict",
            "the file's SOP Instance UID names an image whose pixels were released, and it is "
            "another object (another patient, size or class); nothing was stored",
            {"file": upload.filename, "study_id": study.id},
        )
    _restore(store, held, upload.data, d)
    return held, True


def _one_study(files: list[Decoded], uploads: list[Upload]) -> None:
    first = files[0]
    for f, upload in zip(files, uploads, strict=True):
        if (f.kind == "dicom") != (first.kind == "dicom"):
            raise APIError(
                422,
                "mixed_studies",
                "DICOM files and PNG/JPEG images go in separate uploads (an image has no study "
                "to share)",
                {"file": upload.filename},
            )
        if f.metadata.StudyInstanceUID != first.metadata.StudyInstanceUID:
            raise APIError(
                422,
                "mixed_studies",
                "the files belong to different studies (Study Instance UID): upload each study "
                "on its own, or send them by STOW-RS or a CD import, which file them by study",
                {"file": upload.filename},
            )
