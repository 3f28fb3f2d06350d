"""The app factory: `create_app(settings)` builds the FastAPI app and its lifespan.

The lifespan opens the database (running migrations for the SQLite default), creates the first
admin key on an empty database (printed once), and loads the model in a background thread so
`/healthz` answers at once while `/readyz` waits for the model. Everything lives on `app.state`;
nothing is module-level.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinyllava_med import __version__
from tinyllava_med.imaging.budget import DECODE_BUDGET
from tinyllava_med.model.load import LoadedModel
from tinyllava_med.server.auth import (
    DenialLog,
    KeyBeforeBody,
    KeyCache,
    LocalOnly,
    ensure_first_admin_key,
)
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.session import make_engine, ping, session_factory
from tinyllava_med.server.engine import BatchingEngine
from tinyllava_med.server.errors import error_body, install_error_handlers
from tinyllava_med.server.jobs import (
    JobRunner,
    release_running_jobs,
    sweep_on_rollback,
    sweep_unnamed_files,
)
from tinyllava_med.server.logs import quiet_libraries, say
from tinyllava_med.server.metrics import Metrics
from tinyllava_med.server.report_writer import ReportWriter
from tinyllava_med.server.retention import schedule_release
from tinyllava_med.server.routes import (
    audit,
    dicomweb,
    health,
    jobs,
    keys,
    openai,
    questions,
    reports,
    studies,
    web,
)
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore, alone_on, hold_data_dir, private_tmp

log = logging.getLogger(__name__)


class Observe:
    """Request count and latency by method, route template and status (plain ASGI: no
    per-request task or body copy, unlike `@app.middleware`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception that escapes becomes a 500 further out

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except _TooLarge:  # `BodyLimit`, further out, answers it: 413
            status = 413
            raise
        finally:
            path = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.request_seconds.labels(method, path).observe(time.perf_counter() - start)


# the method label's values: anything else an HTTP parser lets through (h11 takes any token)
# is "other", so a caller cannot add series to /metrics
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_QUESTION_ROUTE = re.compile(r"^/v1/(studies/[^/]+/questions|ask|chat/completions)$")


class AnnounceQuestions:
    """Announces a question to the engine the moment its HTTP request arrives (before the body
    is read, the key checked and the image decoded), so a batch forming meanwhile waits for it
    (see `BatchingEngine.arriving`). The route passes `scope["state"]["arrival"]` on to the
    engine; whatever happens, the announcement ends with the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = getattr(scope.get("app"), "state", None) and getattr(
            scope["app"].state, "engine", None
        )
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or engine is None
            or not _QUESTION_ROUTE.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        with engine.arriving() as arrival:
            scope.setdefault("state", {})["arrival"] = arrival
            await self.app(scope, receive, send)


# `\u0000` in JSON text, not an escaped backslash followed by "u0000"
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


class RefuseNul:
    """422 `invalid_request` for a request with a NUL character (U+0000) in its path, its query
    or its JSON body, before any route runs. No question, report, name, identifier or filter
    holds one, and PostgreSQL text cannot: such a question, report edit, key name or filter
    answered 500 there. A JSON body is read whole here and passed on, once `KeyBeforeBody` has
    authenticated its caller; a multipart form's text (`/v1/ask`'s question) is checked by its
    route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            await self._reject(scope, receive, send, "the path or query")
            return
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").lower()
        keyed = scope.get("state", {}).get("principal") is not None  # by `KeyBeforeBody`
        if b"json" not in content_type or not keyed:
            # a body nobody authenticated is not read: no route that takes JSON runs without
            # a key, and reading it would hold up to max_upload_bytes for an anonymous caller
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if _JSON_NUL.search(body):
            await self._reject(scope, receive, send, "the JSON body")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # a disconnect, for a streaming route that waits on one
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, where: str) -> None:
        message = f"{where} holds a NUL character (U+0000), which no field accepts"
        response = JSONResponse(error_body("invalid_request", message, None), status_code=422)
        await response(scope, receive, send)


