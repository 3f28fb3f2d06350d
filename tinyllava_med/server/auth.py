"""API keys and roles: key creation, hashing and verification, who may do what, and the FastAPI
dependencies that enforce it.

A key reads `tlm_<prefix>_<secret>`: the 8-hex-digit prefix finds the row and is safe to show
(`apikey list`, logs); only the sha256 of the whole key is stored, compared in constant time.
The key itself is shown once, when created.

Roles grow by inclusion: `pacs` uploads studies, asks questions and reads; `radiologist` also
edits and signs reports; `admin` also manages keys and reads the audit log.

    principal: Annotated[Principal, Depends(require("report.sign"))]   # in a route

The dependencies read `request.app.state.settings` (`Settings`) and
`request.app.state.session_factory` (`db.session_factory(engine)`), both set by the app factory.
Denials (401/403) are written to the audit log in their own transaction. `KeyBeforeBody`
checks the key of an API request with a body before the body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal, get_args
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Receive, Scope, Send

from tinyllava_med.server.db.crud import audit
from tinyllava_med.server.db.models import ROLES, ApiKey, Role, utcnow
from tinyllava_med.server.errors import APIError, error_body
from tinyllava_med.server.route_table import route_table

log = logging.getLogger(__name__)

Permission = Literal[
    "study.upload",
    "study.read",
    "question.ask",
    "report.read",
    "report.edit",
    "report.sign",
    "apikey.manage",
    "audit.read",
    "study.delete",
    "job.retry",
]
PERMISSIONS: tuple[str, ...] = get_args(Permission)

_PACS: frozenset[Permission] = frozenset(
    {"study.upload", "study.read", "question.ask", "report.read"}
)
_RADIOLOGIST: frozenset[Permission] = _PACS | {"report.edit", "report.sign"}
_ADMIN: frozenset[Permission] = _RADIOLOGIST | {
    "apikey.manage",
    "audit.read",
    "study.delete",
    "job.retry",
}
ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    "pacs": _PACS,
    "radiologist": _RADIOLOGIST,
    "admin": _ADMIN,
}

_GRANTS: dict[str, frozenset[str]] = {role: frozenset(p) for role, p in ROLE_PERMISSIONS.items()}

KEY_SCHEME = "tlm"
_KEY_RE = re.compile(rf"^{KEY_SCHEME}_([0-9a-f]{{8}})_[A-Za-z0-9_-]{{32,128}}$")
_DUMMY_HASH = "0" * 64  # compared against when no row matches, so timing does not tell
# last_used_at is written at most this often per key: not one write per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
ANONYMOUS = "anonymous"


# --- key primitives ----------------------------------------------------------------------------


def generate_api_key() -> tuple[str, str]:
    """A new `(prefix, key)`; the key is `tlm_<prefix>_<43 url-safe characters>`."""
    prefix = secrets.token_hex(4)
    return prefix, f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_api_key(key: str) -> str | None:
    """The prefix of a well-formed key, else None."""
    m = _KEY_RE.match(key)
    return m.group(1) if m else None


# --- roles -------------------------------------------------------------------------------------


def has_permission(role: str, needed: str) -> bool:
    """`needed` is a permission (`"report.sign"`) or a role (`"radiologist"`: that role's
    permissions are all needed)."""
    granted = _GRANTS.get(role, frozenset())
    if needed in ROLES:
        return _GRANTS[needed] <= granted
    if needed in PERMISSIONS:
        return needed in granted
    raise ValueError(f"unknown role or permission {needed!r}")


# --- persistence -------------------------------------------------------------------------------


def create_api_key(
    session: Session, *, role: Role, name: str, expires_in_days: int | None = None
) -> tuple[ApiKey, str]:
    """Store a new key's hash and return `(row, key)`; the key is not kept anywhere. A key with
    `expires_in_days` is refused from then on (None: never)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if expires_in_days is not None and expires_in_days < 1:
        raise ValueError("expires_in_days must be at least 1")
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    name = name.strip()
    if not 1 <= len(name) <= 128:
        raise ValueError("the key's name must be 1 to 128 characters")
    for _ in range(5):
        prefix, key = generate_api_key()
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is None:
            break
    else:  # pragma: no cover - 5 collisions in 2**32
        raise RuntimeError("could not find a free key prefix")
    row = ApiKey(
        name=name, role=role, prefix=prefix, key_hash=hash_api_key(key), expires_at=expires_at
    )
    session.add(row)
    session.flush()
    return row, key


