"""Questions: `POST /v1/studies/{id}/questions` (JSON or SSE stream) and one-shot `POST /v1/ask`.

The queue is checked before any image is decoded, so an overloaded server answers 503 with
`Retry-After` cheaply. A streamed answer is stored as a report when it completes; a client that
disconnects cancels its request in the engine and nothing is stored.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from PIL import Image as PILImage

from tinyllava_med.model.generate import Answer, SamplingParams
from tinyllava_med.server.db import crud
from tinyllava_med.server.deps import Asker, EngineDep, SessionDep, SettingsDep, StoreDep
from tinyllava_med.server.engine import BatchingEngine, EngineBusy, EngineNotReady
from tinyllava_med.server.errors import APIError, error_body
from tinyllava_med.server.schemas import AskResponse, QuestionCreate, ReportPublic
from tinyllava_med.server.serving import (
    Upload,
    image_of,
    ingest,
    render,
    report_public,
    save_report,
    study_public,
)
from tinyllava_med.server.settings import Settings

router = APIRouter(tags=["questions"])


def check_capacity(engine: BatchingEngine, settings: Settings, request: Request) -> None:
    """503 before any work when the model is not ready or the queue is full."""
    if not engine.ready:
        raise APIError(
            503,
            "model_not_ready",
            "the model is loading or unavailable; retry later",
            headers={"Retry-After": "5"},
        )
    if engine.is_full():
        request.app.state.metrics.rejected.labels("queue_full").inc()
        raise APIError(
            503,
            "queue_full",
            f"the server is busy ({settings.max_queue} requests waiting); retry later",
            headers={"Retry-After": "2"},
        )


def sampling(body: QuestionCreate, settings: Settings) -> SamplingParams:
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
) -> Answer:
    try:
        return await asyncio.wait_for(
            engine.generate(image, question, params, on_token), settings.request_timeout_s
        )
    except EngineBusy as e:
        raise APIError(503, "queue_full", str(e), headers={"Retry-After": "2"}) from e
    except EngineNotReady as e:
        raise APIError(503, "model_not_ready", str(e), headers={"Retry-After": "5"}) from e
    except TimeoutError as e:
        raise APIError(
            504, "timeout", f"no answer within {settings.request_timeout_s:.0f} s"
        ) from e


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


@router.post("/v1/studies/{study_id}/questions", status_code=201, response_model=ReportPublic)
async def ask_about_study(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    engine: EngineDep,
    study_id: str,
    body: QuestionCreate,
    principal: Asker,
    stream: Annotated[bool, Query(description="stream tokens as server-sent events")] = False,
) -> Any:
    request.state.audit = (principal.actor, "question.ask", "study", study_id)
    params = sampling(body, settings)
    check_capacity(engine, settings, request)
    study = crud.get_study(session, study_id)
    if study is None:
        raise APIError(404, "study_not_found", "no study with this id")
    image = image_of(study, body.image_index)
    pil = await run_in_threadpool(render, store, image, settings, frame=body.frame)
    info = engine.lm.info if engine.lm is not None else {}
    start = time.perf_counter()
    if not stream:
        ans = await answer(engine, settings, pil, body.question, params)
        report = save_report(
            session,
            study=study,
            image=image,
            question=body.question,
            answer=ans,
            info=info,
            actor=principal.actor,
            latency_ms=(time.perf_counter() - start) * 1000,
        )
        crud.audit(
            session,
            actor=principal.actor,
            action="question.ask",
            resource_type="study",
            resource_id=study.id,
            outcome="ok",
            status_code=201,
            detail={"report_id": report.id},
        )
        session.flush()
        return report_public(report)

    image_id, question = image.id, body.question
    factory = request.app.state.session_factory

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(
            answer(
                engine,
                settings,
                pil,
                question,
                params,
                lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta),
            )
        )
        try:
            while not task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield _sse("token", {"text": getter.result()})
                else:
                    getter.cancel()
            try:
                ans = task.result()
            except APIError as e:
                yield _sse("error", error_body(e.code, e.message, e.detail))
                return
            latency = (time.perf_counter() - start) * 1000
            with factory.begin() as s:
                st = crud.get_study(s, study_id)
                assert st is not None  # it existed a moment ago and studies are never deleted
                img = next(i for i in st.images if i.id == image_id)
                report = save_report(
                    s,
                    study=st,
                    image=img,
                    question=question,
                    answer=ans,
                    info=info,
                    actor=principal.actor,
                    latency_ms=latency,
                )
                crud.audit(
                    s,
                    actor=principal.actor,
                    action="question.ask",
                    resource_type="study",
                    resource_id=study_id,
                    outcome="ok",
                    status_code=201,
                    detail={"report_id": report.id, "stream": True},
                )
                s.flush()
                public = report_public(report).model_dump(mode="json")
            yield _sse("report", public)
        finally:
            if not task.done():  # the client went away: cancel the request in the engine
                task.cancel()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        status_code=200,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/ask", status_code=201, response_model=AskResponse)
async def ask_one_shot(
    request: Request,
    session: SessionDep,
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
    params = sampling(QuestionCreate(question=question, max_new_tokens=max_new_tokens), settings)
    check_capacity(engine, settings, request)
    upload = Upload(file.filename or "file", await file.read())
    study = ingest(session, store, settings, [upload])
    image = study.images[0]
    pil = await run_in_threadpool(render, store, image, settings)
    start = time.perf_counter()
    ans = await answer(engine, settings, pil, question, params)
    report = save_report(
        session,
        study=study,
        image=image,
        question=question,
        answer=ans,
        info=engine.lm.info if engine.lm else {},
        actor=principal.actor,
        latency_ms=(time.perf_counter() - start) * 1000,
    )
    crud.audit(
        session,
        actor=principal.actor,
        action="question.ask",
        resource_type="study",
        resource_id=study.id,
        outcome="ok",
        status_code=201,
        detail={"report_id": report.id},
    )
    session.flush()
    session.refresh(study)
    return AskResponse(study=study_public(study, 1), report=report_public(report))
