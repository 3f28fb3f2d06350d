"""`/v1/apikeys`: admins list keys (never the keys themselves), create keys (shown once) and
revoke them; any key reads its own role and permissions (`/v1/apikeys/me`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tinyllava_med.server import auth
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.session import after_commit
from tinyllava_med.server.deps import KeyAdmin, SessionDep, SettingsDep
from tinyllava_med.server.errors import APIError
from tinyllava_med.server.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyPublic,
    Caller,
)

router = APIRouter(prefix="/v1/apikeys", tags=["keys"])


@router.get("", response_model=ApiKeyList)
def list_keys(session: SessionDep, principal: KeyAdmin, active: bool | None = None) -> ApiKeyList:
    """Oldest first; `active=true` leaves out revoked and expired keys, `active=false` lists
    only them."""
    keys = [
        ApiKeyPublic.model_validate(k, from_attributes=True)
        for k in auth.list_api_keys(session, include_revoked=True)
        if active is None or k.active is active
    ]
    crud.audit(
        session,
        actor=principal.actor,
        action="apikey.list",
        resource_type="apikey",
        resource_id=None,
        outcome="ok",
        status_code=200,
        detail={"count": len(keys)},
    )
    return ApiKeyList(data=keys, count=len(keys))


@router.get("/me", response_model=Caller)
async def who_am_i(principal: auth.CurrentPrincipal, settings: SettingsDep) -> Caller:
    """The calling key's id, name, role and permissions (any valid key), and the optional
    features it may use here, so a client offers only what will work."""
    granted = [p for p in auth.PERMISSIONS if principal.can(p)]
    features = ["retrieve"] if settings.pulls_from_pacs and principal.can("study.upload") else []
    return Caller(
        id=principal.key_id,
        name=principal.name,
        role=principal.role,
        permissions=granted,
        features=features,
    )


@router.post("", status_code=201, response_model=ApiKeyCreated)
def create_key(
    session: SessionDep, settings: SettingsDep, body: ApiKeyCreate, principal: KeyAdmin
) -> ApiKeyCreated:
    """A new key, shown once; it expires after `expires_in_days` (default: `api_key_days`)."""
    days = body.expires_in_days or settings.api_key_days
    row, key = auth.create_api_key(
        session, role=body.role, name=body.name.strip() or f"{body.role} key", expires_in_days=days
    )
    crud.audit(
        session,
        actor=principal.actor,
        action="apikey.create",
        resource_type="apikey",
        resource_id=row.id,
        outcome="ok",
        status_code=201,
        detail={"role": body.role, "expires_days": days},
    )
    return ApiKeyCreated(
        id=row.id, role=row.role, name=row.name, key=key, expires_at=row.expires_at
    )


@router.delete("/{key_id}", status_code=204)
def revoke_key(request: Request, session: SessionDep, key_id: str, principal: KeyAdmin) -> None:
    row = auth.get_api_key(session, key_id)
    if row is None:
        raise APIError(404, "apikey_not_found", "no API key with this id")
    if auth.is_last_admin_key(session, row):
        # the API would have no admin left (keys, audit, deletions): only the console could
        # make one again
        raise APIError(
            409,
            "last_admin_key",
            "this is the last active admin key; create another admin key first",
        )
    auth.revoke_api_key(session, row)
    # dropped once committed: a request in between would otherwise cache the key as valid again
    cache = request.app.state.key_cache
    after_commit(session, lambda: cache.drop(row.id))
    crud.audit(
        session,
        actor=principal.actor,
        action="apikey.revoke",
        resource_type="apikey",
        resource_id=row.id,
        outcome="ok",
        status_code=204,
    )
