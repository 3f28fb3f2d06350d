"""Importing DICOM media: the files of a CD or USB stick a patient brings (a DICOMDIR tree), a
folder of them, or a ZIP, for `POST /v1/studies/import` and `tinyllava-med import`.

Every file is filed by its Study Instance UID, as STOW-RS files what a PACS pushes
(`ingest.file_instances`): one import may hold several studies (a CD often carries a patient's
earlier examinations), an instance already here is acknowledged without a copy, and each study
that got new images has its automatic report queued. Files are decoded and committed in chunks
of `CHUNK` files or `max_upload_bytes` (what one request may hold), whichever comes first, so
a large CD, or a small ZIP whose members inflate to gigabytes, never sits in memory whole; each
chunk is audited (`study.import`) in the transaction that stores it.

What is not an image is skipped, not refused: the DICOMDIR itself, DICOM objects without pixels
(structured reports, presentation states, key objects), and what else a CD carries (its viewer
program, autorun files, documents). File and folder names never reach the response, the logs or
the audit: a CD's folders may be named after the patient.

ZIP archives are expanded with limits checked on the archive's directory before anything is
read (`max_import_files` members, `max_import_bytes` in all, `max_upload_bytes` per member) and
again while reading, so an archive that lies about its sizes inflates no further than it said.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session, sessionmaker

from tinyllava_med.imaging import ImagingError
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.ingest import audit_as, decode, file_instances
from tinyllava_med.server.serving import Decoded
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore
from tinyllava_med.server.stow import CANNOT_UNDERSTAND, PROCESSING_FAILURE, Part

CHUNK = 32  # files decoded and committed together
# what a CD carries besides images, by the reason decoding gives
# a refusal's name in the summary's `failed`: a file without the UIDs an image is filed by, and
# one whose UIDs conflict with what is held here (`ingest`'s checks): its study is another
# patient's, or its SOP Instance UID is an image of another study or another released object
FAILURES = {CANNOT_UNDERSTAND: "missing_uids", PROCESSING_FAILURE: "uid_conflict"}
SKIPPED = {"unsupported_format": "not_dicom", "not_dicom": "not_dicom", "no_pixel_data": "no_image"}
_DICM_AT = slice(128, 132)


@dataclass
class ImportSummary:
    """What one import did: new and already-held images, the Study Instance UIDs of the images
    filed (in the order first seen), queued jobs, and files skipped or failed by reason."""

    stored: int = 0
    already: int = 0
    study_uids: list[str] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)


def _is_zip(head: bytes) -> bool:
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06") and head[_DICM_AT] != b"DICM"


# an upload's file, or a file on this machine (`tinyllava-med import`)
Source = BinaryIO | Path


@contextmanager
def _opened(src: Source) -> Iterator[BinaryIO]:
    if isinstance(src, Path):
        with src.open("rb") as f:
            yield f
    else:
        src.seek(0)
        yield src


def _open_zip(f: BinaryIO) -> zipfile.ZipFile | None:
    head = f.read(132)
    f.seek(0)
    if not _is_zip(head):
        return None
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError):
        return None


def _members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    return [i for i in zf.infolist() if not i.is_dir()]


def _check_size(sources: list[Source], settings: Settings) -> None:
    """Refuse an import over `max_import_files` / `max_import_bytes` (ZIPs counted by their
    directories) before a file is decoded or stored."""
    n, size = 0, 0
    for src in sources:
        with _opened(src) as f:
            zf = _open_zip(f)
            if zf is None:
                n += 1
                size += f.seek(0, 2)
                continue
            with zf:
                members = _members(zf)
                n += len(members)
                size += sum(i.file_size for i in members)
    if n > settings.max_import_files or size > settings.max_import_bytes:
        raise APIError(
            413,
            "too_large",
            f"an import holds at most {settings.max_import_files} files and "
            f"{settings.max_import_bytes} bytes once unpacked; this one holds {n} files, "
            f"{size} bytes",
        )


def _zip_files(zf: zipfile.ZipFile, settings: Settings, summary: ImportSummary) -> Iterator[bytes]:
    with zf:
        for info in _members(zf):
            if info.flag_bits & 0x1:
                summary.failed["encrypted"] += 1
                continue
            if info.file_size > settings.max_upload_bytes:
                summary.failed["too_large"] += 1
                continue
            try:
                with zf.open(info) as member:
                    data = member.read(info.file_size + 1)
            except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError):
                summary.failed["bad_zip"] += 1
                continue
            if len(data) != info.file_size:  # the directory lied: nothing past what it said
                summary.failed["bad_zip"] += 1
                continue
            yield data


def media_files(
    sources: list[Source], settings: Settings, summary: ImportSummary
) -> Iterator[bytes]:
    """Each file's bytes, with ZIP archives expanded, once the whole import is known to be
    within the `max_import_*` limits; a file over `max_upload_bytes` fails unread."""
    _check_size(sources, settings)
    for src in sources:
        with _opened(src) as f:
            zf = _open_zip(f)
            if zf is not None:
                yield from _zip_files(zf, settings, summary)
            elif f.seek(0, 2) > settings.max_upload_bytes:
                summary.failed["too_large"] += 1
            else:
                f.seek(0)
                yield f.read()


def _file_chunk(
    session_factory: sessionmaker[Session],
    store: ImageStore,
    settings: Settings,
    chunk: list[bytes],
    summary: ImportSummary,
    actor: str,
) -> None:
    parts = [Part("application/dicom", data) for data in chunk]
    keep_parts: list[Part] = []
    keep: list[Decoded | ImagingError] = []
    for part, d in zip(parts, decode(parts, settings, store), strict=True):
        if isinstance(d, ImagingError):
            if d.code in SKIPPED:
                summary.skipped[SKIPPED[d.code]] += 1
            else:
                summary.failed[d.code] += 1
            continue
        keep_parts.append(part)
        keep.append(d)
    if not keep:
        return

    result, _, jobs = file_instances(
        session_factory, store, settings, keep_parts, keep, audit=audit_as(actor, "study.import")
    )
    summary.stored += len(result.stored) - result.already
    summary.already += result.already
    # the studies of the images filed (new or held), not of those refused: an image refused
    # because its Study Instance UID names another patient's study here must not bring that
    # study into the importer's answer (nor its audit)
    filed = {sop for _, sop in result.stored}
    uids = [
        d.metadata.StudyInstanceUID
        for d in keep
        if isinstance(d, Decoded) and d.metadata.SOPInstanceUID in filed
    ]
    summary.study_uids += [u for u in dict.fromkeys(uids) if u and u not in summary.study_uids]
    summary.jobs += jobs
    for _, _, reason in result.failed:
        summary.failed[FAILURES.get(reason, f"{reason:#06x}")] += 1


def import_media(
    session_factory: sessionmaker[Session],
    store: ImageStore,
    settings: Settings,
    sources: list[Source],
    *,
    actor: str,
) -> ImportSummary:
    """File every DICOM image among `sources` (ZIPs expanded), `CHUNK` files or
    `max_upload_bytes` at a time, each chunk committed with its audit event. Blocking: call it
    from a worker thread."""
    summary = ImportSummary()
    chunk: list[bytes] = []
    held = 0
    for data in media_files(sources, settings, summary):
        chunk.append(data)
        held += len(data)
        if len(chunk) == CHUNK or held >= settings.max_upload_bytes:
            _file_chunk(session_factory, store, settings, chunk, summary, actor)
            chunk, held = [], 0
    if chunk:
        _file_chunk(session_factory, store, settings, chunk, summary, actor)
    return summary
