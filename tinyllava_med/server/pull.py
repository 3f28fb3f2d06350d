"""Retrieving a study from the PACS over DICOMweb (dicomweb-client), for a reader who wants to ask
about a study that was never pushed here: QIDO-RS finds it by accession number or Study Instance
UID (`find_studies`, while the request waits), and a `retrieve_study` job fetches its instances
with WADO-RS and files them as STOW-RS files pushed ones (`ingest.file_instances`: same study
by UID, held instances acknowledged without a copy, automatic report queued).

The PACS is `dicomweb_pull_url` (with `dicomweb_pull_headers`). Instances are streamed and filed
`BATCH` at a time, so a large CT is never all in memory; a retry after a failure files only what
is still missing.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import pydicom

from tinyllava_med.server.ingest import decode, file_instances
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


class PacsError(Exception):
    """The PACS could not be asked (unreachable, refused, or an answer that is not DICOMweb)."""


def client(settings: Settings, timeout_s: float) -> DICOMwebClient:
    """A client that tries once: a reader waits on the search, and a failed fetch is retried
    by the job queue with its backoff (dicomweb-client's own retries would wait minutes)."""
    from dicomweb_client.api import DICOMwebClient

    if not settings.dicomweb_pull_url:
        raise PacsError("no dicomweb_pull_url is configured")
    c = DICOMwebClient(
        url=settings.dicomweb_pull_url,
        headers=dict(settings.dicomweb_pull_headers),
        timeout=timeout_s,
    )
    c.set_http_retry_params(retry=False)
    return c


def find_studies(
    settings: Settings, *, accession_number: str | None = None, study_uid: str | None = None
) -> list[str]:
    """The Study Instance UIDs the PACS holds for the accession number or UID (QIDO-RS)."""
    filters = (
        {"AccessionNumber": accession_number}
        if accession_number is not None
        else {"StudyInstanceUID": study_uid}
    )
    try:
        found = client(settings, SEARCH_TIMEOUT_S).search_for_studies(search_filters=filters)
    except PacsError:
        raise
    except Exception as e:  # requests' and dicomweb-client's errors alike
        raise PacsError(f"the PACS did not answer the search ({type(e).__name__})") from e
    uids = [str(s[STUDY_UID]["Value"][0]) for s in found if s.get(STUDY_UID, {}).get("Value")]
    return list(dict.fromkeys(uids))


def _part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def retrieve_study(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ImageStore,
    study_uid: str,
) -> dict[str, Any]:
    """WADO-RS every instance of the study and file them; counts, and the study's id here (None
    when no instance could be stored: a study of reports only, say, which retrying cannot fix)."""
    stored = already = failed = 0
    studies: list[str] = []
    jobs: list[int] = []

    def file(batch: list[pydicom.Dataset]) -> None:
        nonlocal stored, already, failed
        parts = [Part("application/dicom", _part10(ds)) for ds in batch]
        result, got, queued = file_instances(
            session_factory, store, settings, parts, decode(parts, settings), study_uid
        )
        stored += len(result.stored) - result.already
        already += result.already
        failed += len(result.failed)
        studies.extend(s for s in got if s not in studies)
        jobs.extend(j for j in queued if j not in jobs)

    batch: list[pydicom.Dataset] = []
    for ds in client(settings, FETCH_TIMEOUT_S).iter_study(study_uid):
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
        "jobs": jobs,
    }


def _study_id(session_factory: sessionmaker[Session], study_uid: str) -> str | None:
    from sqlalchemy import select

    from tinyllava_med.server.db.models import Study

    with session_factory() as s:
        return s.scalar(
            select(Study.id)
            .where(Study.StudyInstanceUID == study_uid)
            .order_by(Study.created_at.desc())
            .limit(1)
        )
