"""What the routes do, without HTTP: decode uploaded files, add them to studies, pick the
image for a question, store answers as reports, and turn database rows into public schemas.
(Which study an upload is filed under is `ingest.py`'s.)

Imaging errors become 4xx `APIError`s here, with messages free of patient data.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from tinyllava_med.imaging import ImageLimits, ImagingError, StudyFile, load_study_file
from tinyllava_med.imaging.metadata import SafeMetadata
from tinyllava_med.imaging.study import Kind
from tinyllava_med.model.generate import Answer
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Image, Report, Study
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.schemas import ImagePublic, ReportPublic, StudyPublic, Tokens
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore

log = logging.getLogger(__name__)

# ImagingError.code -> HTTP status
_IMAGING_STATUS = {
    "not_dicom": 415,
    "unsupported_format": 415,
    "unsupported_transfer_syntax": 415,
    "too_large": 413,
    "decompression_bomb": 413,
    "bad_frame": 422,
    "bad_window": 422,
    "decode_busy": 503,
}


def limits_of(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_pixels=settings.max_pixels,
        max_side=settings.max_side,
        max_frames=settings.max_frames,
        max_bytes_decoded=settings.max_decoded_bytes,
    )


def imaging_error(e: ImagingError, filename: str | None = None) -> APIError:
    status = _IMAGING_STATUS.get(e.code, 400)
    detail: dict[str, Any] = {"imaging_code": e.code}
    if filename is not None:
        detail["file"] = filename
    busy = {"Retry-After": "10"} if status == 503 else None
    return APIError(status, e.code, e.message, detail, headers=busy)


@dataclass
class Upload:
    filename: str
    data: bytes


def stored_image_key(sha256: str, frame: int | None = None) -> tuple[str, int | None]:
    """What the engine's pixel and prefix caches call a stored image's frame: its file's hash
    and the frame. Questions, jobs and `prepare` must name it alike for one to reuse another's
    work."""
    return (sha256, frame)


def unstored_image_key(data: bytes) -> tuple[str, str]:
    """What the engine's pixel and prefix caches call an image sent but not stored (chat, the
    Gradio demo): its hash. Clients send such an image again with every question about it, so
    a follow-up reuses its pixel values and prompt prefix. `decode_upload` renders it one way,
    so the hash alone names the rendering."""
    return ("unstored", hashlib.sha256(data).hexdigest())


def decode_upload(upload: Upload, settings: Settings) -> StudyFile:
    if not upload.data:
        raise APIError(400, "empty_file", "the uploaded file is empty", {"file": upload.filename})
    try:
        return load_study_file(upload.data, limits=limits_of(settings))
    except ImagingError as e:
        raise imaging_error(e, upload.filename) from e


@dataclass(frozen=True)
class Decoded:
    """A decoded file as filing it needs it, without its pixels: those went to the render
    cache (`without_pixels`), so a request of 64 large images holds one decoded image at a
    time, not 64 (8192 x 8192 RGB is 200 MB)."""

    sha256: str
    kind: Kind
    metadata: SafeMetadata
    n_frames: int
    width: int
    height: int


def without_pixels(data: bytes, d: StudyFile, store: ImageStore, limits: ImageLimits) -> Decoded:
    """`d` (decoded from `data` under `limits`) without its pixels, its rendering cached under
    the content's hash: the first question about it does not decode the file again."""
    sha256 = hashlib.sha256(data).hexdigest()  # the store's name for it (`ImageStore.put`)
    store.rendered.put(render_key(sha256, limits), d.image)
    return Decoded(sha256, d.kind, d.metadata, d.n_frames, d.image.width, d.image.height)


def create_study_of(session: Session, m: SafeMetadata) -> Study:
    """A new study carrying the study-level attributes `m`."""
    return crud.create_study(
        session,
        StudyInstanceUID=m.StudyInstanceUID,
        AccessionNumber=m.AccessionNumber,
        Modality=m.Modality,
        BodyPartExamined=m.BodyPartExamined,
        StudyDate=m.StudyDate,
        description=getattr(m, "StudyDescription", None),
    )


