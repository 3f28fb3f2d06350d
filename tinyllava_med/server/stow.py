"""STOW-RS (DICOM PS3.18 §10.5) without HTTP: parse a `multipart/related` body into DICOM parts,
and build the `application/dicom+json` store response.

Parsing uses python-multipart's boundary parser (the same one FastAPI's form parsing uses), which
handles any multipart subtype. Each part's own `Content-Type` must be `application/dicom`.

Failure Reasons (0008,1197) used, from the Storage Service Class (PS3.4 Annex B.2.3):
- 0xC000 Cannot understand: not a DICOM Part 10 instance, or pixel data that cannot be decoded;
- 0xA900 Data Set does not match SOP Class: the instance is not of the study named in the URL;
- 0xA700 Out of resources: larger than the server's pixel / frame limits;
- 0x0110 Processing failure: anything else (the message is logged without patient data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.sequence import Sequence
from python_multipart.multipart import MultipartParser, parse_options_header

MEDIA_TYPE = "application/dicom+json"
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122  # this server stores images: not SR, KO, PR, PDF, ...
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # PS3.18's Referenced Transfer Syntax Not Supported


class StowRequestError(Exception):
    """The request as a whole is unusable: (status, code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Part:
    content_type: str
    data: bytes


def parse_multipart_related(
    content_type: str | None, body: bytes, max_parts: int | None = None
) -> list[Part]:
    """The parts of a STOW-RS body; 415 unless `multipart/related; type="application/dicom"`,
    413 as soon as a part past `max_parts` begins (a body of millions of empty parts is refused
    before it is held as millions of parts)."""
    if not content_type:
        raise StowRequestError(415, "unsupported_media_type", "no Content-Type")
    media, params = parse_options_header(content_type)
    # latin-1: a header's bytes as they came (UTF-8 would fail on some: a 500)
    p = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()}
    if media.decode("latin-1").lower() != "multipart/related":
        raise StowRequestError(
            415,
            "unsupported_media_type",
            'STOW-RS takes multipart/related; type="application/dicom"',
        )
    if p.get("type", "application/dicom").lower() != "application/dicom":
        raise StowRequestError(
            415,
            "unsupported_media_type",
            f"only application/dicom parts are accepted (type={p['type']!r}); the JSON and "
            "XML metadata forms are not supported",
        )
    boundary = p.get("boundary")
    if not boundary:
        raise StowRequestError(400, "bad_multipart", "the Content-Type has no boundary")

    parts: list[Part] = []
    headers: dict[str, str] = {}
    chunks: list[bytes] = []
    name: list[bytes] = []
    value: list[bytes] = []

    def on_part_begin() -> None:
        if max_parts is not None and len(parts) >= max_parts:
            raise _TooManyParts
        headers.clear()
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        name.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def on_header_end() -> None:
        headers[b"".join(name).decode("latin-1").lower()] = b"".join(value).decode("latin-1")
        name.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        ctype = headers.get("content-type", "application/dicom")
        parts.append(Part(ctype.split(";")[0].strip().lower(), b"".join(chunks)))

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # refuses a boundary over 256 bytes
        parser.write(body)
        parser.finalize()
    except _TooManyParts:
        raise StowRequestError(
            413, "too_many_files", f"at most {max_parts} instances per request, got more"
        ) from None
    except Exception as e:  # python-multipart raises its own MultipartParseError
        raise StowRequestError(400, "bad_multipart", f"the multipart body is malformed: {e}") from e
    if not parts:
        raise StowRequestError(400, "bad_multipart", "the multipart body has no parts")
    return parts


class _TooManyParts(Exception):
    pass


@dataclass
class StoreResult:
    """What happened to each instance of one STOW-RS request."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # SOP class, SOP instance
    failed: list[tuple[str | None, str | None, int]] = field(default_factory=list)
    already: int = 0  # of `stored`, instances this server held before
    accession_conflicts: int = 0  # of `stored`, new ones naming another accession number

    @property
    def not_images(self) -> int:
        """Of `failed`, the objects that are no image (0x0122: an SR, a PDF), which a retrieve
        of a whole study skips rather than fails."""
        return sum(1 for *_, reason in self.failed if reason == SOP_CLASS_NOT_SUPPORTED)

    @property
    def status(self) -> int:
        if self.failed and not self.stored:
            return 409
        return 202 if self.failed else 200

    def to_json(self) -> dict[str, Any]:
        # Retrieve URL (0008,1190) is Type 2 (PS3.18 Table I.1-1), at the top and in each stored
        # instance's item: present and empty, as this server is not a WADO-RS origin (reports
        # are read through /v1/reports: JSON, FHIR, SR, or pushed back to the PACS).
        ds = Dataset()
        ds.RetrieveURL = None
        ds.FailedSOPSequence = Sequence()
        for sop_class, sop_instance, reason in self.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class or ""
            item.ReferencedSOPInstanceUID = sop_instance or ""
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
        ds.ReferencedSOPSequence = Sequence()
        for sop_class, sop_instance in self.stored:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            item.RetrieveURL = None
            ds.ReferencedSOPSequence.append(item)
        if not ds.FailedSOPSequence:
            del ds.FailedSOPSequence
        if not ds.ReferencedSOPSequence:
            del ds.ReferencedSOPSequence
        return ds.to_json_dict()
