"""The Gradio demo at `/demo` (`tinyllava-med serve --gradio`): one image, one question, the
answer streamed in, much like LLaVA-Med's Gradio demo. This module owns the Blocks page, its
one handler (`ask_stream`) and `mount_demo(app)`, which mounts it on the server's FastAPI app.

    tinyllava-med serve --gradio          # or TINYLLAVA_MED_GRADIO=true; then open /demo

Answers come from the same batching engine as the REST API (`app.state.engine`), with the same
limits, capacity check and error messages; a file is decoded as `POST /v1/ask` decodes it, so
the same image and question give the same answer (greedy by default).

Because the page sits next to a hospital's REST API, it is not a way around it:

- it is off unless `--gradio` / `TINYLLAVA_MED_GRADIO=true`, and this module (and Gradio) is
  imported only then;
- every question needs an API key whose role grants `question.ask`, typed into a password box
  and checked on each question with `auth.verify_api_key` (a revoked key stops at once);
  `TINYLLAVA_MED_AUTH_DISABLED` lifts the check here as it does for the REST API;
- it stores no study and no report; each question is written to the audit log as `demo.ask`
  (who, which model, outcome, tokens, latency; never the question, the answer, the file name or
  any DICOM attribute), denials with the `anonymous` actor as the REST API records them;
- uploads and previews live only in Gradio's temporary cache (`GRADIO_TEMP_DIR`, default
  `/tmp/gradio`), removed after `CACHE_MAX_AGE_S` and wiped on restart; Gradio's browser-side
  run history and analytics are off, and the theme uses system fonts, so the page asks nothing
  of any other server.

Gradio's own upload route takes the file as it is chosen, before any question, and Gradio's
browser client sends no key with it. So the page keeps the key typed into its box in a cookie
(`KEY_COOKIE`: the page's path only, same-site, gone when the browser closes), and the upload
route checks it as the REST API checks keys (`auth.authenticate`: refusals audited, at most 20 a
minute per address; a `gradio_client` sends `Authorization: Bearer` instead): a file from
anyone without a key is refused unread (401). Gradio's other ways in for a file are closed:
the recording and component routes, which the demo does not use (404), a call whose body is
not a small JSON object, and a call naming a file by URL or by a path outside its upload
folder, which Gradio would download or copy into its cache before any handler saw the key
(422). The cookie follows the key box, also as the page loads (a reloaded page's box is
empty). A key's uploads are budgeted too (`UploadBudget`): an address may upload
`UPLOAD_BUDGET_FILES` files' worth (`max_upload_bytes` each) per `CACHE_MAX_AGE_S` (429 beyond,
refused unread), so no one fills the data volume.
To offer more loaded models, return them from `loaded_models`: the dropdown lists them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image as PILImage
from pydantic import ValidationError
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinyllava_med.model.generate import SamplingParams
from tinyllava_med.server.auth import ANONYMOUS, Principal, authenticate, verify_api_key
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Outcome
from tinyllava_med.server.engine import BatchingEngine, EngineNotReady
from tinyllava_med.server.errors import APIError, error_body
from tinyllava_med.server.routes.questions import check_capacity, sampling, stream_answer
from tinyllava_med.server.schemas import QuestionCreate
from tinyllava_med.server.serving import Upload, decode_upload, unstored_image_key
from tinyllava_med.server.settings import Settings

log = logging.getLogger(__name__)

DEMO_PATH = "/demo"
PERMISSION = "question.ask"
AUDIT_ACTION = "demo.ask"
PREPARE_ACTION = "demo.prepare"
CACHE_MAX_AGE_S = 1800  # uploads and previews leave Gradio's cache after 30 minutes
CACHE_SWEEP_S = 600
UPLOAD_BUDGET_FILES = 8  # per address and CACHE_MAX_AGE_S, of max_upload_bytes each
KEY_COOKIE = "tlm_demo_key"
# The cookie's path: the page's own folder (`/demo/`, or under a proxy's prefix).
_COOKIE_PATH_JS = "(location.pathname.endsWith('/') ? location.pathname : location.pathname + '/')"
# Runs in the page as it loads and as the key box changes: the cookie the upload route reads
# holds what the box holds, so a reloaded page (its box empty) forgets the key, and a key typed
# before the load event ran is kept. It also expires the cookie an earlier version set for the
# page's path without its slash.
KEY_COOKIE_JS = (
    "(key) => { const k = (key || '').trim(); const dir = " + _COOKIE_PATH_JS + ";"
    f" document.cookie = '{KEY_COOKIE}=; path=' + dir.slice(0, -1) + '; max-age=0';"
    f" document.cookie = '{KEY_COOKIE}=' + encodeURIComponent(k) + '; path=' + dir"
    " + '; samesite=strict' + (location.protocol === 'https:' ? '; secure' : '')"
    " + (k ? '' : '; max-age=0'); }"
)
# Gradio routes the demo does not use that take files without a key: refused.
UNUSED_FILE_ROUTES = ("/gradio_api/process_recording", "/gradio_api/component_server")
MAX_CALL_BODY = 1 << 20  # a question's JSON: the file goes by upload, never in the body

INTRO = """\
# TinyLLaVA-Med demo
Upload a DICOM (`.dcm`, or a DICOM file with no extension), PNG or JPEG image, ask a question,
and read the answer as it is generated. **Not for clinical use.**

