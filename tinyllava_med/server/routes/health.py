"""`/healthz` (the process is alive), `/readyz` (model answers, database reachable), `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tinyllava_med import __version__
from tinyllava_med.server.db.session import ping
from tinyllava_med.server.storage import MIN_FREE_BYTES, storage_free, writable

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


def _db_state(request: Request) -> str:
    """`ok`, `unreachable`, or `schema_changed`: the schema went back from the revision the
    server started on (`db downgrade`, or a restore, from another host), so requests would fail
    on missing columns. A newer revision, which this code does not know, is a rolling update's
    `db upgrade`: its migrations add, and this server serves on until it is replaced."""
    state = request.app.state
    try:
        revision = ping(state.db_engine)
    except Exception:
        return "unreachable"
    went_back = revision != state.schema_revision and (
        revision is None or revision in state.known_revisions
    )
    return "schema_changed" if went_back else "ok"


def _model_info(lm: Any) -> dict[str, Any]:
    """The model's provenance plus where it runs (`cuda:0`, `cpu`; `remote` for an endpoint)."""
    device = getattr(lm, "device", None)
    dtype = getattr(lm, "dtype", None)
    return {
        **lm.info,
        "device": str(device) if device is not None else "remote",
        **({"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}),
    }


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready when the model is loaded and answers (a recent answer, or a one-token probe when
    idle: `BatchingEngine.model_check`), the database answers at the schema revision the server
    started on, and the data volume has room
    (`storage: full` below `MIN_FREE_BYTES`: no report can be stored, no read audited;
    `read_only` when it refuses writes)."""
    state = request.app.state
    settings = state.settings
    engine = state.engine
    checks: dict[str, Any] = {"model": "loading", "database": "unknown"}
    if state.load_error is not None:
        checks["model"] = "failed"
    elif engine.ready:
        checks["model"] = await engine.model_check(
            fresh_s=settings.readiness_probe_interval_s,
            stall_s=settings.request_timeout_s,
            wait_s=settings.readiness_probe_wait_s,
        )
    if state.shutting_down:
        checks["model"] = "shutting_down"
    checks["database"] = await run_in_threadpool(_db_state, request)
    if storage_free(settings.data_dir) < MIN_FREE_BYTES:  # nothing can be stored or audited
        checks["storage"] = "full"
    elif not writable(settings.data_dir, settings.images_dir):
        checks["storage"] = "read_only"
    ready = checks["model"] == "ok" and checks["database"] == "ok" and "storage" not in checks
    state.last_probe_failed = checks["model"] == "probe_failed"  # stalls: the gauge reads them live
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": checks,
        **({"model": _model_info(engine.lm)} if engine.lm is not None else {}),
    }
    return JSONResponse(
        body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"}
    )


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