# `Session.info` key: the files a transaction's uploads put in the store (`add_file`); a
# rollback queues their sweep (`jobs.sweep_on_rollback`)
STORED_FILES = "stored_files"


def add_file(
    session: Session,
    store: ImageStore,
    study: Study,
    data: bytes,
    d: Decoded,
) -> Image:
    """Store one decoded file (`d`, decoded from `data`) and append it to `study` as its next
    image."""
    m = d.metadata
    sha256 = store.put(data, d.sha256)
    session.info.setdefault(STORED_FILES, []).append(sha256)  # swept if this rolls back
    return crud.add_image(
        session,
        study=study,
        sha256=sha256,
        kind=d.kind,
        size_bytes=len(data),
        SOPInstanceUID=m.SOPInstanceUID,
        SeriesInstanceUID=m.SeriesInstanceUID,
        SOPClassUID=m.SOPClassUID,
        Modality=m.Modality,
        rows=d.height if m.Rows is None else m.Rows,
        columns=d.width if m.Columns is None else m.Columns,
        n_frames=d.n_frames,
        safe_metadata=m.to_dict(),
    )


def load_audited(
    request: Any, session: Session, kind: str, resource_id: str, *, actor: str, action: str
) -> Any:
    """The study or report `resource_id`, or a 404. Failures are audited by the error handler
    in a transaction of their own (this request's is rolled back), so the route sets the
    audit context before it looks."""
    request.state.audit = (actor, action, kind, resource_id)
    getter = {"study": crud.get_study, "report": crud.get_report}[kind]
    found = getter(session, resource_id)
    if found is None:
        raise APIError(404, f"{kind}_not_found", f"no {kind} with this id")
    return found


def image_of(study: Study, index: int) -> Image:
    """Image `index` of the study, held here; 404 when there is none, 410 when its pixels were
    released (`retention.py`)."""
    for im in study.images:
        if im.n == index:
            if im.released_at is not None:
                raise APIError(
                    410,
                    "image_released",
                    f"this image's pixels were released on {im.released_at:%Y-%m-%d}, past the "
                    "server's image retention; the PACS keeps the study: retrieve it "
                    "(POST /v1/studies/retrieve) or send it again to see and ask about it",
                )
            return im
    raise APIError(
        404,
        "image_not_found",
        f"study has {len(study.images)} image(s) (indices 0..{len(study.images) - 1}); "
        f"no image {index}",
    )


def render_key(
    sha256: str, limits: ImageLimits, frame: int | None = None, window: str | None = None
) -> tuple[str, int | None, str | None, ImageLimits]:
    """What a rendering is cached under: the file's content, frame, window and limits."""
    return (sha256, frame, window, limits)


def stored_file(store: ImageStore, sha256: str, *, checked: bool = True) -> bytes:
    """A stored file's bytes, checked against its name (its sha256) unless not `checked`: 410
    `image_missing` or `image_damaged` otherwise, which an admin mends from a backup."""
    try:
        data = store.get(sha256)
    except FileNotFoundError as e:
        log.error("stored image file %s… is missing", sha256[:12])
        raise APIError(
            410,
            "image_missing",
            "the stored image file is missing: an admin restores it from a backup "
            "(`tinyllava-med db restore`, with the server stopped)",
        ) from e
    if checked and hashlib.sha256(data).hexdigest() != sha256:  # as it is read (renderings are
        # cached), so damaged pixels reach no reader, model or SR
        log.error("stored image file %s… is damaged", sha256[:12])
        raise APIError(
            410,
            "image_damaged",
            "the stored image file is damaged: an admin restores it from a backup "
            "(`tinyllava-med db restore`, with the server stopped)",
        )
    return data


