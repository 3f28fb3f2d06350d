"""Releasing the pixel data of old studies (`image_retention_days`), so that a small server's
disk does not fill with studies the PACS keeps anyway.

A study is due when none of its images was stored within `image_retention_days` (the files of
a study retrieved again count from their return, a late instance from its own arrival), has no
draft report (a radiologist may still be reading it) and no automatic report still to come. With
`image_retention_draft_days`, a draft nobody has changed for that long no longer keeps its study:
a site whose radiologists read on the PACS and never sign here would otherwise keep every
automatically reported study's pixels for ever. The draft stays a draft; its image comes back as
a released one's does.

A due study's images' rows stay, marked `released_at`, and so do the study and its reports. A
DICOM image's header without pixels is stored first (`header_sha256`: its reports' SRs are built
from it); then the file is removed as a deleted study's are (`jobs.remove_unused`), unless a held
image refers to the same content or it was touched within `image_sweep_grace_s` (an upload of
the same file racing the release). Asking for a released image answers 410 `image_released`; retrieving the study from
the PACS, or receiving it again (STOW-RS, DIMSE, import), files each instance under its row
again (`ingest.store_instances`). On a full disk (when `db release-images` is most needed) a
header that cannot be written is held in memory and written once its study's pixel files are
gone; only a file that is gone or unreadable, or a disk still full then, leaves an image without
a header.

A `release_images` job runs `release_due` every `RELEASE_EVERY_S`: `serve` queues the first, and
each run queues the next.
"""

from __future__ import annotations

import hashlib
import io
import logging
from datetime import datetime, timedelta
from typing import Any

import pydicom
from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session, sessionmaker

from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Image, Job, Report, Study, utcnow
from tinyllava_med.server.jobs import AUTO_REPORT, RELEASE_IMAGES, remove_unused
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore

log = logging.getLogger(__name__)

RELEASE_EVERY_S = 3600.0
STUDIES_PER_RUN = 500  # the next run takes the rest
# beyond the request timeout, for a question's rendering and the filing of its draft
IN_USE_MARGIN_S = 120.0


def schedule_release(
    session: Session, settings: Settings, *, delay_s: float = 0.0, besides: int | None = None
) -> Job | None:
    """Queue a `release_images` run in `delay_s`, unless retention is off or one other than
    `besides` (the run asking) is queued or running already (several processes may ask)."""
    if settings.image_retention_days is None:
        return None
    pending = select(Job.id).where(
        Job.kind == RELEASE_IMAGES, Job.status.in_(("queued", "running"))
    )
    if besides is not None:
        pending = pending.where(Job.id != besides)
    if session.scalar(pending.limit(1)) is not None:
        return None
    job = crud.enqueue_job(session, kind=RELEASE_IMAGES, max_attempts=settings.job_max_attempts)
    job.run_after = utcnow() + timedelta(seconds=delay_s)
    return job


def _drafts_in_use(study_id: Any, settings: Settings, now: datetime) -> Select[str]:
    """The study's drafts that keep its images: all, or those changed within
    `image_retention_draft_days`."""
    drafts = select(Report.id).where(Report.study_id == study_id, Report.status == "draft")
    if settings.image_retention_draft_days is not None:
        drafts = drafts.where(
            Report.updated_at >= now - timedelta(days=settings.image_retention_draft_days)
        )
    return drafts


def due_studies(session: Session, settings: Settings, now: datetime) -> list[str]:
    """Oldest first: studies with no image stored within retention, without a draft in use,
    with a DICOM image still held. PNG and JPEG images are never released: no PACS holds them,
    so nothing could bring them back."""
    assert settings.image_retention_days is not None
    cutoff = now - timedelta(days=settings.image_retention_days)
    a_draft = _drafts_in_use(Study.id, settings, now)
    # an automatic report still to come (the model was down, say) will need the image
    a_report_coming = select(Job.id).where(
        Job.study_id == Study.id, Job.kind == AUTO_REPORT, Job.status.in_(("queued", "running"))
    )
    held = select(Image.id).where(
        Image.study_id == Study.id, Image.kind == "dicom", Image.released_at.is_(None)
    )
    stored_lately = select(Image.id).where(Image.study_id == Study.id, Image.stored_at >= cutoff)
    return list(
        session.scalars(
            select(Study.id)
            .where(
                Study.created_at < cutoff,  # implied by the next line; indexed, so it goes first
                ~stored_lately.exists(),
                ~a_draft.exists(),
                ~a_report_coming.exists(),
                held.exists(),
            )
            .order_by(Study.created_at)
            .limit(STUDIES_PER_RUN)
        )
    )