def verify_api_key(session: Session, secret: str) -> ApiKey | None:
    """The active key row for `secret`, or None (unknown, malformed, revoked or expired).

    The sha256 is compared in constant time; `last_used_at` is refreshed (at most once a
    minute). The caller commits.
    """
    row = _matching_key(session, secret)
    if row is None or not row.active:
        return None
    _touch(session, row)
    return row


def _touch(session: Session, row: ApiKey) -> None:
    """Refresh `last_used_at`, at most once a minute."""
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()


def _matching_key(session: Session, secret: str) -> ApiKey | None:
    """The row whose hash `secret` matches (constant-time compare), active or not."""
    prefix = parse_api_key(secret) if len(secret) <= 256 else None
    row = None
    if prefix is not None:
        row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    expected = row.key_hash if row is not None else _DUMMY_HASH
    matches = hmac.compare_digest(hash_api_key(secret), expected)
    return row if matches else None


def get_api_key(session: Session, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def list_api_keys(session: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt))


def revoke_api_key(session: Session, key: ApiKey) -> ApiKey:
    """Revoke `key` (idempotent: the first revocation time is kept)."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def is_last_admin_key(session: Session, key: ApiKey) -> bool:
    """Whether `key` is an active admin key and no other admin key is active (not revoked,
    not expired)."""
    now = utcnow()
    if key.role != "admin" or key.revoked_at is not None:
        return False
    others = select(ApiKey.id).where(
        ApiKey.role == "admin",
        ApiKey.id != key.id,
        ApiKey.revoked_at.is_(None),
        or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
    )
    return session.scalar(others.limit(1)) is None


def ensure_first_admin_key(session: Session) -> str | None:
    """Create an admin key when no key exists at all and return it (show it once); else None.

    On PostgreSQL the table is locked for the check, so two workers starting together cannot
    both create one. The caller commits.
    """
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.connection().exec_driver_sql("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE")
    if session.scalar(select(func.count()).select_from(ApiKey)):
        return None
    _, key = create_api_key(session, role="admin", name="first admin")
    log.warning("created the first admin API key (prefix %s): the key is not logged", key[4:12])
    return key


# --- FastAPI dependencies ----------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key's id and role (or `anonymous` when auth is disabled)."""

    key_id: str
    role: Role
    name: str
    expires_at: datetime | None = None

    @property
    def actor(self) -> str:
        return self.key_id

    def can(self, needed: str) -> bool:
        return has_permission(self.role, needed)


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer tlm_...")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="tlm_...")