Each question needs an API key with the `question.ask` permission (any `pacs`, `radiologist` or
`admin` key). The demo stores no study and no report; each question is recorded in the audit
log (who, when, which model; not the question, the answer or the image). Uploads stay in the
server's temporary cache for at most 30 minutes. For stored reports use the web client at `/`.
"""


class DemoError(Exception):
    """A question the demo answers with a message instead of an answer."""

    def __init__(self, code: str, message: str, *, outcome: Outcome, status_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.outcome: Outcome = outcome
        self.status_code = status_code


# --- models ------------------------------------------------------------------------------------


def model_label(info: dict[str, Any]) -> str:
    return f"{info['model']} ({info['variant']}, {info['quantization']})"


def loaded_models(app: FastAPI) -> dict[str, BatchingEngine]:
    """The models that can answer now, by their dropdown label. Today the server holds one
    engine; an app with several would list each of them here."""
    engines: list[BatchingEngine] = [app.state.engine] if hasattr(app.state, "engine") else []
    return {model_label(e.lm.info): e for e in engines if e.ready and e.lm is not None}


def _pick_engine(app: FastAPI, label: str | None) -> BatchingEngine:
    models = loaded_models(app)
    if not models:
        raise DemoError(
            "model_not_ready",
            "The model is loading or unavailable; try again in a moment.",
            outcome="error",
            status_code=503,
        )
    if not label and len(models) == 1:
        return next(iter(models.values()))
    if label not in models:
        raise DemoError(
            "model_not_loaded",
            f"The model {label!r} is not loaded; loaded: {', '.join(models)}. Reload the page.",
            outcome="invalid",
            status_code=422,
        )
    return models[label]


# --- auth and audit ----------------------------------------------------------------------------


def _authorize(app: FastAPI, api_key: str) -> Principal:
    """The key's principal if it may ask questions; denials are audited. Runs in a thread."""
    settings: Settings = app.state.settings
    if settings.auth_disabled:
        return Principal(key_id=ANONYMOUS, role="admin", name="authentication disabled")
    key = api_key.strip()
    principal = None
    if key:
        with app.state.session_factory.begin() as session:
            row = verify_api_key(session, key)
            if row is not None:
                principal = Principal(key_id=row.id, role=row.role, name=row.name)
    if principal is None:
        reason = "invalid" if key else "missing"
        _audit(app, actor=ANONYMOUS, outcome="denied", status_code=401, detail={"reason": reason})
        raise DemoError(
            "unauthorized",
            f"{reason.capitalize()} API key: enter a key with the {PERMISSION!r} permission "
            "(tinyllava-med apikey create --role pacs).",
            outcome="denied",
            status_code=401,
        )
    if not principal.can(PERMISSION):
        _audit(
            app,
            actor=principal.actor,
            outcome="denied",
            status_code=403,
            detail={"role": principal.role, "needed": PERMISSION},
        )
        raise DemoError(
            "forbidden",
            f"This key's role {principal.role!r} does not grant {PERMISSION!r}.",
            outcome="denied",
            status_code=403,
        )
    return principal


