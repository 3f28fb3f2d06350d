"""The one error shape, `{"error": {"code", "message", "detail"}}`, and its exception handlers.

Domain errors (imaging, engine, database rules) are mapped to HTTP once, here. Messages never
carry patient identifiers: they describe what was expected and what came.
"""

from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tinyllava_med.server.db.crud import DomainError
from tinyllava_med.server.db.models import Outcome

log = logging.getLogger(__name__)

# the forms of this server's ids (`models.new_id` UUIDs, job numbers)
_OUR_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9]{1,19}")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


STORAGE_FULL = (
    "the server's storage is full: nothing was stored; an administrator must free space on "
    "its data volume or database"
)
# a read is refused when its audit event cannot be written: no access goes unrecorded
STORAGE_FULL_READ = (
    "the server's storage is full: this read could not be recorded in the audit log, so it is "
    "refused; an administrator must free space on its data volume or database"
)


def storage_full(exc: BaseException) -> bool:
    """A write failed for want of space: on the data volume (ENOSPC, or a quota: EDQUOT) or in
    the database (SQLite's "database or disk is full", PostgreSQL's SQLSTATE 53100)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    return getattr(orig, "sqlstate", None) == "53100" or "database or disk is full" in str(orig)


# the data volume refuses writes: mounted read-only, its permissions, or failing (EIO)
UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
STORAGE_UNWRITABLE = (
    "the server's data volume refuses writes (read-only, permissions, or an I/O error); nothing "
    "was stored; an administrator must fix the volume"
)


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": detail}}


def _response(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, detail), status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    507: "insufficient_storage",
}


def _audit_failure(request: Request, status: int, code: str, error_detail: Any = None) -> None:
    """Record a failed access in its own transaction (the route's own was rolled back), in a
    worker thread: on the event loop, a write waiting for another transaction's lock would
    stall the server (see `ReportWriter`).

    Routes that touch a study or report put `(actor, action, resource_type, resource_id)` on
    `request.state.audit` first; failures before that (auth) are audited by `auth`.
    """
    ctx = getattr(request.state, "audit", None)
    if ctx is None:
        return
    actor, action, resource_type, resource_id = ctx
    detail: dict[str, Any] = {"code": code}
    named = error_detail.get("study_id") if isinstance(error_detail, dict) else None
    if resource_id is None and resource_type == "study" and isinstance(named, str):
        # a refusal about a study held here (another patient's UID, an image of another
        # study) is found in that study's history, as its accesses are
        resource_id = named
    if resource_id is not None and not _OUR_ID.fullmatch(resource_id):
        # what a caller put in the path is kept only in this server's id forms: a STOW URL's
        # Study Instance UID, or a name typed where an id goes, must not reach the audit log
        resource_id, detail["resource_id"] = None, "not an id of this server"
    outcome: Outcome = {404: "not_found", 401: "denied", 403: "denied"}.get(  # type: ignore[assignment]
        status, "error" if status >= 500 else "invalid"
    )
    try:
        from tinyllava_med.server.db.crud import audit

        with request.app.state.session_factory.begin() as session:
            audit(
                session,
                actor=actor,
                action=action,
                resource_type=resource_type,
                resource_id=resource_id,
                outcome=outcome,
                status_code=status,
                detail=detail,
            )
    except Exception:  # the response still goes out; the failure to audit is logged
        log.exception("could not write the audit event for a failed %s", action)


async def _audited(
    request: Request,
    status: int,
    code: str,
    message: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error response, once its failure is audited (`_audit_failure`)."""
    await run_in_threadpool(_audit_failure, request, status, code, detail)
    return _response(status, code, message, detail, headers)


@dataclass(frozen=True)
class Failure:
    status: int
    code: str
    message: str
    detail: Any = None
    headers: dict[str, str] | None = None


def where(request: Request) -> str:
    """The request for a log line: its method and route template (`/dicomweb/studies/{study_uid}`),
    never the path itself, which can hold a DICOM UID or anything a client sent."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', '(no route)')}"


def failure(request: Request, exc: Exception) -> Failure:
    """What a request that raised `exc` answers (logging what is not the client's doing)."""
    if isinstance(exc, APIError):
        return Failure(exc.status, exc.code, exc.message, exc.detail, exc.headers)
    if isinstance(exc, DomainError):
        return Failure(exc.status, exc.code, exc.message, exc.detail)
    if isinstance(exc, OSError | OperationalError) and storage_full(exc):
        # not the client's fault, and no retry helps until someone frees space: 507, which
        # the alert on the data volume's free space should have announced
        log.error("storage full on %s: nothing stored", where(request))
        read = request.method in ("GET", "HEAD")
        return Failure(507, "insufficient_storage", STORAGE_FULL_READ if read else STORAGE_FULL)
    if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS:
        log.error(
            "storage error on %s: %s", where(request), errno.errorcode.get(exc.errno or 0, "?")
        )
        return Failure(503, "storage_unavailable", STORAGE_UNWRITABLE)
    if isinstance(exc, OperationalError) and any(
        said in str(exc.orig) for said in ("readonly database", "disk I/O error")
    ):  # SQLite's file on a volume refusing writes: no retry helps
        log.error("storage error on %s: the database file refuses writes", where(request))
        return Failure(503, "storage_unavailable", STORAGE_UNWRITABLE)
    if isinstance(exc, OperationalError):
        # the database could not do it now (locked past the busy timeout, connection lost,
        # server gone): nothing was stored, and the same request may succeed later
        reason = str(exc.orig).splitlines()[0] if str(exc.orig) else type(exc.orig).__name__
        log.error("database error on %s: %s", where(request), reason)
        return Failure(
            503,
            "database_unavailable",
            "the database could not complete this request; nothing was changed, try again",
            headers={"Retry-After": "1"},
        )
    log.error("unhandled %s on %s", type(exc).__name__, where(request), exc_info=exc)
    return Failure(500, "internal_error", "an internal error occurred; it has been logged")


async def stream_error(request: Request, exc: Exception) -> dict[str, Any]:
    """The error event for a streamed response whose status (200) went out already: the code
    and message the response would have had, audited as its failure would have been."""
    f = failure(request, exc)
    await run_in_threadpool(_audit_failure, request, f.status, f.code)
    return error_body(f.code, f.message, f.detail)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        whole_body = any(list(e.get("loc", ())) == ["body"] for e in exc.errors())
        if whole_body and ctype and ctype != "application/json" and not ctype.endswith("+json"):
            # a JSON route's body sent as a form or text reads as "not a valid dictionary"
            return _response(
                415,
                "unsupported_media_type",
                f"this route takes a JSON body (Content-Type: application/json), not {ctype}",
            )
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return _response(422, "invalid_request", "the request does not match the schema", detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 400 and message.startswith("Too many files"):
            # the multipart parser's file count (the app's `form_limits`): too large, as an
            # import whose ZIPs hold too many files is
            return _response(413, "too_large", message)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and (allowed := _allowed(request)):
            # Starlette names the methods of the first route on the path only: GET and POST of
            # /v1/studies are two routes, so a PUT was told "Allow: POST" (inside a mount, as
            # the docs' static files, the routes here do not see the path: Starlette's stays)
            headers = {**(headers or {}), "Allow": allowed}
        return _response(exc.status_code, code, message, None, headers)

    def _allowed(request: Request) -> str:
        """The methods some route takes at the request's path (the router asked per method)."""
        routes = request.app.router.routes
        return ", ".join(
            method
            for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
            if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
        )

    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        f = failure(request, exc)
        return await _audited(request, f.status, f.code, f.message, f.detail, f.headers)

    for kind in (APIError, DomainError, OSError, OperationalError, Exception):
        app.exception_handler(kind)(_failed)
