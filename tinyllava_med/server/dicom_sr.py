"""A report as a DICOM Comprehensive SR (highdicom), for the PACS.

The SR follows the shape of TID 2000 (Basic Diagnostic Imaging Report): the model is the observer
(a device: name, variant and quantization as model name, version as serial number), the
question is the clinical information, the report text is the finding, inferred from the source
image (referenced by SOP Class / Instance UID), and an edited report keeps the model's unedited
answer as a comment.

Patient and study attributes are copied by highdicom from the source DICOM (so the PACS files
the SR under the same patient and study); a PNG/JPEG study has no DICOM source and gets no SR.
Real headers break highdicom's checks (no Accession Number, Patient's Sex `U`, a birth date
written `1980-01-02`, ISO 2022 character sets): the SR is built from a copy (`_evidence`) whose
text is decoded to Unicode (the SR is UTF-8) and whose missing or unreadable patient and study
attributes are empty, as DICOM allows for them (Type 2).

A draft is PARTIAL / PRELIMINARY / UNVERIFIED; a signed report is COMPLETE / FINAL / VERIFIED
with the signer as verifying observer. UIDs derive from the report id and its last change, so
the same report state always gives the same SR instance (the same bytes: its times are the
version's) and every edit gives a new one. Its times are in the zone its copied Study Date and
Time are in, which `TimezoneOffsetFromUTC` declares for every time in the SR: the source's
offset, or without one this server's zone (a site's modalities and server keep one local time;
a container without `TZ` is UTC). An
amended report (corrected after signing) is signed by whoever amended it, says why in a comment,
and names the SR instance of the version it replaced in its Predecessor Documents Sequence, so
the PACS can tell the correction from the original.

Every SR also names in its Predecessor Documents Sequence the SRs of the report's earlier
versions that were sent to the PACS (as PS3.3 asks for prior or provisional reports it
includes): the signed SR supersedes the preliminary one an automatic report pushed, so the PACS
can link the two instead of showing the unedited AI draft as a report of its own.

An SR can be built for any version of a report (`at`, a past `updated_at`), from its edit
history: a push queued when a report was signed sends the signed version even when an amendment
came before the push ran, so the PACS holds every version the later ones name as predecessors.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

import highdicom as hd
import pydicom
from highdicom.base import get_sop_class_iod_map
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid
from pydicom.valuerep import DA, DT, TM, validate_value
from sqlalchemy import select
from sqlalchemy.orm import Session

from tinyllava_med import __version__
from tinyllava_med.model.prompts import without_controls
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import CUT_SHORT_NOTE, SIGNED_STATUSES, Job, Report
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.serving import stored_file
from tinyllava_med.server.storage import ImageStore

MANUFACTURER = "TinyLLaVA-Med server"
# TID 2000 wants the report's language (row 2, mandatory): the model answers in English
ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
SR_SERIES_NUMBER = 990  # high, so viewers list the AI series after the acquired ones


@dataclass(frozen=True)
class Signer:
    """Who signed: the key's display name (never a patient's) and its id, which tells two keys
    of one name apart (names need not be unique)."""

    name: str
    organization: str
    key_id: str | None = None


def _text(value: str, blank: str) -> str:
    """DICOM text values allow CR, LF, TAB and FF (and ESC for ISO 2022, unused with UTF-8);
    the project's one rule (`prompts.CONTROL`, as FHIR and XML) keeps the first three. The API
    refuses the others; a report stored before it did may still hold one. A TEXT item's value is
    Type 1: `blank` stands for an empty one (a model's empty answer, a draft cleared to rewrite)."""
    text = without_controls(value)
    return text if text.strip() else blank


# what highdicom reads from the source (all Type 2 in the SR: present, may be empty), with the
# value, when DICOM allows it (`_valid`)
_COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PARSED: dict[str, type] = {"DA": DA, "TM": TM}
# the VRs whose values are text in a character set (PS3.5 6.1.2.3)
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
# ACR-NEMA's dates and times, still written by old devices: the same values in DICOM's form
_LEGACY = {"DA": re.compile(r"(\d{4})\.(\d\d)\.(\d\d)"), "TM": re.compile(r"(\d\d):(\d\d):(\d\d)")}


# A UID an SR may reference: numbers joined by dots. Leading zeros in a component, which the
# standard forbids but old devices write, pass: the PACS holds the images under those UIDs.
# Letters (a converter's hex hashes), spaces or empty components do not: a PACS refuses the SR.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _valid(keyword: str, value: Any) -> str:
    """`value` as DICOM allows it for `keyword`'s VR, or "" (the SR's Type 2 attributes may be
    empty; a PACS may refuse an SR with an invalid one). The Accession Number is kept as the
    source has it even when longer than SH's 16 characters: the PACS holds the images under it,
    and a RIS matches the report by it."""
    text = str(value).strip()
    vr = dictionary_VR(keyword)
    legacy = _LEGACY.get(vr)
    if legacy is not None and (found := legacy.fullmatch(text)):
        text = "".join(found.groups())
    if keyword == "AccessionNumber" and text and "\\" not in text:
        return text
    try:
        validate_value(vr, text, config.RAISE)  # characters and length
        if vr in _PARSED:
            _PARSED[vr](text)  # and a day and time that exist (not February 30th)
    except ValueError:
        return ""
    return text


def _blank_undecodable(ds: pydicom.Dataset) -> None:
    """Empty each text value that did not decode under the source's character set (bytes of
    another one, Latin-1 under a declared UTF-8): pydicom puts U+FFFD in their place, and an SR
    would carry 'M\ufffdller' as the patient's name. Empty is what DICOM allows for them."""
    for elem in ds:
        values = elem.value if isinstance(elem.value, list | MultiValue) else [elem.value]
        if elem.VR in _TEXT_VRS and any("\ufffd" in str(v) for v in values if v is not None):
            elem.value = ""


def _evidence(source: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of `source` (a header) that highdicom accepts: text decoded under the source's
    character set and marked UTF-8, every attribute it reads present, empty where missing or
    unreadable; Patient's Sex M, F or O (`U` and the like say nothing: empty)."""
    ds = copy.deepcopy(source)
    ds.decode()
    _blank_undecodable(ds)
    ds.SpecificCharacterSet = "ISO_IR 192"
    if ds.SOPClassUID not in get_sop_class_iod_map():
        # a retired (the old Ultrasound Image Storage) or private class: highdicom finds the
        # Patient and Study modules to copy by the IOD, and those are the same in every image
        # IOD; `build_sr` puts the real class back in the evidence it references
        ds.SOPClassUID = SecondaryCaptureImageStorage
    for keyword in _COPIED:
        value = ds.get(keyword)
        if keyword != "PatientSex":  # its own rule, below
            setattr(ds, keyword, "" if value is None else _valid(keyword, value))
    sex = str(ds.get("PatientSex") or "").strip().upper()
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    return ds


def _person_name(name: str) -> str:
    # PN components are separated by '^'; keep the display name in the family-name component.
    cleaned = "".join(c for c in name if c.isprintable() and c not in "^=\\")
    return (cleaned[:63] or "Unknown") + "^"  # one component: the trailing '^' says so


@dataclass(frozen=True)
class Version:
    """What changes between versions of a report (the rest is the report's own): its text and
    status, when it was made (`updated_at`, from which its SR instance UID derives), who signed
    it, and for an amendment why and which version it replaced."""

    text: str
    status: str
    updated_at: datetime
    signed_by: str | None
    reason: str | None = None
    replaces: datetime | None = None


def version_at(report: Report, at: datetime | None = None) -> Version:
    """`report` as it was at `at` (its `updated_at` then), replayed from its edits; the current
    version for None or a time not before the last change."""
    if at is None or at >= report.updated_at:
        amendment = report.amendment
        return Version(
            report.text,
            report.status,
            report.updated_at,
            report.signed_by,
            amendment.reason if amendment else None,
            amendment.previous_updated_at if amendment else None,
        )
    edits = report.edits
    text = edits[0].previous_text if edits else report.text
    version = Version(text, "draft", at, None)
    for edit in edits:
        if edit.edited_at > at:
            break
        amended = edit.new_status == "amended"
        version = Version(
            edit.new_text,
            edit.new_status,
            at,
            edit.edited_by if edit.new_status in SIGNED_STATUSES else None,
            edit.reason if amended else None,
            edit.previous_updated_at if amended else None,
        )
    return version


def _series_uid(report: Report) -> str:
    return str(generate_uid(entropy_srcs=["tinyllava-med sr series", report.id]))


def _instance_uid(report: Report, version: datetime) -> str:
    """The SR instance of `report` as it was at `version` (its `updated_at` then)."""
    return str(generate_uid(entropy_srcs=["tinyllava-med sr", report.id, version.isoformat()]))


def text_author(report: Report, version: Version) -> str | None:
    """The key that last changed the text of `version` (None while it is the model's answer)."""
    if version.text == report.answer:
        return None
    author = None
    for edit in report.edits:
        if edit.edited_at > version.updated_at:
            break
        if edit.new_text != edit.previous_text:
            author = edit.edited_by
    return author


def _instance_number(report: Report, version: Version) -> int:
    """1 for the report's first version, then one more per change: a viewer lists a report's SRs
    (one series) in the order they were made."""
    return 1 + sum(1 for edit in report.edits if edit.edited_at <= version.updated_at)


def _predecessor(
    report: Report, version: Version, study_uid: str, sent: Collection[datetime]
) -> pydicom.Dataset | None:
    """The Predecessor Documents Sequence item naming the SRs this version supersedes: of the
    earlier versions `sent` to the PACS, and of the signed version an amendment replaced (None
    when there is none)."""
    earlier = {v for v in sent if v < version.updated_at}
    if version.replaces is not None:
        earlier.add(version.replaces)
    if not earlier:
        return None
    sops = []
    for at in sorted(earlier):
        sop = pydicom.Dataset()
        sop.ReferencedSOPClassUID = ComprehensiveSRStorage
        sop.ReferencedSOPInstanceUID = _instance_uid(report, at)
        sops.append(sop)
    series = pydicom.Dataset()
    series.SeriesInstanceUID = _series_uid(report)
    series.ReferencedSOPSequence = Sequence(sops)
    item = pydicom.Dataset()
    item.StudyInstanceUID = study_uid
    item.ReferencedSeriesSequence = Sequence([series])
    return item


_OFFSET = re.compile(r"([+-])(\d\d)(\d\d)")


def _zone(source: pydicom.Dataset, when: datetime) -> tzinfo:
    """The zone of the SR's times: the one its copied Study Date and Time are in. DICOM says
    TimezoneOffsetFromUTC holds for every date and time of an instance: the source's, when it
    has a valid one; else this server's zone at `when`."""
    found = _OFFSET.fullmatch(str(source.get("TimezoneOffsetFromUTC", "") or "").strip())
    if found and int(found[2]) <= 14 and int(found[3]) < 60:
        delta = timedelta(hours=int(found[2]), minutes=int(found[3]))
        return timezone(-delta if found[1] == "-" else delta)
    local = when.astimezone().tzinfo
    assert local is not None  # astimezone() always gives an aware time
    return local


def stamp_times(ds: pydicom.Dataset, at: datetime) -> None:
    """`ds`'s content and creation date and time: `at` (aware), in its own zone, which
    TimezoneOffsetFromUTC declares for every time in the instance."""
    ds.TimezoneOffsetFromUTC = at.strftime("%z")
    ds.ContentDate = ds.InstanceCreationDate = DA(at.date())
    ds.ContentTime = ds.InstanceCreationTime = TM(at.time())


def source_time(source: pydicom.Dataset, when: datetime) -> datetime:
    """`when` (aware) in the zone of `source`'s times (`_zone`), to the second."""
    return when.astimezone(_zone(source, when)).replace(microsecond=0)


def build_sr(
    report: Report,
    source: pydicom.Dataset,
    *,
    signer: Signer | None = None,
    institution: str | None = None,
    version: Version | None = None,
    sent: Collection[datetime] = (),
    author: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """The SR of `report` (at `version`, default the current one), whose image is the DICOM
    `source` (read without pixels is enough); `signer` is that version's; `sent`: the versions
    whose SRs were queued for the PACS (`pushed_versions`), which a later version supersedes;
    `author`: the display name of whoever wrote the text when it is not the model's answer (the
    Finding then names that person as its observer, not the model's device)."""
    version = version or version_at(report)
    # the weights that answered make the device: their own UID, and the digest's start in the
    # serial number (reports stored before digests were recorded keep what they had)
    entropy = ["tinyllava-med device", report.model]
    serial = report.model_version or "unknown"
    if report.model_weights:
        entropy.append(report.model_weights)
        serial = f"{serial} {report.model_weights[:23]}"
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=entropy),
        name=report.model[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"{report.variant or report.model} ({report.quantization})"[:64],
        serial_number=serial[:64],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )
    # TID 2000: the language, the observer context, then sections headed from CID 7001 holding
    # TID 2002 narrative (CID 7002): the question as the Request under Clinical Information,
    # the answer as the Finding under Findings
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    root.ContentSequence = Sequence(list(hd.sr.LanguageOfContentItemAndDescendants(ENGLISH)))
    root.ContentSequence.extend(observer)
    clinical = hd.sr.ContainerContentItem(
        name=codes.LN.ClinicalInformation, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    clinical.ContentSequence = Sequence(
        [
            hd.sr.TextContentItem(
                name=codes.LN.Request,
                value=_text(report.question, "(no question)"),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    root.ContentSequence.append(clinical)
    findings = hd.sr.ContainerContentItem(
        name=codes.LN.Findings, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    finding = hd.sr.TextContentItem(
        name=codes.DCM.Finding,
        value=_text(version.text, "(no text)"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    frames = int(source.get("NumberOfFrames") or 1)
    frame = getattr(report, "frame", None)
    written_by = []  # TID 1001: a person's words are not the device's
    if author is not None and version.text != report.answer:
        written_by = list(
            hd.sr.ObserverContext(
                observer_type=codes.DCM.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name=_person_name(author)
                ),
            )
        )
    finding.ContentSequence = Sequence(
        [
            *written_by,
            hd.sr.ImageContentItem(
                name=codes.DCM.BestIllustrationOfFinding,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                # of a multi-frame image, the frame the model saw (1-based here)
                referenced_frame_numbers=[(frames // 2 if frame is None else frame) + 1]
                if frames > 1
                else None,
                relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
            ),
        ]
    )
    findings.ContentSequence = Sequence([finding])
    if version.text != report.answer:
        findings.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=_text(f"Unedited model answer: {report.answer}", ""),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if report.cut_short(version.text):
        findings.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=CUT_SHORT_NOTE,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if version.status == "amended":
        findings.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=_text(f"Amended after signing: {version.reason}", ""),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    root.ContentSequence.append(findings)

    signed = version.status in SIGNED_STATUSES and signer is not None
    # every time is the version's own: the same version gives the same bytes whenever it is
    # built or pushed, and a signed one says when it was signed (stored times come back aware,
    # in UTC: `models.UTCDateTime`)
    at = source_time(source, version.updated_at)
    referenced_class = source.SOPClassUID
    source = _evidence(source)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=_series_uid(report),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_instance_uid(report, version.updated_at),
        instance_number=_instance_number(report, version),
        manufacturer=MANUFACTURER,
        is_complete=signed,
        is_final=signed,
        is_verified=signed,
        institution_name=institution,
        verifying_observer_name=_person_name(signer.name) if signed and signer else None,
        verifying_organization=signer.organization if signed and signer else None,
        specific_character_set="ISO_IR 192",  # UTF-8: reports are not ASCII-only
    )
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, []):
            for series in study.ReferencedSeriesSequence:
                for item in series.ReferencedSOPSequence:
                    item.ReferencedSOPClassUID = referenced_class  # see `_evidence`
    sr.SeriesDescription = "AI report (TinyLLaVA-Med)"
    sr.SoftwareVersions = __version__
    stamp_times(sr, at)
    for item in (
        *sr.get("VerifyingObserverSequence", []),
        *sr.get("ContributingEquipmentSequence", []),
    ):
        for keyword in ("VerificationDateTime", "ContributionDateTime"):  # highdicom's: now
            if keyword in item:
                setattr(item, keyword, DT(at.replace(tzinfo=None)))
    if signed and signer is not None and signer.key_id:
        for observer in sr.get("VerifyingObserverSequence", []):
            observer.VerifyingObserverIdentificationCodeSequence = [_signer_code(signer)]
    if (predecessor := _predecessor(report, version, sr.StudyInstanceUID, sent)) is not None:
        sr.PredecessorDocumentsSequence = [predecessor]
    return sr


# the coding scheme of signers' key ids: private ("99" prefix, PS3.16 8.2), this server's own
SIGNER_SCHEME = "99TLLVMED"


def _signer_code(signer: Signer) -> pydicom.Dataset:
    """The Verifying Observer Identification Code of `signer`: its API key's id, in this
    server's own scheme. Two keys of one name (a name need not be unique) sign as different
    observers; before, the sequence was empty and the name alone stood for the signer."""
    item = pydicom.Dataset()
    key = str(signer.key_id)
    if len(key) <= 16:
        item.CodeValue = key
    else:
        item.LongCodeValue = key
    item.CodingSchemeDesignator = SIGNER_SCHEME
    item.CodeMeaning = _person_name(signer.name).rstrip("^")[:64]
    return item


def pushed_versions(session: Session, report: Report, status: str | None = None) -> list[datetime]:
    """The versions of `report` whose SRs were queued for the PACS (or only those whose push
    has that `status`). An SR names every earlier version queued, sent yet or not: its instance
    UID fixes its contents, so what it names cannot depend on how far the queue has got (a
    draft's push in a long backoff may go after the signed SR's; the PACS links them when it
    comes)."""
    from tinyllava_med.server.jobs import PUSH_SR

    query = select(Job).where(Job.kind == PUSH_SR, Job.study_id == report.study_id)
    if status is not None:
        query = query.where(Job.status == status)
    return [
        datetime.fromisoformat(job.payload["version"])
        for job in session.scalars(query)
        if job.payload.get("report_id") == report.id and job.payload.get("version")
    ]


def to_bytes(ds: pydicom.Dataset) -> bytes:
    """DICOM Part 10 bytes (preamble, file meta, explicit VR little endian)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def signer_name(session: Session, report: Report) -> str | None:
    """The display name of the key that signed `report` (keys are named for their holder)."""
    return key_name(session, report.signed_by)


def key_name(session: Session, key_id: str | None) -> str | None:
    if key_id is None:
        return None
    return crud.key_names(session, [key_id]).get(key_id, key_id)


def missing_uid(report: Report) -> str | None:
    """The UID an SR of `report` references and its DICOM image lacks (Type 1, yet some CDs and
    converters leave one out) or holds in a form that is no UID (`_UID`), else None. The image
    itself is filed under whatever it holds, as a PACS may have filed it."""
    image = report.image
    assert image is not None
    for name, value in (
        ("SOP Class UID", image.SOPClassUID),
        ("SOP Instance UID", image.SOPInstanceUID),
        ("Series Instance UID", image.SeriesInstanceUID),
        ("Study Instance UID", report.study.StudyInstanceUID),
    ):
        if not value or not _UID.fullmatch(value):
            return name
    return None


def report_sr(
    session: Session,
    store: ImageStore,
    report: Report,
    institution: str,
    at: datetime | None = None,
    *,
    checked: bool = True,
) -> bytes:
    """The SR of a stored report (as it was at `at`, default now) as Part 10 bytes; 409 when its
    image is not DICOM, 410 when its file is missing or (`checked`) damaged."""
    image = report.image
    if image is None or image.kind != "dicom":
        raise APIError(
            409,
            "no_dicom_source",
            "this report's image is not a DICOM instance, so there is no study to attach an "
            "SR to; use the FHIR or JSON form",
        )
    if (missing := missing_uid(report)) is not None:
        raise APIError(
            409,
            "no_dicom_source",
            f"this report's image has no valid {missing}, so an SR cannot reference it; use the "
            "FHIR or JSON form",
        )
    # a released image's file is gone; its header, kept for this, has all the SR copies
    held = image.sha256 if image.released_at is None else image.header_sha256
    if held is None:
        raise APIError(
            409,
            "no_dicom_source",
            "this report's image was released without a readable DICOM header; retrieve the "
            "study from the PACS again to export its SR",
        )
    data = stored_file(store, held, checked=checked)
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    version = version_at(report, at)
    name = key_name(session, version.signed_by)
    signer = Signer(name, institution, version.signed_by) if name is not None else None
    sent = pushed_versions(session, report)
    sr = build_sr(
        report,
        source,
        signer=signer,
        institution=institution,
        version=version,
        sent=sent,
        author=key_name(session, text_author(report, version)),
    )
    return to_bytes(sr)