def _audit(
    app: FastAPI,
    *,
    actor: str,
    outcome: Outcome,
    status_code: int,
    detail: dict[str, Any],
    action: str = AUDIT_ACTION,
) -> None:
    with app.state.session_factory.begin() as session:
        crud.audit(
            session,
            actor=actor,
            action=action,
            resource_type="demo",
            resource_id=None,
            outcome=outcome,
            status_code=status_code,
            detail=detail,
        )


# --- the handler -------------------------------------------------------------------------------


def _read_upload(path: str | None) -> bytes:
    if not path:
        raise DemoError("no_file", "Upload an image first.", outcome="invalid", status_code=422)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise DemoError(
            "upload_expired",
            "The uploaded file has left the temporary cache; upload it again.",
            outcome="invalid",
            status_code=410,
        ) from e


def _params(
    settings: Settings, question: str, max_new_tokens: Any, temperature: Any, top_p: Any
) -> tuple[str, SamplingParams]:
    if not (question or "").strip():
        raise DemoError("no_question", "Type a question.", outcome="invalid", status_code=422)
    try:
        body = QuestionCreate(
            question=question,
            max_new_tokens=int(max_new_tokens) if max_new_tokens else None,
            temperature=float(temperature or 0.0),
            top_p=float(top_p if top_p is not None else 1.0),
        )
    except (ValidationError, ValueError, TypeError) as e:
        msg = (
            "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            if isinstance(e, ValidationError)
            else str(e)
        )
        raise DemoError(
            "bad_parameters", f"Bad settings: {msg}", outcome="invalid", status_code=422
        ) from e
    return question, sampling(body, settings)


def _preview_file(image: PILImage.Image) -> Path:
    """The image as a PNG file of this request's own. The preview is sent twice (first and final
    update), and Gradio caches a file path by copying it into place atomically, whereas it
    rewrites a PIL image's cache file in place each time: a client still fetching the first
    copy could then read an empty file."""
    path = Path(tempfile.mkdtemp(prefix="tinyllava-med-demo-")) / "preview.png"
    image.save(path, format="PNG")
    return path


async def ask_stream(
    app: FastAPI,
    api_key: str,
    file_path: str | None,
    question: str,
    label: str | None,
    max_new_tokens: Any = None,
    temperature: Any = 0.0,
    top_p: Any = 1.0,
) -> AsyncIterator[tuple[Any, str, str]]:
    """Yield `(preview, answer so far, status)`; errors come as a status and no answer."""
    settings: Settings = app.state.settings
    principal: Principal | None = None
    detail: dict[str, Any] = {}
    finished = False
    preview: Path | None = None

    def failed(who: Principal, outcome: Outcome, status: int, code: str) -> Callable[[], None]:
        """The audit event of this question's failure, written in a worker thread: never a
        database write on the event loop (see `ReportWriter`)."""
        return partial(
            _audit,
            app,
            actor=who.actor,
            outcome=outcome,
            status_code=status,
            detail={**detail, "code": code},
        )

    try:
        principal = await run_in_threadpool(_authorize, app, api_key or "")
        question, params = _params(settings, question, max_new_tokens, temperature, top_p)
        engine = _pick_engine(app, label)
        assert engine.lm is not None
        info = engine.lm.info
        detail = {k: info[k] for k in ("model", "variant", "quantization")}
        # check_capacity reads only `request.app` (for the rejected-requests metric).
        check_capacity(engine, settings, Request({"type": "http", "app": app}))
        data = await run_in_threadpool(_read_upload, file_path)
        study_file = await run_in_threadpool(
            decode_upload, Upload(Path(file_path or "file").name, data), settings
        )
        detail["file_kind"] = study_file.kind
        image: PILImage.Image = study_file.image
        preview = await run_in_threadpool(_preview_file, image)
        yield str(preview), "", "Generating..."

        start = time.perf_counter()
        text, ans = "", None
        key = await run_in_threadpool(unstored_image_key, data)  # the same file, asked again
        stream = stream_answer(engine, settings, image, question, params, image_key=key)
        # closing the stream (the page went away) cancels the request in the engine
        async with aclosing(stream) as items:
            async for item in items:
                if isinstance(item, str):
                    text += item
                    yield gr.skip(), text, "Generating..."
                else:
                    ans = item
        assert ans is not None
        latency_ms = (time.perf_counter() - start) * 1000
        detail |= {
            "prompt_tokens": ans.prompt_tokens,
            "completion_tokens": ans.new_tokens,
            "latency_ms": round(latency_ms, 1),
        }
        await run_in_threadpool(
            _audit, app, actor=principal.actor, outcome="ok", status_code=200, detail=detail
        )
        finished = True
        yield (
            str(preview),  # again, so that an API caller's final result carries it too
            ans.text,
            f"{model_label(info)}: {ans.new_tokens} tokens in {latency_ms:.0f} ms. Not stored.",
        )
    except DemoError as e:
        finished = True
        if principal is not None:  # denials were audited by _authorize
            await run_in_threadpool(failed(principal, e.outcome, e.status_code, e.code))
        yield None, "", e.message
    except APIError as e:
        finished = True
        if principal is not None:
            outcome: Outcome = "invalid" if e.status < 500 else "error"
            await run_in_threadpool(failed(principal, outcome, e.status, e.code))
        yield None, "", e.message
    except Exception:  # never a traceback on the page; the reason goes to the log
        finished = True
        log.exception("the demo could not answer")
        if principal is not None:
            await run_in_threadpool(failed(principal, "error", 500, "internal_error"))
        yield None, "", "The server could not answer this question (the error is in its log)."
    finally:
        if preview is not None:  # Gradio has copied it into its cache by now
            shutil.rmtree(preview.parent, ignore_errors=True)
        if not finished and principal is not None:  # the page went away mid-answer
            # not awaited (the generator is closing), but in a worker thread as well
            audit = failed(principal, "error", 499, "cancelled")
            asyncio.get_running_loop().run_in_executor(None, audit)


