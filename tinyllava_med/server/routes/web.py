"""The radiologist web client: `/` (the page) and `/static/{name}` (its script and style); and
the API's ReDoc page (`/redoc`; Swagger UI at `/docs` is fastapi-offline's).

The client is three plain files in `server/static/` (no build step, no CDN). Only those files
are served, by name, so no path from the URL ever reaches the file system. Every response
carries a Content-Security-Policy that allows only this origin; images are shown from `blob:`
object URLs (fetched with the Authorization header), so `img-src` also allows `blob:`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse

from tinyllava_med.server.errors import APIError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# name -> media type: the only files served.
STATIC_FILES: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate every time: a new server version must not run with last version's script.
    "Cache-Control": "no-cache",
}

# Swagger UI's and ReDoc's files, from the fastapi-offline package (`create_app` mounts them)
DOCS_STATIC = "/docs-static"
# ReDoc's page: its bundle runs search in a blob: worker, styles inline, and its side menu asks
# cdn.redoc.ly for a logo, which this keeps the browser from fetching (no call leaves the site)
REDOC_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' blob:",
        "worker-src 'self' blob:",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)

router = APIRouter(tags=["web client"], include_in_schema=False)


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """The API's ReDoc page, served from this server's own files."""
    root = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
        with_google_fonts=False,
    )
    page.headers.update({**SECURITY_HEADERS, "Content-Security-Policy": REDOC_CSP})
    return page


def _file(name: str, media_type: str) -> FileResponse:
    path = STATIC_DIR / name
    if not path.is_file():  # a broken install: say which file is missing
        raise APIError(
            500, "web_client_missing", f"the web client file {name} is not installed", None
        )
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def index() -> FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise APIError(
            404,
            "not_found",
            f"no web client file {name[:60]!r}; served: {', '.join(sorted(STATIC_FILES))}",
        )
    return _file(name, media_type)
