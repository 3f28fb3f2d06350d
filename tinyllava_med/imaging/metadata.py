"""What the server may store and show about a file (`SafeMetadata`), and, apart, who it is.

`SafeMetadata` is an allow-list of DICOM attributes (named by their keywords) that identify the
study, series and image and describe how it was made; nothing in it names the patient. Free-text
values are cut to 256 printable characters; a UID or code longer than it may be is dropped
(`MAX_LENGTH`). Patient identity is read only by an explicit call to
`patient_identifiers`, for the callers (e.g. matching a worklist) that need it.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

_MAX_TEXT = 256
# The longest value kept of a keyword the server files by. A UID (VR UI) or code string (CS)
# longer than the standard allows is malformed and becomes None, as any malformed value does; an
# accession number (SH: 16 in the standard) is kept up to 64, as some RIS issue longer ones. The
# database's columns hold these lengths (a longer value made PostgreSQL refuse the whole file).
MAX_LENGTH = {
    "StudyInstanceUID": 64,
    "SeriesInstanceUID": 64,
    "SOPInstanceUID": 64,
    "SOPClassUID": 64,
    "TransferSyntaxUID": 64,
    "Modality": 16,
    "AccessionNumber": 64,
    "BodyPartExamined": 64,
}


class SafeMetadata(BaseModel):
    """Patient-free description of one file; fields are DICOM keywords, None when absent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    StudyInstanceUID: str | None = None
    SeriesInstanceUID: str | None = None
    SOPInstanceUID: str | None = None
    SOPClassUID: str | None = None
    TransferSyntaxUID: str | None = None
    Modality: str | None = None
    BodyPartExamined: str | None = None
    AccessionNumber: str | None = None
    StudyDate: str | None = None
    SeriesDescription: str | None = None
    Manufacturer: str | None = None
    Rows: int | None = None
    Columns: int | None = None
    NumberOfFrames: int | None = None
    SamplesPerPixel: int | None = None
    BitsStored: int | None = None
    PhotometricInterpretation: str | None = None
    WindowCenter: float | None = None
    WindowWidth: float | None = None
    PixelSpacing: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields that are present, JSON-ready."""
        return self.model_dump(mode="json", exclude_none=True)


_TEXT_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "AccessionNumber",
    "StudyDate",
    "SeriesDescription",
    "Manufacturer",
    "PhotometricInterpretation",
)
_INT_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsStored")

PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
)


def safe_metadata(ds: Dataset, *, n_frames: int) -> SafeMetadata:
    """Read the allow-listed attributes of `ds`; a malformed value becomes None."""
    fields: dict[str, Any] = {k: _text(_value(ds, k)) for k in _TEXT_KEYWORDS}
    fields.update({k: _number(_value(ds, k), int) for k in _INT_KEYWORDS})
    meta = getattr(ds, "file_meta", None)
    fields["TransferSyntaxUID"] = _text(_value(meta, "TransferSyntaxUID")) if meta else None
    for k, n in MAX_LENGTH.items():
        if fields[k] is not None and len(fields[k]) > n:
            fields[k] = None
    fields["NumberOfFrames"] = n_frames
    fields["WindowCenter"] = _number(_first(_value(ds, "WindowCenter")), float)
    fields["WindowWidth"] = _number(_first(_value(ds, "WindowWidth")), float)
    spacing = _value(ds, "PixelSpacing")
    try:
        fields["PixelSpacing"] = (float(spacing[0]), float(spacing[1])) if spacing else None
    except (TypeError, ValueError, IndexError):
        fields["PixelSpacing"] = None
    return SafeMetadata(**fields)


def patient_identifiers(ds: Dataset) -> dict[str, str]:
    """Patient name, IDs, birth date, sex and age of `ds` (present ones only).

    For callers that must match patients (worklists, exports to the same PACS); never put the
    result in logs, metrics or error messages.
    """
    found = {k: _text(_value(ds, k)) for k in PATIENT_KEYWORDS}
    return {k: v for k, v in found.items() if v}


def _value(ds: Dataset | None, keyword: str) -> Any:
    if ds is None:
        return None
    try:
        return ds.get(keyword)
    except Exception:  # a malformed value is as good as an absent one here
        return None


def _first(value: Any) -> Any:
    if value is None or isinstance(value, str | bytes):
        return value
    try:
        return value[0] if len(value) else None
    except TypeError:
        return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    text = "".join(ch for ch in str(value) if ch.isprintable()).strip()
    return text[:_MAX_TEXT] or None


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    if value is None or value == "":
        return None
    try:
        number = kind(float(value)) if kind is int else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None