async def prepare_upload(
    app: FastAPI, api_key: str, file_path: str | None, label: str | None
) -> None:
    """The user chose a file: while idle, the model computes its prompt up to the image
    (`BatchingEngine.prefill`), so the first answer comes as fast as a follow-up. Quiet: a
    missing key, a wrong file or a busy model changes nothing here, and asking says what is
    wrong (a wrong key is audited as a denial here too). Audited as `demo.prepare`."""
    if not file_path or not (api_key or "").strip():
        return
    try:
        principal = await run_in_threadpool(_authorize, app, api_key)
        engine = _pick_engine(app, label)
        if not engine.prefills:
            return
        data = await run_in_threadpool(_read_upload, file_path)
        upload = Upload(Path(file_path).name, data)
        study_file = await run_in_threadpool(decode_upload, upload, app.state.settings)
        key = await run_in_threadpool(unstored_image_key, data)  # as `ask_stream` names it
        await run_in_threadpool(engine.prefill, study_file.image, key)
    except (DemoError, APIError, EngineNotReady):
        return
    await run_in_threadpool(
        partial(
            _audit,
            app,
            actor=principal.actor,
            outcome="ok",
            status_code=202,
            detail={"file_kind": study_file.kind},
            action=PREPARE_ACTION,
        )
    )


# --- the page ----------------------------------------------------------------------------------


