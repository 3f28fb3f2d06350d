"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`, so any OpenAI client (and
another gateway's remote engine) can ask the served model. Same keys (`Authorization: Bearer`),
limits, queue, audit and error shape as the rest of the API; nothing is stored as a report (there
is no study), each call is audited as `chat.completion`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tinyllava_med.model.generate import Answer
from tinyllava_med.server.db import crud
from tinyllava_med.server.deps import Asker, EngineDep, SettingsDep
from tinyllava_med.server.errors import APIError, stream_error
from tinyllava_med.server.openai_compat import (
    ChatRequest,
    chunk_body,
    completion_body,
    completion_id,
    conversation_of,
    decode_data_uri,
    fingerprint,
    model_card,
    refuse_unsupported,
    usage,
)
from tinyllava_med.server.routes.questions import answer, check_capacity, sampling, stream_answer
from tinyllava_med.server.schemas import QuestionCreate
from tinyllava_med.server.serving import Upload, decode_upload, unstored_image_key
from tinyllava_med.server.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])


def _allowed_host(url: str, hosts: list[str]) -> bool:
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is no number
        return False
    allowed = {h.lower() for h in hosts}
    return "*" in allowed or host in allowed or (port is not None and f"{host}:{port}" in allowed)


async def image_bytes(url: str, settings: Settings) -> bytes:
    if url.startswith("data:"):
        return decode_data_uri(url)
    if not url.startswith(("http://", "https://")):
        raise APIError(
            400, "bad_image_url", "image_url must be a data: URI (or http(s) if allowed)"
        )
    if not settings.allow_remote_image_urls:
        raise APIError(
            400,
            "remote_image_refused",
            "image URLs are refused by this server's settings; send a data: URI",
        )
    if not _allowed_host(url, settings.remote_image_hosts):  # no fetching of just any address
        raise APIError(
            400,
            "remote_image_refused",
            "this image URL's host is not one of the server's remote_image_hosts; send a data: URI",
        )
    limit = settings.max_upload_bytes
    try:
        async with (
            httpx.AsyncClient(timeout=10, follow_redirects=False) as client,
            client.stream("GET", url) as r,
        ):
            if r.status_code != 200:
                raise APIError(400, "image_fetch_failed", f"the image URL answered {r.status_code}")
            data = bytearray()
            async for chunk in r.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise APIError(413, "payload_too_large", f"the image exceeds {limit} bytes")
            return bytes(data)
    except httpx.HTTPError as e:
        raise APIError(400, "image_fetch_failed", f"fetching the image failed: {e}") from e


def served_model(engine: Any) -> dict[str, Any]:
    return engine.lm.info if engine.lm is not None else {}


@router.get("/models")
def list_models(engine: EngineDep, principal: Asker) -> dict[str, Any]:
    info = served_model(engine)
    return {"object": "list", "data": [model_card(info)] if info else []}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request,
    body: ChatRequest,
    engine: EngineDep,
    settings: SettingsDep,
    principal: Asker,
) -> Any:
    request.state.audit = (principal.actor, "chat.completion", "chat", None)
    refuse_unsupported(body)
    check_capacity(engine, settings, request)
    info = served_model(engine)
    if body.model not in {info.get("model"), info.get("variant")}:
        raise APIError(
            404,
            "model_not_found",
            f"this server serves {info.get('model')!r} (GET /v1/models)",
        )
    conv = conversation_of(body.messages, settings.max_conversation_chars)
    params = sampling(
        QuestionCreate(
            question=conv.question,
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature or 0.0,
            top_p=body.top_p or 1.0,
        ),
        settings,
    )
    data = await image_bytes(conv.image_url, settings)

    def decode() -> tuple[Any, tuple[str, str]]:  # in the thread pool: decoding is slow
        return decode_upload(Upload("image_url", data), settings), unstored_image_key(data)

    decoded, image_key = await run_in_threadpool(decode)
    cid, model, fp = completion_id(), str(info.get("model")), fingerprint(info)

    def audited(ans: Answer) -> None:
        with request.app.state.session_factory.begin() as s:
            crud.audit(
                s,
                actor=principal.actor,
                action="chat.completion",
                resource_type="chat",
                resource_id=cid,
                outcome="ok",
                status_code=200,
                detail={
                    "stream": body.stream,
                    "tokens": ans.new_tokens,
                    "turns": len(conv.history) + 1,
                },
            )

    if not body.stream:
        ans = await answer(
            engine,
            settings,
            decoded.image,
            conv.question,
            params,
            history=conv.history,
            arrival=getattr(request.state, "arrival", None),
            image_key=image_key,
        )
        await run_in_threadpool(audited, ans)  # never a database write on the loop
        return completion_body(
            cid, model, ans.text, ans.finish_reason, ans.prompt_tokens, ans.new_tokens, fp
        )

    def sse(data: Any) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    async def events() -> AsyncIterator[bytes]:
        yield sse(
            chunk_body(cid, model, {"role": "assistant", "content": ""}, system_fingerprint=fp)
        )
        ans: Answer | None = None
        try:
            stream = stream_answer(
                engine,
                settings,
                decoded.image,
                conv.question,
                params,
                conv.history,
                getattr(request.state, "arrival", None),
                image_key,
            )
            async with aclosing(stream) as items:
                async for item in items:
                    if isinstance(item, str):
                        yield sse(chunk_body(cid, model, {"content": item}, system_fingerprint=fp))
                    else:
                        ans = item
            assert ans is not None
            await run_in_threadpool(audited, ans)  # never a database write on the loop
        except Exception as e:  # the status went out: the error goes in the stream, audited
            yield sse(await stream_error(request, e))
            return
        yield sse(chunk_body(cid, model, {}, ans.finish_reason, system_fingerprint=fp))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse(
                chunk_body(
                    cid,
                    model,
                    {},
                    None,
                    usage(ans.prompt_tokens, ans.new_tokens),
                    system_fingerprint=fp,
                )
            )
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