def render(
    store: ImageStore,
    sha256: str,
    settings: Settings,
    *,
    frame: int | None = None,
    window: str | None = None,
) -> PILImage.Image:
    """The image as the model (or a viewer, with `window`) sees it (cached by the store)."""
    limits = limits_of(settings)

    def make() -> PILImage.Image:
        data = stored_file(store, sha256)
        return load_study_file(data, frame=frame, window=window, limits=limits).image

    try:
        return store.rendered.get_or_make(render_key(sha256, limits, frame, window), make)
    except ImagingError as e:
        raise imaging_error(e) from e


async def render_async(
    store: ImageStore, sha256: str, settings: Settings, *, frame: int | None = None
) -> PILImage.Image:
    """`render` for the event loop: a cached image at once, a decode in the thread pool."""
    cached = store.rendered.get(render_key(sha256, limits_of(settings), frame))
    if cached is not None:
        return cached
    return await run_in_threadpool(render, store, sha256, settings, frame=frame)


def answer_fields(
    answer: Answer, info: dict[str, Any], *, actor: str, latency_ms: float
) -> dict[str, Any]:
    """What a report records about the answer and the model that gave it."""
    return {
        "answer": answer.text,
        "model": str(info.get("model")),
        "variant": info.get("variant"),
        "quantization": str(info.get("quantization")),
        "model_version": info.get("model_version"),
        "model_weights": info.get("model_weights"),
        "latency_ms": latency_ms,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.new_tokens,
        "created_by": actor,
        "finish_reason": answer.finish_reason,
    }


def save_report(
    session: Session,
    *,
    study: Study,
    image: Image,
    question: str,
    answer: Answer,
    info: dict[str, Any],
    actor: str,
    latency_ms: float,
) -> Report:
    fields = answer_fields(answer, info, actor=actor, latency_ms=latency_ms)
    return crud.create_report(session, study=study, image=image, question=question, **fields)


def image_public(study_id: str, im: Image) -> ImagePublic:
    return ImagePublic(
        index=im.n,
        kind=im.kind,
        sha256=im.sha256,
        Modality=im.Modality,
        SOPInstanceUID=im.SOPInstanceUID,
        SeriesInstanceUID=im.SeriesInstanceUID,
        rows=im.rows,
        columns=im.columns,
        n_frames=im.n_frames,
        metadata=im.safe_metadata or {},
        url=f"/v1/studies/{study_id}/images/{im.n}",
        released_at=im.released_at,
    )


def study_public(study: Study, reports: crud.ReportCounts | None = None) -> StudyPublic:
    counts = reports or crud.ReportCounts()
    return StudyPublic(
        id=study.id,
        created_at=study.created_at,
        StudyInstanceUID=study.StudyInstanceUID,
        AccessionNumber=study.AccessionNumber,
        Modality=study.Modality,
        BodyPartExamined=study.BodyPartExamined,
        StudyDate=study.StudyDate.isoformat() if study.StudyDate else None,
        images=[image_public(study.id, im) for im in sorted(study.images, key=lambda i: i.n)],
        reports=counts.total,
        drafts=counts.drafts,
        report_status=counts.state,
    )


def report_public(
    r: Report, image_index: int | None = None, signer_name: str | None = None
) -> ReportPublic:
    """`image_index` for a detached report (`crud.draft_report_row`), else read from `r`;
    `signer_name`: the signing key's name (`crud.key_names`)."""
    if image_index is None and r.image is not None:
        image_index = r.image.n
    return ReportPublic(
        id=r.id,
        study_id=r.study_id,
        image_index=image_index,
        question=r.question,
        answer=r.answer,
        text=r.text,
        status=r.status,
        model=r.model,
        variant=r.variant,
        quantization=r.quantization,
        model_version=r.model_version,
        model_weights=r.model_weights,
        server_version=r.server_version,
        latency_ms=r.latency_ms or 0.0,
        tokens=Tokens(prompt=r.prompt_tokens or 0, completion=r.completion_tokens or 0),
        finish_reason=r.finish_reason,
        version=crud.report_version(r),
        frame=r.frame,
        created_at=r.created_at,
        updated_at=r.updated_at,
        signed_by=r.signed_by,
        signed_by_name=signer_name,
        signed_at=r.signed_at,
    )
