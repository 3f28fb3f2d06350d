"""Retrieving a study from the PACS, for a reader who wants to ask about a study that was never
pushed here: `find_studies` looks it up by accession number or Study Instance UID while the
request waits, and a `retrieve_study` job fetches it. Either transport files the instances as
pushed ones are filed (`ingest.file_instances`: same study by UID, held instances acknowledged
without a copy, automatic report queued).

- DICOMweb (`dicomweb_pull_url`, `dicomweb_pull_headers`; dicomweb-client): QIDO-RS, then
  WADO-RS, streamed and filed `BATCH` instances at a time, so a large CT is never all in memory.
- DIMSE (`dimse_pull` = "AET@host:port", for a PACS without DICOMweb; pynetdicom): C-FIND at
  study level, then a C-FIND of the study's series and a C-MOVE of each series of images to
  this server's own AE title, whose Storage SCP (`dimse.py`) files what arrives; the PACS must
  know this server as a DICOM modality and be in `dimse_peers`. Series of objects without
  pixels (a CT's dose report, key object notes, this server's own SRs pushed back) are not
  moved: the Storage SCP refuses them, and a PACS ends a whole C-MOVE at its first refused
  sub-operation.

A PACS's matching is not trusted to be exact: a search by accession number keeps only the
studies whose accession number is the one asked for (Orthanc, for one, matches regardless of
case, so "acc1" found ACC1, another patient's order).

A retry after a failure files only what is still missing.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pydicom
from sqlalchemy import func, select

from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Image, Study
from tinyllava_med.server.ingest import Audit, decode, file_instances
from tinyllava_med.server.stow import Part

if TYPE_CHECKING:
    from dicomweb_client.api import DICOMwebClient
    from sqlalchemy.orm import Session, sessionmaker

    from tinyllava_med.server.settings import Settings
    from tinyllava_med.server.storage import ImageStore

BATCH = 16
SEARCH_TIMEOUT_S = 10.0  # a reader waits on it
FETCH_TIMEOUT_S = 120.0  # per HTTP read of the stream
STUDY_UID = "0020000D"
ACCESSION = "00080050"
# Modalities of series that hold no images (every instance of a series has the series'
# modality, PS3.3 C.7.3.1): structured reports, key objects, presentation states, documents,
# registrations, fiducials, RT plans / structures / records, audio and waveforms, assessments
NO_IMAGES = frozenset(
    {"SR", "KO", "PR", "DOC", "REG", "FID", "RTPLAN", "RTSTRUCT", "RTRECORD", "PLAN"}
    | {"AU", "ECG", "HD", "RESP", "EPS", "ASMT", "RWV"}
)


class PacsError(Exception):
    """The PACS could not be asked (unreachable, refused, or an answer that is not DICOMweb)."""


def one_try_client(url: str, headers: dict[str, str], timeout_s: float) -> DICOMwebClient:
    """A DICOMweb client that tries once: a reader waits on a search, and a failed fetch is
    retried by the job queue with its backoff (dicomweb-client's own retries wait minutes)."""
    from dicomweb_client.api import DICOMwebClient

    c = DICOMwebClient(url=url, headers=dict(headers), timeout=timeout_s)
    c.set_http_retry_params(retry=False)
    return c


def client(settings: Settings, timeout_s: float) -> DICOMwebClient:
    """The one-try client of the PACS at `dicomweb_pull_url`."""
    if not settings.dicomweb_pull_url:
        raise PacsError("no dicomweb_pull_url is configured")
    return one_try_client(settings.dicomweb_pull_url, settings.dicomweb_pull_headers, timeout_s)


def find_studies(
    settings: Settings, *, accession_number: str | None = None, study_uid: str | None = None
) -> list[str]:
    """The Study Instance UIDs the PACS holds for the accession number or UID."""
    if settings.dimse_pull:
        return _c_find(settings, accession_number, study_uid)
    filters = (
        {"AccessionNumber": accession_number}
        if accession_number is not None
        else {"StudyInstanceUID": study_uid}
    )
    with _as_pacs_error("search"):
        found = client(settings, SEARCH_TIMEOUT_S).search_for_studies(search_filters=filters)
        uids = [
            str(s[STUDY_UID]["Value"][0])
            for s in found
            if s.get(STUDY_UID, {}).get("Value")
            and _same_accession(
                accession_number,
                (s[ACCESSION].get("Value") or [""])[0] if ACCESSION in s else None,
            )
        ]
    return list(dict.fromkeys(uids))


def _same_accession(asked: str | None, found: Any) -> bool:
    """Whether a match's accession number is the one asked for (always, for a search by UID):
    spaces around it are not significant, case is. `found` None: the PACS did not return the
    attribute (which it must), so its own match stands."""
    if asked is None or found is None:
        return True
    return str(found).strip(" ") == asked.strip(" ")


@contextmanager
def _as_pacs_error(what: str) -> Iterator[None]:
    """Whatever goes wrong asking the PACS (the network, its refusal, an answer that is not
    what the standard says) is a PacsError: the route answers 502, never 500."""
    try:
        yield
    except PacsError:
        raise
    except Exception as e:  # requests', dicomweb-client's and pynetdicom's errors alike
        raise PacsError(f"the PACS did not answer the {what} ({type(e).__name__})") from e


def _part10(ds: pydicom.Dataset) -> bytes:
    """The instance as a Part 10 file; b"" (decoded as not DICOM, so counted as failed) when
    the PACS sent one that cannot be written back, such as one without a transfer syntax."""
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except Exception:
        return b""
    return buf.getvalue()


def retrieve_study(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ImageStore,
    study_uid: str,
    audit: Audit | None = None,
) -> dict[str, Any]:
    """Fetch every instance of the study and file them; counts (stored, already held, failed),
    and the study's id here (None when no instance could be stored: a study of reports only,
    say, which retrying cannot fix). Over DICOMweb each batch is committed with its `audit`
    event, so a fetch that fails halfway leaves no unaudited instances (over DIMSE the Storage
    SCP audits what the PACS sends)."""
    if settings.dimse_pull:
        return _c_move(settings, session_factory, study_uid)
    stored = already = failed = skipped = 0
    studies: list[str] = []
    jobs: list[int] = []

    def file(batch: list[pydicom.Dataset]) -> None:
        nonlocal stored, already, failed, skipped
        parts = [Part("application/dicom", _part10(ds)) for ds in batch]
        result, got, queued = file_instances(
            session_factory,
            store,
            settings,
            parts,
            decode(parts, settings, store),
            study_uid,
            audit,
        )
        stored += len(result.stored) - result.already
        already += result.already
        # objects without pixels (a dose SR, this server's own SRs) are not stored: skipped,
        # not failed, as the series a DIMSE retrieve does not move
        skipped += result.not_images
        failed += len(result.failed) - result.not_images
        studies.extend(s for s in got if s not in studies)
        jobs.extend(j for j in queued if j not in jobs)

    batch: list[pydicom.Dataset] = []
    # as stored ("*"): without it the PACS decompresses every instance to Explicit VR Little
    # Endian (10-20x the bytes for ultrasound and multi-frame), or fails where it cannot
    as_stored = (("application/dicom", "*"),)
    for ds in client(settings, FETCH_TIMEOUT_S).iter_study(study_uid, media_types=as_stored):
        batch.append(ds)
        if len(batch) == BATCH:
            file(batch)
            batch = []
    if batch:
        file(batch)
    return {
        "study_instance_uid": study_uid,
        "study_id": studies[0] if studies else _study_id(session_factory, study_uid),
        "stored": stored,
        "already": already,
        "failed": failed,
        "skipped": skipped,
        "jobs": jobs,
    }


def _study_id(session_factory: sessionmaker[Session], study_uid: str) -> str | None:
    with session_factory() as s:
        study = crud.study_by_uid(s, study_uid)
        return study.id if study is not None else None


def _images_of(session_factory: sessionmaker[Session], study_uid: str) -> int:
    """Images held here (not released: `retention.py`) of the study with this UID."""
    with session_factory() as s:
        return (
            s.scalar(
                select(func.count(Image.id))
                .join(Study)
                .where(Study.StudyInstanceUID == study_uid, Image.released_at.is_(None))
            )
            or 0
        )


# --- DIMSE ---------------------------------------------------------------------------------------


def _associate(settings: Settings, sop_class: str) -> Any:
    from tinyllava_med.server.dimse import NoAssociation, Target, associate

    assert settings.dimse_pull is not None
    try:
        return associate(
            Target.parse(settings.dimse_pull),
            settings,
            sop_class,
            timeout_s=SEARCH_TIMEOUT_S,
            dimse_timeout_s=FETCH_TIMEOUT_S,
        )
    except NoAssociation as e:
        raise PacsError(str(e)) from e


def study_query(accession_number: str | None, study_uid: str | None) -> pydicom.Dataset:
    """A STUDY-level C-FIND identifier matching either (an empty one matches any)."""
    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.AccessionNumber = accession_number or ""
    ds.StudyInstanceUID = study_uid or ""
    return ds


def _c_find(settings: Settings, accession_number: str | None, study_uid: str | None) -> list[str]:
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as FIND,
    )

    with _as_pacs_error("C-FIND"):
        found = find_on(_associate(settings, FIND), FIND, study_query(accession_number, study_uid))
    uids = [
        str(ds.StudyInstanceUID)
        for ds in found
        if ds.get("StudyInstanceUID")
        and _same_accession(accession_number, ds.get("AccessionNumber"))
    ]
    return list(dict.fromkeys(uids))