class KeyCache:
    """Keys verified in the last `ttl_s` seconds, so a busy client is not looked up in the
    database on every request. Revoking a key through this process drops it at once; other
    processes (replicas) stop accepting it within `ttl_s`. Keyed by the key's sha256."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._items: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        if self.ttl_s <= 0:
            return None
        with self._lock:
            item = self._items.get(digest)
        if item is None or time.monotonic() - item[0] > self.ttl_s:
            return None
        expires = item[1].expires_at
        if expires is not None and expires <= utcnow():
            return None  # looked up again: refused as expired, at the second it expires
        return item[1]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._items) > 10_000:  # a flood of distinct keys: start over
                self._items.clear()
            self._items[digest] = (time.monotonic(), principal)

    def drop(self, key_id: str) -> None:
        with self._lock:
            for digest in [d for d, (_, p) in self._items.items() if p.key_id == key_id]:
                del self._items[digest]


class DenialLog:
    """Which refused keys (401s) are audited one row each: per client address, the first
    `burst` in each `window_s`; the rest of that window are counted, and the next row written
    for that address says how many were left out (`detail["not_audited_before"]`). So a flood
    of keyless requests is on the record without filling the audit table or queueing on
    SQLite's one write lock ahead of report signing."""

    def __init__(
        self, burst: int = 20, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst, self.window_s, self.clock = burst, window_s, clock
        # address -> [window start, rows written in it, refusals left out since the last row]
        self._seen: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def admit(self, address: str) -> int | None:
        """None: leave this refusal out (it is counted); else audit it, noting how many were
        left out before it."""
        now = self.clock()
        with self._lock:
            if len(self._seen) > 10_000:  # a flood from many addresses: start over
                self._seen.clear()
            seen = self._seen.setdefault(address, [now, 0, 0])
            if now - seen[0] >= self.window_s:
                seen[0], seen[1] = now, 0
            if seen[1] >= self.burst:
                seen[2] += 1
                return None
            skipped = int(seen[2])
            seen[1], seen[2] = seen[1] + 1, 0
            return skipped


def _route_of(request: Request) -> str | None:
    """The route template a request is for, before routing (`KeyBeforeBody` refuses a body
    first)."""
    for route in route_table(request.app):
        if request.method in route.methods and route.regex.match(request.url.path):
            return route.template
    return None


def _audit_denied(
    request: Request, *, actor: str, action: str, status_code: int, detail: dict[str, str | int]
) -> None:
    route = request.scope.get("route")
    path = getattr(route, "path", None) or _route_of(request) or "unmatched"
    with request.app.state.session_factory.begin() as session:
        audit(
            session,
            actor=actor,
            action=action,
            resource_type="route",
            resource_id=f"{request.method} {path}",
            outcome="denied",
            status_code=status_code,
            detail=detail,
        )


def _key_of(request: Request) -> str | None:
    """The key of `Authorization: Bearer <key>`, else of `X-API-Key: <key>`."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer <key>` or `X-API-Key: <key>`; 401 otherwise,
    audited."""
    if request.app.state.settings.auth_disabled:
        return Principal(key_id=ANONYMOUS, role="admin", name="authentication disabled")
    key = _key_of(request)
    refused = None
    if key:
        # the app factory sets the cache; an app assembled otherwise just looks keys up
        cache: KeyCache = getattr(request.app.state, "key_cache", None) or KeyCache(0)
        digest = hash_api_key(key)
        principal = cache.get(digest)
        if principal is not None:
            return principal  # the common case: no database, no thread
        found = await run_in_threadpool(_look_up, request, key)
        if isinstance(found, Principal):
            cache.put(digest, found)
            return found
        refused = found
    reason = "missing" if not key else refused[0] if refused else "invalid"
    denials: DenialLog | None = getattr(request.app.state, "denial_log", None)
    address = request.client.host if request.client else "unknown"
    skipped = denials.admit(address) if denials is not None else 0
    if skipped is not None:
        detail: dict[str, str | int] = {"reason": f"{reason} API key"}
        if skipped:
            detail["not_audited_before"] = skipped
        await run_in_threadpool(
            _audit_denied,
            request,
            actor=ANONYMOUS,
            action="auth.authenticate",
            status_code=401,
            detail=detail,
        )
    hint = "send `Authorization: Bearer tlm_...` or `X-API-Key: tlm_...`"
    if refused:
        hint = f"it was {refused[0]} at {refused[1]:%Y-%m-%d %H:%M} UTC; ask an admin for a new key"
    raise APIError(
        401, "unauthorized", f"{reason} API key: {hint}", headers={"WWW-Authenticate": "Bearer"}
    )


async def get_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_api_key: Annotated[str | None, Depends(_api_key_header)],
) -> Principal:
    """The caller (`authenticate`), or the one `KeyBeforeBody` found already. `bearer` and
    `x_api_key` declare the two ways in for the OpenAPI document."""
    found = getattr(request.state, "principal", None)
    return found if isinstance(found, Principal) else await authenticate(request)


