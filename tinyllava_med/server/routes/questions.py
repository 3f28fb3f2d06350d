"""Questions: `POST /v1/studies/{id}/questions` (JSON or SSE stream), one-shot `POST /v1/ask`,
and `POST /v1/studies/{id}/images/{n}/prepare` (the image's prompt computed ahead of them).

The queue is checked before any image is decoded, so an overloaded server answers 503 with
`Retry-After` cheaply. A streamed answer is stored as a report when it completes; a client that
disconnects cancels its request in the engine and nothing is stored.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractContextManager, aclosing, nullcontext
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from PIL import Image as PILImage
from sqlalchemy.exc import IntegrityError

from tinyllava_med.model.generate import Answer, SamplingParams
from tinyllava_med.model.prompts import control_in
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Report
from tinyllava_med.server.deps import Asker, EngineDep, SessionDep, SettingsDep, StoreDep
from tinyllava_med.server.engine import (
    Arrival,
    BatchingEngine,
    EngineBusy,
    EngineFailed,
    EngineNotReady,
)
from tinyllava_med.server.errors import APIError, stream_error
from tinyllava_med.server.ingest import file_upload
from tinyllava_med.server.schemas import AskResponse, Prepared, QuestionCreate, ReportPublic
from tinyllava_med.server.serving import (
    Upload,
    answer_fields,
    image_of,
    load_audited,
    render,
    render_async,
    report_public,
    stored_image_key,
    study_public,
)
from tinyllava_med.server.settings import Settings

router = APIRouter(tags=["questions"])


def model_not_ready(message: str = "the model is loading or unavailable; retry later") -> APIError:
    return APIError(503, "model_not_ready", message, headers={"Retry-After": "5"})


def check_ready(engine: BatchingEngine) -> None:
    """503 when the model is not loaded (loading, failed, shutting down)."""
    if not engine.ready:
        raise model_not_ready()


def check_capacity(engine: BatchingEngine, settings: Settings, request: Request) -> None:
    """503 before any work when the model is not ready or the queue is full."""
    check_ready(engine)
    if engine.is_full():
        request.app.state.metrics.rejected.labels("queue_full").inc()
        raise APIError(
            503,
            "queue_full",
            f"the server is busy ({settings.max_queue} requests waiting); retry later",
            headers={"Retry-After": "2"},
        )


def arrival_of(request: Request, engine: BatchingEngine) -> AbstractContextManager[Arrival]:
    """This request's announcement to the engine (made by the app's `AnnounceQuestions` as it
    arrived), or a new one."""
    arrival = getattr(request.state, "arrival", None)
    return nullcontext(arrival) if arrival is not None else engine.arriving()


def sampling(body: QuestionCreate, settings: Settings) -> SamplingParams:
    if (found := control_in(body.question)) is not None:  # as `schemas.PlainText` refuses
        raise APIError(
            422,
            "invalid_request",
            f"the question holds a control character ({found}); only tab and line breaks "
            "may be used",
        )
    if not body.question.strip():  # a report (and its SR) would answer no question
        raise APIError(422, "invalid_request", "the question is blank")
    if len(body.question) > settings.max_question_chars:
        raise APIError(
            422,
            "question_too_long",
            f"the question has {len(body.question)} characters; the limit is "
            f"{settings.max_question_chars}",
        )
    n = body.max_new_tokens or settings.default_max_new_tokens
    if n > settings.max_new_tokens:
        raise APIError(
            422,
            "max_new_tokens_too_large",
            f"max_new_tokens is {n}; the limit is {settings.max_new_tokens}",
        )
    return SamplingParams(max_new_tokens=n, temperature=body.temperature, top_p=body.top_p)


async def answer(
    engine: BatchingEngine,
    settings: Settings,
    image: PILImage.Image,
    question: str,
    params: SamplingParams,
    on_token: Any = None,
    history: list[tuple[str, str]] | None = None,
    arrival: Arrival | None = None,
    image_key: Any = None,
) -> Answer:
    """`image_key` names the image's content (the stored file's sha256 and frame) for the
    engine's pixel cache; None for an image that is not stored."""
    try:
        return await asyncio.wait_for(
            engine.generate(image, question, params, on_token, history or (), arrival, image_key),
            settings.request_timeout_s,
        )
    except EngineBusy as e:
        raise APIError(503, "queue_full", str(e), headers={"Retry-After": "2"}) from e
    except EngineNotReady as e:
        raise model_not_ready(str(e)) from e
    except EngineFailed as e:
        raise APIError(502, "engine_failed", str(e)) from e
    except TimeoutError as e:
        raise APIError(
            504, "timeout", f"no answer within {settings.request_timeout_s:.0f} s"
        ) from e