def _image_series(settings: Settings, study_uid: str) -> tuple[list[str], int]:
    """The Series Instance UIDs of the study's series that may hold images, and how many
    series hold none (`NO_IMAGES`), by a SERIES-level C-FIND. ([], 0) from a PACS that lists
    no series: the study is then moved whole."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as FIND,
    )

    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    with _as_pacs_error("C-FIND"):
        found = find_on(_associate(settings, FIND), FIND, query)
    series = {
        str(ds.SeriesInstanceUID): str(ds.get("Modality") or "").strip().upper()
        for ds in found
        if ds.get("SeriesInstanceUID")
    }
    wanted = [uid for uid, modality in series.items() if modality not in NO_IMAGES]
    return wanted, len(series) - len(wanted)


def find_on(assoc: Any, sop_class: str, query: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The matches of a C-FIND on `assoc` (the association is released after); PacsError when
    the PACS refuses or fails it (`pacs check` asks so too)."""
    matches: list[pydicom.Dataset] = []
    try:
        for status, found in assoc.send_c_find(query, sop_class):
            code = int(status.Status) if "Status" in status else None
            if code in (0xFF00, 0xFF01):  # pending: one match
                if found is not None:
                    matches.append(found)
            elif code != 0x0000:
                raise PacsError(
                    "the PACS's C-FIND failed"
                    + (f" (status 0x{code:04X})" if code is not None else " (no answer)")
                )
    finally:
        assoc.release()
    return matches


