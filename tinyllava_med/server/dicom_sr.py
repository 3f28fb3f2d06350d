"""A report as a DICOM Comprehensive SR (highdicom), for the PACS.

The SR follows the shape of TID 2000 (Basic Diagnostic Imaging Report): the model is the observer
(a device: name, variant and quantization as model name, version as serial number), the
question is the clinical information, the report text is the finding, inferred from the source
image (referenced by SOP Class / Instance UID), and an edited report keeps the model's unedited
answer as a comment.

Patient and study attributes are copied by highdicom from the source DICOM (so the PACS files
the SR under the same patient and study); a PNG/JPEG study has no DICOM source and gets no SR.

A draft is PARTIAL / PRELIMINARY / UNVERIFIED; a signed report is COMPLETE / FINAL / VERIFIED
with the signer as verifying observer. UIDs derive from the report id and its last change, so
the same report state always gives the same SR instance and every edit gives a new one. An
amended report (corrected after signing) is signed by whoever amended it, says why in a comment,
and names the SR instance of the version it replaced in its Predecessor Documents Sequence, so
the PACS can tell the correction from the original.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import pydicom
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, generate_uid
from pydicom.valuerep import DA, TM
from sqlalchemy.orm import Session

from tinyllava_med import __version__
from tinyllava_med.server.db.models import SIGNED_STATUSES, ApiKey, Report
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.storage import ImageStore

MANUFACTURER = "TinyLLaVA-Med server"
CLINICAL_INFORMATION = hd.sr.CodedConcept("55752-0", "LN", "Clinical information")
SR_SERIES_NUMBER = 990  # high, so viewers list the AI series after the acquired ones


@dataclass(frozen=True)
class Signer:
    """Who signed: the key's display name (never a patient's)."""

    name: str
    organization: str


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _text(value: str) -> str:
    """DICOM text values allow CR, LF, TAB (and ESC for ISO 2022, unused with UTF-8) only."""
    return _CONTROL.sub("", value)


def _person_name(name: str) -> str:
    # PN components are separated by '^'; keep the display name in the family-name component.
    cleaned = "".join(c for c in name if c.isprintable() and c not in "^=\\")
    return (cleaned[:63] or "Unknown") + "^"  # one component: the trailing '^' says so


def _series_uid(report: Report) -> str:
    return str(generate_uid(entropy_srcs=["tinyllava-med sr series", report.id]))


def _instance_uid(report: Report, version: datetime) -> str:
    """The SR instance of `report` as it was at `version` (its `updated_at` then)."""
    return str(generate_uid(entropy_srcs=["tinyllava-med sr", report.id, version.isoformat()]))


def _predecessor(report: Report, study_uid: str) -> pydicom.Dataset | None:
    """The Predecessor Documents Sequence item naming the SR of the signed version an amended
    report replaced (None for other reports, and for amendments recorded before 0003)."""
    amendment = report.amendment
    if amendment is None or amendment.previous_updated_at is None:
        return None
    sop = pydicom.Dataset()
    sop.ReferencedSOPClassUID = ComprehensiveSRStorage
    sop.ReferencedSOPInstanceUID = _instance_uid(report, amendment.previous_updated_at)
    series = pydicom.Dataset()
    series.SeriesInstanceUID = _series_uid(report)
    series.ReferencedSOPSequence = Sequence([sop])
    item = pydicom.Dataset()
    item.StudyInstanceUID = study_uid
    item.ReferencedSeriesSequence = Sequence([series])
    return item


def build_sr(
    report: Report,
    source: pydicom.Dataset,
    *,
    signer: Signer | None = None,
    institution: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """The SR of `report`, whose image is the DICOM `source` (read without pixels is enough)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["tinyllava-med device", report.model]),
        name=report.model[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"{report.variant or report.model} ({report.quantization})"[:64],
        serial_number=(report.model_version or "unknown")[:64],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    root.ContentSequence = Sequence(list(observer))
    findings = hd.sr.ContainerContentItem(
        name=codes.DCM.Findings, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    question = hd.sr.TextContentItem(
        name=CLINICAL_INFORMATION,
        value=_text(report.question),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    finding = hd.sr.TextContentItem(
        name=codes.DCM.Finding,
        value=_text(report.text),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    finding.ContentSequence = Sequence(
        [
            hd.sr.ImageContentItem(
                name=codes.DCM.BestIllustrationOfFinding,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
            )
        ]
    )
    findings.ContentSequence = Sequence([question, finding])
    if report.text != report.answer:
        findings.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=_text(f"Unedited model answer: {report.answer}"),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if (amendment := report.amendment) is not None:
        findings.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=_text(f"Amended after signing: {amendment.reason}"),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    root.ContentSequence.append(findings)

    signed = report.status in SIGNED_STATUSES and signer is not None
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=_series_uid(report),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_instance_uid(report, report.updated_at),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=signed,
        is_final=signed,
        is_verified=signed,
        institution_name=institution,
        verifying_observer_name=_person_name(signer.name) if signed and signer else None,
        verifying_organization=signer.organization if signed and signer else None,
    )
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: reports are not ASCII-only
    sr.SeriesDescription = "AI report (TinyLLaVA-Med)"
    sr.SoftwareVersions = __version__
    sr.ContentDate = DA(report.updated_at.date())
    sr.ContentTime = TM(report.updated_at.time().replace(microsecond=0))
    if (predecessor := _predecessor(report, sr.StudyInstanceUID)) is not None:
        sr.PredecessorDocumentsSequence = [predecessor]
    return sr


def to_bytes(ds: pydicom.Dataset) -> bytes:
    """DICOM Part 10 bytes (preamble, file meta, explicit VR little endian)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def signer_name(session: Session, report: Report) -> str | None:
    """The display name of the key that signed `report` (keys are named for their holder)."""
    if report.signed_by is None:
        return None
    key = session.get(ApiKey, report.signed_by)
    return key.name if key is not None else report.signed_by


def report_sr(session: Session, store: ImageStore, report: Report, institution: str) -> bytes:
    """The SR of a stored report as Part 10 bytes; 409 when its image is not DICOM."""
    image = report.image
    if image is None or image.kind != "dicom":
        raise APIError(
            409,
            "no_dicom_source",
            "this report's image is not a DICOM instance, so there is no study to attach an "
            "SR to; use the FHIR or JSON form",
        )
    source = pydicom.dcmread(store.path(image.sha256), stop_before_pixels=True)
    name = signer_name(session, report)
    signer = Signer(name, institution) if name is not None else None
    return to_bytes(build_sr(report, source, signer=signer, institution=institution))
