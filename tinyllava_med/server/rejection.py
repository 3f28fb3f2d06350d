"""IHE IOCM rejection notes: taking back the SRs a deleted study had already sent to the PACS.

A study deleted because it was sent by mistake (the wrong patient) may have had a draft SR
pushed to the PACS by an automatic report. Deleting the study here does not remove that SR
there, so the deletion also sends an IOCM rejection note: a Key Object Selection document
(highdicom) in the same study, titled (113037, DCM, "Rejected for Patient Safety Reasons"), the
title IOCM gives a wrong-patient correction, that lists the pushed SR instances. A PACS that
implements IOCM (dcm4chee, for one) then hides or deletes them; one that does not (Orthanc)
stores the note beside them, where a reader sees the rejection.

The note lists every SR version a push job sent (`done`) or may be sending (`running`); their
instance UIDs derive from the report and its version, so they are known without asking the
PACS. It is built while the reports still exist, kept in the file store (it carries the
patient's name and id, which stay out of the jobs table), and sent by a `push_rejection` job
that retries while the PACS is away and removes the file once it is sent.
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from tinyllava_med.server.db.models import Job, Study
from tinyllava_med.server.dicom_sr import (
    MANUFACTURER,
    report_sr,
    source_time,
    stamp_times,
    to_bytes,
)
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.jobs import PUSH_SR
from tinyllava_med.server.storage import ImageStore

log = logging.getLogger(__name__)

REJECTED_FOR_PATIENT_SAFETY = codes.DCM.RejectedForPatientSafetyReasons
KOS_SERIES_NUMBER = 991  # after the SR series (990)


def pushed_srs(
    session: Session, store: ImageStore, study: Study, institution: str
) -> list[pydicom.Dataset]:
    """The SRs of `study` that push jobs sent or are sending, one per instance, as built then."""
    jobs = session.scalars(
        select(Job)
        .where(Job.kind == PUSH_SR, Job.study_id == study.id, Job.status.in_(("done", "running")))
        .order_by(Job.id)
    )
    reports = {r.id: r for r in study.reports}
    srs: dict[str, pydicom.Dataset] = {}
    for job in jobs:
        report = reports.get(str(job.payload.get("report_id")))
        if report is None:
            continue
        version = job.payload.get("version")
        at = datetime.fromisoformat(version) if version else None
        try:  # the header is all it takes: damaged pixels do not keep the study from going
            sr_bytes = report_sr(session, store, report, institution, at, checked=False)
        except APIError as e:  # its image file is gone: that SR cannot be named again
            log.warning("report %s: its SR cannot be rejected at the PACS: %s", report.id, e.code)
            continue
        sr = pydicom.dcmread(io.BytesIO(sr_bytes))
        srs.setdefault(str(sr.SOPInstanceUID), sr)
    return list(srs.values())


def rejection_note(srs: list[pydicom.Dataset], institution: str) -> bytes:
    """An IOCM "Rejected for Patient Safety Reasons" KOS listing `srs` (all of one study), as
    Part 10 bytes."""
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_PATIENT_SAFETY,
        referenced_objects=srs,
        description="The study was deleted as sent by mistake; these AI reports are withdrawn.",
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=srs,
        content=content,
        series_instance_uid=generate_uid(),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=institution,
    )
    # its times in the zone of the SRs it rejects, which declare theirs (highdicom wrote the
    # server's clock time with no offset: a PACS read it in the study's zone, hours off)
    stamp_times(kos, source_time(srs[0], datetime.now(UTC)))
    return to_bytes(kos)