# Where every request with a body needs a key (the Gradio demo, mounted at /demo, has its own).
KEYED_PREFIXES = ("/v1/", "/dicomweb/")


class KeyBeforeBody:
    """Authenticate a request to the API that carries a body (POST, PUT, PATCH) before anything
    reads the body. FastAPI parses a body, spooling uploads to disk, before it runs a route's
    dependencies, so without this a caller with no key could make the server take in
    `max_upload_bytes` per request before hearing 401. The principal found is passed on in the
    request's state, so the route does not look the key up again."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in ("POST", "PUT", "PATCH")
            and scope["path"].startswith(KEYED_PREFIXES)
        ):
            request = Request(scope)
            try:
                scope.setdefault("state", {})["principal"] = await authenticate(request)
            except APIError as e:
                body = error_body(e.code, e.message, e.detail)
                await JSONResponse(body, status_code=e.status, headers=e.headers)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


class LocalOnly:
    """With `auth_disabled` (every caller an admin, on a loopback address only): answer only
    requests addressed to this machine by a loopback name (`Host`) and, when they come from a
    web page, from a page of such a name on the same port (`Origin`: another local web app,
    Orthanc Explorer at :8042, is another origin). Any web page the user visits could
    otherwise post to the server (a form needs no preflight), and a name of the attacker's that
    resolves to 127.0.0.1 (DNS rebinding) could read it all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Request(scope).headers
            host = _loopback(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")
            origin = headers.get("origin")
            if host is None or (origin is not None and _loopback(origin) != host):
                body = error_body(
                    "not_local",
                    "auth_disabled answers only requests to and from this machine by a "
                    "loopback name (127.0.0.1, ::1, localhost)",
                )
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _loopback(url: str) -> int | None:
    """The port of `url` (`scheme://host[:port]`) when its host is a loopback name, else None."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is no number
        return None
    return port if parts.hostname in ("127.0.0.1", "::1", "localhost") else None


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def _look_up(request: Request, key: str) -> Principal | tuple[str, datetime] | None:
    """The caller's principal; for a real key that was revoked or expired, which and when
    (its holder is told, so the web client can say to ask for a new key); else None."""
    with request.app.state.session_factory.begin() as session:
        row = _matching_key(session, key)
        if row is None:
            return None
        if row.revoked_at is not None:
            return "revoked", row.revoked_at
        if row.expired:
            assert row.expires_at is not None
            return "expired", row.expires_at
        _touch(session, row)
        return Principal(row.id, row.role, row.name, row.expires_at)


def deny_unless(request: Request, principal: Principal, needed: Role | Permission) -> None:
    """403 `forbidden`, the denial audited, unless `principal`'s role grants `needed`: for a
    route whose body decides what it needs (a PATCH that signs needs `report.sign`)."""
    if principal.can(needed):
        return
    _audit_denied(
        request,
        actor=principal.actor,
        action=needed,
        status_code=403,
        detail={"role": principal.role, "needed": needed},
    )
    raise APIError(
        403,
        "forbidden",
        f"this action needs {needed!r}; the key's role {principal.role!r} does not grant it",
    )


def require(needed: Role | Permission) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets the call through when the caller's role grants `needed` (a
    permission, or every permission of a role), else answers 403 and audits the denial."""
    if needed not in ROLES and needed not in PERMISSIONS:
        raise ValueError(f"unknown role or permission {needed!r}")

    async def dependency(request: Request, principal: CurrentPrincipal) -> Principal:
        if not principal.can(needed):
            await run_in_threadpool(deny_unless, request, principal, needed)
        return principal

    dependency.__name__ = f"require_{needed.replace('.', '_')}"
    return dependency