def build_demo(app: FastAPI) -> gr.Blocks:
    settings: Settings = app.state.settings

    async def ask(
        api_key: str,
        file_path: str | None,
        question: str,
        model: str | None,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
    ) -> AsyncIterator[tuple[Any, str, str]]:
        async for update in ask_stream(
            app, api_key, file_path, question, model, max_new_tokens, temperature, top_p
        ):
            yield update

    async def prepare(api_key: str, file_path: str | None, model: str | None) -> None:
        await prepare_upload(app, api_key, file_path, model)

    def list_models() -> Any:
        labels = list(loaded_models(app))
        return gr.Dropdown(choices=labels, value=labels[0] if labels else None)

    with gr.Blocks(
        title="TinyLLaVA-Med demo",
        analytics_enabled=False,
        delete_cache=(CACHE_SWEEP_S, CACHE_MAX_AGE_S),
    ) as blocks:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                api_key = gr.Textbox(
                    label="API key",
                    type="password",
                    placeholder="tlm_...",
                    info="first: a file is uploaded as it is chosen, with this key",
                )
                model = gr.Dropdown(
                    label="Model",
                    choices=[],
                    allow_custom_value=True,  # choices arrive on page load; checked on ask
                    info="the models this server has loaded",
                )
                upload = gr.File(label="Image: DICOM, PNG or JPEG", type="filepath")
                preview = gr.Image(
                    label="What the model sees", type="pil", format="png", interactive=False
                )
            with gr.Column(scale=1):
                question = gr.Textbox(
                    label="Question", lines=3, placeholder="What abnormality is seen?"
                )
                with gr.Accordion("Parameters", open=False):
                    max_new_tokens = gr.Slider(
                        1,
                        settings.max_new_tokens,
                        value=settings.default_max_new_tokens,
                        step=1,
                        label="Max new tokens",
                    )
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
                button = gr.Button("Ask", variant="primary")
                answer_box = gr.Textbox(label="Answer", lines=8, interactive=False)
                status = gr.Textbox(label="Status", lines=1, interactive=False)
        inputs = [api_key, upload, question, model, max_new_tokens, temperature, top_p]
        outputs = [preview, answer_box, status]
        button.click(ask, inputs, outputs, api_name="ask", concurrency_limit=settings.max_queue)
        question.submit(
            ask,
            inputs,
            outputs,
            api_visibility="private",
            concurrency_limit=settings.max_queue,
        )
        upload.upload(
            prepare,
            [api_key, upload, model],
            None,
            api_name="prepare",
            concurrency_limit=settings.max_queue,
        )
        api_key.change(None, api_key, None, js=KEY_COOKIE_JS)  # in the page only
        blocks.load(None, api_key, None, js=KEY_COOKIE_JS)
        blocks.load(list_models, None, model, api_visibility="private")
    return blocks


class UploadBudget:
    """Bytes each address may send to Gradio's keyless upload route per `window_s` (an IPv6
    address by its /64: one host has them all); at most `MAX_ADDRESSES` at once, so many
    addresses do not start every budget over."""

    MAX_ADDRESSES = 10_000

    def __init__(self, budget: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.budget, self.window_s, self.clock = budget, window_s, clock
        self._spent: dict[str, tuple[float, int]] = {}  # address -> (window start, bytes)
        self._lock = threading.Lock()

    def take(self, address: str, size: int) -> bool:
        """Whether `address` may send `size` more bytes now (they are counted if so)."""
        now = self.clock()
        if ":" in address:
            address = str(ipaddress.ip_network(f"{address}/64", strict=False))
        with self._lock:
            if address not in self._spent and len(self._spent) >= self.MAX_ADDRESSES:
                for old in [a for a, (t, _) in self._spent.items() if now - t >= self.window_s]:
                    del self._spent[old]
                if len(self._spent) >= self.MAX_ADDRESSES:
                    return False  # a flood from many addresses: refused until windows end
            start, spent = self._spent.get(address, (now, 0))
            if now - start >= self.window_s:
                start, spent = now, 0
            if spent + size > self.budget:
                return False
            self._spent[address] = (start, spent + size)
            return True


async def _upload_refused(scope: Scope) -> JSONResponse | None:
    """Why Gradio's upload route refuses this request (no key, a key that is not valid or may
    not ask questions), or None. The key comes as for the REST API, else from `KEY_COOKIE`."""
    request = Request(scope)
    key = request.cookies.get(KEY_COOKIE, "").strip()
    if key and "authorization" not in request.headers and "x-api-key" not in request.headers:
        headers = [*scope["headers"], (b"authorization", f"Bearer {key}".encode())]
        request = Request({**scope, "headers": headers})
    try:
        principal = await authenticate(request)
    except APIError as e:
        message = e.message
        if not key and "authorization" not in request.headers:
            message = f"enter an API key with the {PERMISSION!r} permission first, then the file"
        return JSONResponse(error_body(e.code, message), e.status, e.headers)
    if principal.can(PERMISSION):
        return None
    message = f"this key's role {principal.role!r} does not grant {PERMISSION!r}"
    return JSONResponse(error_body("forbidden", message), 403)


def _foreign_file(value: Any, uploads: Path) -> bool:
    """Whether a call's JSON names a file other than one uploaded to the demo: by URL
    (`{"path": "https://..."}`, which Gradio would download) or by a path outside its upload
    folder (which Gradio would copy into its cache: mounted, it skips its own allowed-paths
    check). Either happens before any handler sees the key."""
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str):
            if path.lower().startswith(("http://", "https://")):
                return True
            if not Path(path).resolve().is_relative_to(uploads):
                return True
        return any(_foreign_file(v, uploads) for v in value.values())
    if isinstance(value, list):
        return any(_foreign_file(v, uploads) for v in value)
    return False