def _c_move(
    settings: Settings, session_factory: sessionmaker[Session], study_uid: str
) -> dict[str, Any]:
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelMove as MOVE,
    )

    series, skipped = _image_series(settings, study_uid)
    if skipped and not series:  # reports only: nothing to move, which retrying cannot change
        return {
            "study_instance_uid": study_uid,
            "study_id": _study_id(session_factory, study_uid),
            "stored": 0,
            "already": 0,
            "failed": 0,
            "skipped_series": skipped,
            "jobs": [],
        }
    # the level and the unique keys only: an empty Accession Number beside them made older
    # Orthancs match on it, and move nothing
    queries = []
    levels: list[str | None] = list(series) or [None]  # None: the whole study (no series listed)
    for series_uid in levels:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
        query.StudyInstanceUID = study_uid
        if series_uid is not None:
            query.SeriesInstanceUID = series_uid
        queries.append(query)
    before = _images_of(session_factory, study_uid)
    completed = failed = warned = 0
    assoc = _associate(settings, MOVE)
    try:
        for query in queries:
            final = None
            for status, _ in assoc.send_c_move(query, settings.dimse_ae_title, MOVE):
                final = status
            code = int(final.Status) if final is not None and "Status" in final else None
            if code not in (0x0000, 0xB000):  # success; warning: some sub-operations failed
                raise PacsError(
                    "the PACS's C-MOVE failed"
                    + (f" (status 0x{code:04X})" if code is not None else " (no answer)")
                )
            assert final is not None
            completed += int(final.get("NumberOfCompletedSuboperations", 0))
            failed += int(final.get("NumberOfFailedSuboperations", 0))
            warned += int(final.get("NumberOfWarningSuboperations", 0))
    finally:
        assoc.release()
    stored = _images_of(session_factory, study_uid) - before
    # "success" at moving nothing: the job is not done (the counts are optional on the final
    # response, so only when nothing arrived either)
    if completed + failed + warned == 0 and stored == 0:
        raise PacsError(
            "the PACS's C-MOVE sent no instance of the study (does it know this server's AE "
            "title and address as a move destination?)"
        )
    return {
        "study_instance_uid": study_uid,
        "study_id": _study_id(session_factory, study_uid),
        "stored": stored,
        "already": max(completed - stored, 0),
        "failed": failed + warned,
        "skipped_series": skipped,
        "jobs": [],  # the Storage SCP queued the automatic report as the instances arrived
    }