# Headers every response gets unless its route set its own: no other site may frame a page
# of this origin (Swagger UI at /docs and the Gradio demo ask for a key), and no answer is kept
# in a browser's or a proxy's cache unless its route says so (a report, a study list or an SR
# left in a shared workstation's cache, an image render too; the web client's own files say so).
DEFAULT_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class DefaultHeaders:
    """`DEFAULT_HEADERS` on every HTTP response that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in DEFAULT_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)


class BodyLimit:
    """413 in the error shape when a request body is larger than `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._reject(send)
            return
        seen = 0
        sent_response = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal sent_response
            if message["type"] == "http.response.start":
                sent_response = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not sent_response:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        import json

        body = json.dumps(
            error_body(
                "payload_too_large",
                f"the request body is larger than {self.limit} bytes",
                {"limit_bytes": self.limit},
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(BaseException):
    """Raised out of a body's `receive` past the limit. Not an `Exception`: the form parser
    catches those and answers 400 "error parsing the body" (a chunked upload over the limit
    got 400, not 413)."""


def _load_model(app: FastAPI, settings: Settings, own_process: bool) -> None:
    """Background: build the demo if needed, load the model, start the engine (and, in a
    process of its own, settle the heap)."""
    from tinyllava_med.model.load import load_model

    try:
        if settings.model == "demo":
            from tinyllava_med.training.demo import ensure_demo_model

            # progress bars for a terminal only: a service's log would keep each redraw
            ensure_demo_model(settings.data_dir, progress=sys.stderr.isatty())
        lm = load_model(
            settings.model,
            quant=settings.quant,
            device=settings.device,
            dtype=settings.dtype,
            data_dir=settings.data_dir,
        )
        if own_process:  # before the engine starts: the full collection takes a moment
            settle_heap()
        _start_engine(app, lm, settings)
    except Exception as e:  # /readyz reports it; the reason goes to the log
        app.state.load_error = f"{type(e).__name__}: {e}"
        log.exception("could not load the model %s", settings.model)


# Objects allocated (less those freed) between young collections. Python's default, 700, runs
# several collections per question, each walking what the request has in flight; at 16 clients
# 20000 gave the batched demo server 8% more requests/s in alternating runs (bench/results/
# serve_load.md). Cyclic garbage waits a little longer for its collection: a few MB at most, as a
# batch leaves no tensor to the collector (tests/model/test_generate.py checks).
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once the model is loaded, in a process that only serves: move what exists now (about
    700k objects: the model's modules, the libraries) out of the collector's sight, where a
    full collection took 355 ms, and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, mid, old)


def _start_engine(app: FastAPI, lm: LoadedModel, settings: Settings) -> None:
    engine = app.state.engine
    if settings.warmup == "on" or (settings.warmup == "auto" and lm.device.type == "cuda"):
        # every size, not powers of two: CUDA libraries choose kernels per shape and load them
        # on first use. Suspected cause of the tail in serve_load_cuda_tl15b.md: at 4 clients,
        # the first to send batches of 3 and 4, p95 was 10x p50 (bench/first_batch.py checks)
        sizes = list(range(1, settings.max_batch_size + 1))
        log.info("warming up: one batch of each size 1 to %d", sizes[-1])
        timings = engine.warm_up(lm, sizes)
        log.info("warm-up took %s", ", ".join(f"{s:.2f} s for {n}" for n, s in timings))
    engine.start(lm)
    app.state.metrics.set_model(lm.info)
    log.info("model ready: %s", lm.info)


FIRST_KEY_FILE = "first-admin-key"


def _hand_over(key: str, data_dir: Path, log_format: str = "text") -> None:
    """Give the first admin key to whoever started the server: on a terminal, printed once; else
    (a container, a service: stderr goes to a log collector, which must not hold a key that
    never expires) written to `DATA_DIR/first-admin-key`, owner only, for them to read and
    delete."""
    if sys.stderr.isatty():
        print(
            f"Created the first admin API key (shown once, store it now):\n{key}", file=sys.stderr
        )
        return
    path = data_dir / FIRST_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # before writing: a file left by an emptied database keeps its mode
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    say(
        f"Created the first admin API key, written to {path} (owner only): read it, store it, "
        "delete the file",
        log_format,
    )


def _read_backlog(sessions: sessionmaker[Session]) -> crud.Backlog:
    with sessions() as session:
        return crud.backlog(session)


def _remote_engine(settings: Settings, metrics: Metrics) -> Any:
    from tinyllava_med.server.remote_engine import RemoteEngine

    assert settings.remote_url is not None  # Settings checks it
    key = settings.remote_api_key
    return RemoteEngine(
        url=settings.remote_url,
        api_key=key.get_secret_value() if key is not None else None,
        model=settings.remote_model,
        max_concurrency=settings.remote_max_concurrency,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
        metrics=metrics,
    )


def _connect_remote(app: FastAPI, stop: threading.Event) -> None:
    """Background: wait for the remote engine to list its models; then the gateway is ready."""
    try:
        remote = app.state.engine.connect_until_ready(stop)
    except Exception as e:
        app.state.load_error = f"{type(e).__name__}: {e}"
        return
    app.state.metrics.set_model(remote.info)
    log.info("remote engine ready: %s", remote.info)


def _copy_before_upgrade(settings: Settings) -> None:
    """A copy of the SQLite database before `serve` migrates it (`backup.copy_before_upgrade`);
    one that cannot be made (a full disk) is said, and the migration goes on as it did."""
    from tinyllava_med.server.backup import copy_before_upgrade

    try:
        copy = copy_before_upgrade(settings)
    except (OSError, RuntimeError, sqlite3.Error) as e:
        log.warning("no copy of the database before migrating it: %s", e)
        return
    if copy is not None:
        log.warning(
            "migrating the database to this version's schema; the database as it was is in %s "
            "(`tinyllava-med db restore` it with the previous version if this one must go)",
            copy,
        )


def create_app(
    settings: Settings | None = None,
    *,
    model: LoadedModel | None = None,
    own_process: bool = False,
) -> FastAPI:
    """The server. `model` (tests, embedding) skips loading `settings.model` from disk.
    `own_process`: serving is this process's whole job (`serve`), so it holds the data
    directory (`storage.hold_data_dir`), its temporary files go under it
    (`storage.private_tmp`), and once the model is loaded it may tune
    the garbage collector for it (`settle_heap`)."""
    settings = settings or Settings()
    DECODE_BUDGET.resize(settings.decode_memory_mb * 1024 * 1024)  # one per process
    # alone on the data directory of its SQLite database: no other server runs its jobs
    alone = own_process and alone_on(settings.data_dir) and _sqlite_in(settings)
    if own_process:
        hold_data_dir(settings.data_dir)  # `db restore` refuses while this process runs
        private_tmp(settings.data_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        from tinyllava_med.server.db.migrate import known_revisions, require_head, upgrade

        if settings.database_url.startswith("sqlite"):
            _copy_before_upgrade(settings)
            upgrade(settings.database_url)  # the embedded default migrates itself
        else:  # a shared database is migrated as its own step (`db upgrade`); refuse to start
            require_head(settings.database_url)  # on an older schema than this code's
        db_engine = make_engine(settings.database_url)
        app.state.db_engine = db_engine
        app.state.schema_revision = ping(db_engine)  # `/readyz` says when it goes back
        app.state.known_revisions = known_revisions()
        app.state.session_factory = session_factory(db_engine)
        sweep_on_rollback(app.state.session_factory, settings)
        app.state.report_writer = ReportWriter(db_engine)
        if settings.auth_disabled:
            log.warning("auth_disabled: every caller is an admin without a key (local use only)")
        with app.state.session_factory.begin() as session:
            first_key = ensure_first_admin_key(session)
        if first_key is not None:
            _hand_over(first_key, settings.data_dir, settings.log_format)
            app.state.first_admin_key = first_key
        app.state.store = ImageStore(settings.images_dir, settings.render_cache_mb * 1024 * 1024)
        if own_process:  # `serve`: what a crash left in the store goes
            app.state.store.remove_leftovers()
            threading.Thread(  # a large store takes a while to list: beside the start
                target=sweep_unnamed_files,
                args=(app.state.session_factory, settings, app.state.store),
                name="sweep-unnamed",
                daemon=True,
            ).start()
        app.state.metrics.watch_cache("rendered", app.state.store.rendered)
        stop_connecting = threading.Event()
        if settings.engine == "remote":
            app.state.engine = _remote_engine(settings, app.state.metrics)
            threading.Thread(
                target=_connect_remote, args=(app, stop_connecting), name="remote", daemon=True
            ).start()
        else:
            app.state.engine = BatchingEngine(
                max_batch_size=settings.max_batch_size,
                batch_window_ms=settings.batch_window_ms,
                max_queue=settings.max_queue,
                metrics=app.state.metrics,
                pixel_cache_mb=settings.pixel_cache_mb,
                prefix_cache_mb=settings.prefix_cache_mb,
                # a request may wait for the batch in progress and then its own
                max_batch_s=settings.request_timeout_s / 3,
            )
            app.state.metrics.watch_cache("pixels", app.state.engine.pixels)
            app.state.metrics.watch_cache("prefixes", app.state.engine.prefixes)
            if model is not None:
                _start_engine(app, model, settings)
            else:
                threading.Thread(
                    target=_load_model,
                    args=(app, settings, own_process),
                    name="model-loader",
                    daemon=True,
                ).start()
        # read at every scrape, so the alert on it works without anyone polling /readyz
        app.state.metrics.model_ready.set_function(
            lambda: float(
                app.state.engine.ready
                and app.state.load_error is None
                and not app.state.shutting_down
                and not app.state.last_probe_failed
                and not app.state.engine.stalled(settings.request_timeout_s)
            )
        )
        with app.state.session_factory.begin() as session:
            schedule_release(session, settings)  # with image_retention_days: the first run
        if alone:  # jobs a stopped server left running need not wait out their lease
            with app.state.session_factory.begin() as session:
                released = release_running_jobs(session, settings.job_lease_s)
            if released:
                log.warning("jobs %s were left running by a stopped server: due now", released)
        runner = app.state.job_runner = JobRunner(app, settings.job_workers)
        app.state.metrics.watch_backlog(
            partial(_read_backlog, app.state.session_factory), runner.handlers
        )
        runner.start()
        dimse = None
        if settings.dimse_port is not None:
            from tinyllava_med.server.dimse import StorageSCP

            dimse = StorageSCP(
                settings, app.state.session_factory, app.state.store, app.state.metrics
            )
            dimse.start()
        app.state.dimse = dimse
        try:
            yield
        finally:
            begin_shutdown(app)
            stop_connecting.set()
            if dimse is not None:
                dimse.stop()
            runner.stop()
            app.state.engine.shutdown()
            db_engine.dispose()

    # /docs and /redoc with Swagger UI and ReDoc served from the installed package, not a CDN
    # that a hospital network without internet cannot reach
    app = FastAPIOffline(
        static_url=web.DOCS_STATIC,
        redoc_url=None,  # routes/web.py's, with a CSP that keeps ReDoc off its CDN
        title="TinyLLaVA-Med server",
        version=__version__,
        description="Questions about DICOM / PNG / JPEG studies, answered by small medical "
        "LLaVA models; reports stored, edited and signed. Errors: "
        '`{"error": {"code", "message", "detail"}}`.',
        lifespan=lifespan,
        # Starlette parses at most 1000 files per request unless told; a CD has more
        form_limits={"max_files": max(settings.max_import_files, settings.max_files_per_upload)},
    )
    quiet_libraries()  # no identifiers or credentials in their logs, whatever the level
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.metrics.queue_limit.set(settings.max_queue)
    app.state.metrics.request_timeout.set(settings.request_timeout_s)
    app.state.metrics.watch_data_dir(settings.data_dir)
    app.state.key_cache = KeyCache(settings.auth_cache_s)
    app.state.denial_log = DenialLog()
    app.state.load_error = None
    app.state.shutting_down = False
    app.state.job_runner = None
    app.state.on_stop = []  # called once a stop begins: what would hold the drain open
    app.state.last_probe_failed = False
    app.state.first_admin_key = None
    install_error_handlers(app)
    for router in (
        health.router,
        studies.router,
        questions.router,
        reports.router,
        jobs.router,
        openai.router,
        dicomweb.router,
        keys.router,
        audit.router,
        web.router,
    ):
        app.include_router(router)

    app.add_middleware(AnnounceQuestions)
    app.add_middleware(RefuseNul)
    app.add_middleware(KeyBeforeBody)  # no body taken in without a key
    app.add_middleware(Observe, metrics=app.state.metrics)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    if settings.auth_disabled:
        app.add_middleware(LocalOnly)
    app.add_middleware(DefaultHeaders)  # outermost: also on BodyLimit's 413
    if settings.gradio:  # imports Gradio only when the demo is asked for
        from tinyllava_med.server.gradio_demo import mount_demo

        mount_demo(app)
    return app


def _sqlite_in(settings: Settings) -> bool:
    """Whether the database is an SQLite file under the data directory (the default)."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        return False
    return Path(url.database).resolve().is_relative_to(Path(settings.data_dir).resolve())


def begin_shutdown(app: FastAPI) -> None:
    """The server is stopping: `/readyz` answers 503 (a load balancer sends elsewhere), no more
    jobs are claimed, and streams that would never end are closed (`app.state.on_stop`: the
    Gradio page's heartbeat); the requests and jobs in flight go on. Called when the stop signal
    arrives (`http_server`), before the drain, and again as the lifespan ends."""
    if not app.state.shutting_down:
        for hook in app.state.on_stop:
            hook()
    app.state.shutting_down = True
    if app.state.job_runner is not None:
        app.state.job_runner.stop_claiming()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app as soon as a stop signal arrives: uvicorn itself tells
    the lifespan only once the requests in flight have finished."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.served_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        begin_shutdown(self.served_app)
        super().handle_exit(sig, frame)


def http_server(app: FastAPI, settings: Settings, **config: Any) -> uvicorn.Server:
    """The uvicorn server `serve` runs: on a stop signal it stops accepting, lets the requests
    in flight finish for up to `settings.drain_s` (a CPU answer may take most of
    `request_timeout_s`), then shuts the app down. A second Ctrl-C stops at once."""
    return _DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            timeout_graceful_shutdown=math.ceil(settings.drain_s),
            ssl_certfile=settings.tls_certfile,
            ssl_keyfile=settings.tls_keyfile,
            **config,
        ),
        app,
    )