def _header(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def release_study(
    session: Session,
    store: ImageStore,
    study_id: str,
    settings: Settings,
    now: datetime,
    unwritten: dict[str, bytes],
) -> list[str]:
    """Mark the study's held images released, keeping DICOM headers; the hashes of their files
    (for `jobs.remove_unused`, once this is committed). A draft made or changed meanwhile keeps
    the study, and so does a question being answered about it. A header the store cannot write
    (a full disk) goes into `unwritten`, by its hash, for the caller to write once files are
    removed."""
    if session.scalar(_drafts_in_use(study_id, settings, now).limit(1)) is not None:
        return []
    images = session.scalars(
        select(Image).where(
            Image.study_id == study_id, Image.kind == "dicom", Image.released_at.is_(None)
        )
    ).all()
    # a question about it is being answered (it touched the file as it began): its draft, once
    # filed, keeps the study, which would otherwise have lost its pixels under it
    in_use_s = settings.request_timeout_s + IN_USE_MARGIN_S
    if any(store.touched_within(i.sha256, in_use_s) for i in images):
        return []
    for image in images:
        if image.header_sha256 is None:
            try:
                header = _header(store.get(image.sha256))
            except (OSError, pydicom.errors.InvalidDicomError) as e:  # file gone or unreadable
                log.warning("no header kept for a released image: %s", type(e).__name__)
            else:
                image.header_sha256 = hashlib.sha256(header).hexdigest()
                try:
                    store.put(header)
                except OSError as e:
                    log.warning("a released image's header waits for space: %s", e.strerror)
                    unwritten[image.header_sha256] = header
        image.released_at = now
    return [image.sha256 for image in images]


def _write_held(
    sessions: sessionmaker[Session], store: ImageStore, unwritten: dict[str, bytes]
) -> int:
    """Write the headers that waited for space; those that still cannot be written are
    forgotten by their images (which then say they have no header: 409 no_dicom_source, not a
    missing file). How many were lost."""
    lost: list[str] = []
    for sha, header in unwritten.items():
        try:
            store.put(header)
        except OSError as e:
            lost.append(sha)
            log.error("a released image's header could not be written: %s", e.strerror)
    if lost:
        with sessions.begin() as s:
            s.execute(update(Image).where(Image.header_sha256.in_(lost)).values(header_sha256=None))
    return len(lost)


def release_due(
    sessions: sessionmaker[Session], store: ImageStore, settings: Settings
) -> dict[str, Any]:
    """Release due studies (up to `STUDIES_PER_RUN`), each in its own transaction; counts, the
    hashes removed, and whether more were due (`more`)."""
    now = utcnow()
    with sessions() as s:
        due = due_studies(s, settings, now)
    studies = images = headers_lost = 0
    removed: list[str] = []
    released: dict[str, dict[str, int]] = {}
    for study_id in due:
        unwritten: dict[str, bytes] = {}
        with sessions.begin() as s:
            hashes = release_study(s, store, study_id, settings, now, unwritten)
        if hashes:
            studies += 1
            images += len(hashes)
            gone = remove_unused(
                sessions, store, sorted(set(hashes)), settings.image_sweep_grace_s
            ).removed
            removed += gone
            released[study_id] = {"images": len(hashes), "files_removed": len(gone)}
        lost = _write_held(sessions, store, unwritten)
        headers_lost += lost
        if study_id in released:
            released[study_id]["headers_lost"] = lost
    return {
        "studies": studies,
        "images": images,
        "files_removed": len(removed),
        "headers_lost": headers_lost,
        "more": len(due) == STUDIES_PER_RUN,
        "hashes": removed,
        "released": released,  # by study: images released, files removed, headers lost
    }


def audit_release(session: Session, actor: str, result: dict[str, Any]) -> None:
    """An `image.release` event for each study a run released pixels of (images released, files
    removed, headers lost), so that the study's history says when its pixels went."""
    for study_id, counts in result["released"].items():
        crud.audit(
            session,
            actor=actor,
            action="image.release",
            resource_type="study",
            resource_id=study_id,
            outcome="ok",
            status_code=200,
            detail=counts,
        )