async def stream_answer(
    engine: BatchingEngine,
    settings: Settings,
    image: PILImage.Image,
    question: str,
    params: SamplingParams,
    history: list[tuple[str, str]] | None = None,
    arrival: Arrival | None = None,
    image_key: Any = None,
) -> AsyncGenerator[str | Answer, None]:
    """The answer's text deltas as they are generated, then the `Answer`. Errors are
    `APIError`s; closing the iterator (the client went away) cancels the request."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(
        answer(
            engine,
            settings,
            image,
            question,
            params,
            lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta),
            history,
            arrival,
            image_key,
        )
    )
    try:
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
        yield task.result()
    finally:
        if not task.done():  # the consumer went away: cancel the request in the engine
            task.cancel()


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def _store_answer(
    request: Request,
    *,
    study_id: str,
    image_id: str,
    image_index: int,
    question: str,
    ans: Answer,
    info: dict[str, Any],
    actor: str,
    latency_ms: float,
    stream: bool = False,
    mark_reported: bool = True,
    frame: int | None = None,
) -> ReportPublic:
    """Save the answer as a report, with its audit event, in one transaction shared with the
    answers that finished with it (`ReportWriter`: plain Core INSERTs, no ORM session).
    `mark_reported`: the study was not `reported` when the question came (received, or signed:
    a new draft awaits a signature again); if it was, its status is left alone (no UPDATE)."""
    row = crud.draft_report_row(
        study_id=study_id,
        image_id=image_id,
        frame=frame,
        question=question,
        **answer_fields(ans, info, actor=actor, latency_ms=latency_ms),
    )
    event = crud.audit_row(
        actor=actor,
        action="question.ask",
        resource_type="study",
        resource_id=study_id,
        outcome="ok",
        status_code=201,
        detail={"report_id": row["id"], **({"stream": True} if stream else {})},
    )
    try:
        await request.app.state.report_writer.write(row, event, mark_reported=mark_reported)
    except IntegrityError as e:  # the study (or image) was deleted while the model answered
        raise APIError(404, "study_not_found", "the study was deleted while answering") from e
    return report_public(Report(**row), image_index)


@router.post("/v1/studies/{study_id}/questions", status_code=201, response_model=ReportPublic)
async def ask_about_study(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    engine: EngineDep,
    study_id: str,
    body: QuestionCreate,
    principal: Asker,
    stream: Annotated[bool, Query(description="stream tokens as server-sent events")] = False,
) -> Any:
    """No database connection is held while the model works: the study is read in one short
    transaction and the report written in another."""
    request.state.audit = (principal.actor, "question.ask", "study", study_id)
    params = sampling(body, settings)
    check_capacity(engine, settings, request)
    with arrival_of(request, engine) as arrival:  # batches forming meanwhile wait for it
        with request.app.state.db_engine.connect() as conn:
            found = crud.image_ref(conn, study_id, body.image_index)
        if found is None:  # say which: no such study, or no such image in it
            with request.app.state.session_factory() as s:
                study = crud.get_study(s, study_id)
                if study is None:
                    raise APIError(404, "study_not_found", "no study with this id")
                image_of(study, body.image_index)
        assert found is not None
        image_id, sha256, status = found
        store.touch(sha256)  # in use: the image retention leaves the study until its draft is in
        pil = await render_async(store, sha256, settings, frame=body.frame)
        image_key = stored_image_key(sha256, body.frame)
        info = engine.lm.info if engine.lm is not None else {}
        question, start = body.question, time.perf_counter()

        async def save(ans: Answer) -> ReportPublic:
            return await _store_answer(
                request,
                study_id=study_id,
                image_id=image_id,
                image_index=body.image_index,
                question=question,
                ans=ans,
                info=info,
                actor=principal.actor,
                latency_ms=(time.perf_counter() - start) * 1000,
                stream=stream,
                mark_reported=status != "reported",
                frame=body.frame,
            )

        if not stream:
            return await save(
                await answer(
                    engine, settings, pil, question, params, arrival=arrival, image_key=image_key
                )
            )

    async def events() -> AsyncIterator[bytes]:
        ans: Answer | None = None
        try:
            items_ = stream_answer(
                engine, settings, pil, question, params, arrival=arrival, image_key=image_key
            )
            async with aclosing(items_) as items:
                async for item in items:
                    if isinstance(item, str):
                        yield _sse("token", {"text": item})
                    else:
                        ans = item
            assert ans is not None
            report = await save(ans)
        except Exception as e:  # the status went out: the error goes in the stream, audited
            yield _sse("error", await stream_error(request, e))
            return
        yield _sse("report", report.model_dump(mode="json"))

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        status_code=200,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/v1/studies/{study_id}/images/{index}/prepare",
    status_code=202,
    response_model=Prepared,
    responses={200: {"model": Prepared, "description": "not needed for this model"}},
)
def prepare_for_questions(
    request: Request,
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    engine: EngineDep,
    study_id: str,
    index: int,
    principal: Asker,
    frame: Annotated[int | None, Query(ge=0)] = None,
) -> Prepared:
    """Say that questions about this image (and frame) are coming, as a viewer does when the
    reader opens it: the model computes the image's part of the prompt while idle, and the first
    answer then takes as long as a follow-up's (on a CPU, without the vision tower and most of
    the prefill). Best effort: a question that comes first is answered first, and only the
    latest image asked for is prepared."""
    check_ready(engine)
    study = load_audited(
        request, session, "study", study_id, actor=principal.actor, action="image.prepare"
    )
    image = image_of(study, index)
    if frame is not None and frame >= image.n_frames:  # as a question about it would say
        raise APIError(
            422, "bad_frame", f"expected a frame index in 0..{image.n_frames - 1}; got {frame}"
        )
    status: Literal["queued", "not_needed"] = "not_needed"
    if engine.prefills:
        key = stored_image_key(image.sha256, frame)
        try:
            engine.prefill(render(store, image.sha256, settings, frame=frame), key)
        except EngineNotReady as e:  # shutting down since `check_ready`
            raise model_not_ready(str(e)) from e
        status = "queued"
    else:
        response.status_code = 200
    crud.audit(
        session,
        actor=principal.actor,
        action="image.prepare",
        resource_type="study",
        resource_id=study.id,
        outcome="ok",
        status_code=response.status_code or 202,
        detail={"image": index, "frame": frame, "status": status},
    )
    return Prepared(status=status)


@router.post("/v1/ask", status_code=201, response_model=AskResponse)
async def ask_one_shot(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    engine: EngineDep,
    principal: Asker,
    file: Annotated[UploadFile, File(description="DICOM Part 10, PNG or JPEG")],
    question: Annotated[str, Form(min_length=1)],
    max_new_tokens: Annotated[int | None, Form(ge=1)] = None,
) -> AskResponse:
    """Upload one file and ask one question: stores the study and the report."""
    request.state.audit = (principal.actor, "question.ask", "study", None)
    if len((await request.form()).getlist("file")) > 1:  # parsed once: FastAPI's own form
        raise APIError(
            422,
            "invalid_request",
            "expected one file; for a study of several, upload it (POST /v1/studies) and ask "
            "about each image (POST /v1/studies/{id}/questions with image_index)",
        )
    params = sampling(QuestionCreate(question=question, max_new_tokens=max_new_tokens), settings)
    check_capacity(engine, settings, request)
    upload = Upload(file.filename or "file", await file.read())

    def store_study() -> tuple[str, str, int, str]:  # in the thread pool: decoding is slow
        with request.app.state.session_factory.begin() as s:
            filed = file_upload(s, store, settings, [upload], actor=principal.actor)
            image = filed.images[0]  # new, or the instance held already in its study
            return filed.study.id, image.id, image.n, image.sha256

    study_id, image_id, image_index, sha256 = await run_in_threadpool(store_study)
    # the study is stored now: a failure from here on names it, so the client asks again about
    # it (POST /v1/studies/{id}/questions) instead of uploading the file again
    request.state.audit = (principal.actor, "question.ask", "study", study_id)
    pil = await render_async(store, sha256, settings)
    start = time.perf_counter()
    try:
        ans = await answer(
            engine,
            settings,
            pil,
            question,
            params,
            arrival=getattr(request.state, "arrival", None),
            image_key=stored_image_key(sha256),
        )
    except APIError as e:
        e.detail = {**(e.detail or {}), "study_id": study_id}
        e.message += f"; the study was stored: ask again with POST /v1/studies/{study_id}/questions"
        raise
    report = await _store_answer(
        request,
        study_id=study_id,
        image_id=image_id,
        image_index=image_index,
        question=question,
        ans=ans,
        info=engine.lm.info if engine.lm else {},
        actor=principal.actor,
        latency_ms=(time.perf_counter() - start) * 1000,
    )

    def answered() -> AskResponse:  # in the thread pool: 1 ms of reads the event loop need not wait
        with request.app.state.session_factory() as s:
            stored = crud.get_study(s, study_id)
            assert stored is not None  # a study held already may have earlier reports
            counts = crud.report_counts(s, [study_id])[study_id]
            return AskResponse(study=study_public(stored, counts), report=report)

    return await run_in_threadpool(answered)