async def _call_refused(scope: Scope, receive: Receive) -> tuple[JSONResponse | None, Receive]:
    """Why a POST to Gradio's API other than the upload is refused (a file route the demo does
    not use, a body that is not a small JSON object, a file named by URL or by a path outside
    the upload folder), or None; and the `receive` that replays the body read to check it."""
    path = scope["path"].rstrip("/")
    if path.endswith(UNUSED_FILE_ROUTES):
        return JSONResponse(error_body("not_found", "not found"), 404), receive
    chunks, size = [], 0
    while True:
        got = await receive()
        if got["type"] != "http.request":
            return JSONResponse(error_body("bad_request", "request not read"), 400), receive
        chunks.append(got.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_CALL_BODY:
            too_large = "a demo call's body is at most 1 MiB: files go by upload"
            return JSONResponse(error_body("too_large", too_large), 413), receive
        if not got.get("more_body"):
            break
    body = b"".join(chunks)
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if body and Request(scope).headers.get("content-type", "").startswith("multipart/"):
        only = "files go to the demo by its upload route only"
        return JSONResponse(error_body("unsupported_media_type", only), 415), receive
    if _foreign_file(data, Path(gr.utils.get_upload_folder()).resolve()):
        by_url = "the demo reads only files uploaded to it, not files named by URL or path"
        return JSONResponse(error_body("invalid_request", by_url), 422), receive
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return None, replay


class _OwnScope:
    """Gradio's app writes itself into `scope["app"]` (and its routes into `scope["route"]`);
    the server's middleware reads both after the response (metrics by route, error handling).
    So Gradio gets a copy of the scope, and the server's scope names the `/demo` mount as its
    route: one low-cardinality metrics label for all of the demo's requests. Its upload route
    needs a key (`_upload_refused`) and is budgeted per address (`UploadBudget`)."""

    def __init__(self, app: ASGIApp, mount: Mount, uploads: UploadBudget, file_bytes: int):
        self.app = app
        self.mount = mount
        self.uploads, self.file_bytes = uploads, file_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.mount
        if scope["type"] == "http" and scope["path"].endswith("/gradio_api/upload"):
            refused = await _upload_refused(scope)
            if refused is not None:
                await refused(scope, receive, send)
                return
            length = Request(scope).headers.get("content-length", "")
            size = int(length) if length.isdigit() else self.file_bytes  # chunked: at most
            address = scope["client"][0] if scope.get("client") else "unknown"
            if not self.uploads.take(address, size):
                message = (
                    "this address has sent the demo all the files it may in 30 minutes; "
                    "try again later"
                )
                body = error_body("too_many_uploads", message)
                await JSONResponse(body, 429, {"Retry-After": "600"})(scope, receive, send)
                return
        elif scope["type"] == "http" and scope["method"] == "POST":
            refused, receive = await _call_refused(scope, receive)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(dict(scope), receive, send)


def mount_demo(app: FastAPI) -> FastAPI:
    """Mount the demo at `/demo` on `app` (built by `create_app`; its lifespan starts Gradio)."""
    settings: Settings = app.state.settings
    theme = gr.themes.Default(
        font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    gr.mount_gradio_app(
        app,
        build_demo(app),
        path=DEMO_PATH,
        footer_links=["api"],
        run_history=False,
        show_error=False,
        max_file_size=settings.max_upload_bytes,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        theme=theme,
    )
    mounts = [r for r in app.router.routes if isinstance(r, Mount) and r.path == DEMO_PATH]
    assert len(mounts) == 1, f"expected one mount at {DEMO_PATH}, found {len(mounts)}"
    gradio_app = mounts[0].app
    assert isinstance(gradio_app, gr.routes.App), type(gradio_app)
    # an open page holds a heartbeat stream until Gradio's stop event: end it when the server
    # begins to stop, or the drain waits for every open page (`app.begin_shutdown`)
    app.state.on_stop.append(gradio_app.stop_event.set)
    budget = UploadBudget(UPLOAD_BUDGET_FILES * settings.max_upload_bytes, CACHE_MAX_AGE_S)
    mounts[0].app = _OwnScope(gradio_app, mounts[0], budget, settings.max_upload_bytes)
    return app
