"""Admin API for client keys: list (config and stored), create (the secret is shown once), delete.

Only the key's SHA-256 is stored; the secret is in the creation answer and nowhere else (not in
logs, not in the store, not in later listings). Keys from the config file are listed read-only.
See docs/admin-api.md.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from proxy.api.common import audit, json_response, read_json, require_admin, validate_body
from proxy.config import sha256_hex
from proxy.errors import APIError
from proxy.logs import log_event

router = APIRouter(prefix="/admin/keys", dependencies=[Depends(require_admin)])

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Prefix of generated keys (recognisable in secret scanners); the rest is 32 random bytes.
KEY_PREFIX = "dpk-"


class KeyCreate(BaseModel):
    """``POST /admin/keys`` body."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    tasks: list[str] = Field(default_factory=list, max_length=1000)
    passthrough: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("name must be 1-64 letters, digits and ._-")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if any(not t or len(t) > 128 for t in v):
            raise ValueError("each task must be a name of 1-128 characters (or '*' for every task)")
        return sorted(set(v))


def _view(name: str, tasks: list[str], passthrough: bool, source: str, created_at: float | None = None,
          prefix: str | None = None) -> dict[str, Any]:
    return {"object": "client_key", "name": name, "tasks": tasks, "passthrough": passthrough, "source": source,
            "created_at": created_at, "key_prefix": prefix}


async def reload_keys(request: Request) -> dict[str, dict[str, Any]]:
    """Re-read the stored keys into this replica's authenticator; returns them."""
    state = request.app.state
    records = await anyio.to_thread.run_sync(state.store.list_client_keys)
    state.auth.load_stored(records)
    return records


@router.get("")
async def list_keys(request: Request) -> Response:
    stored = await reload_keys(request)
    data = [_view(k.name, list(k.tasks), k.passthrough, "config") for k in request.app.state.auth.config_keys()]
    data += [_view(name, rec.get("tasks") or [], bool(rec.get("passthrough", True)), "admin", rec.get("created_at"),
                   rec.get("key_prefix")) for name, rec in sorted(stored.items())]
    return json_response({"object": "list", "data": data})


@router.post("")
async def create_key(request: Request) -> Response:
    state = request.app.state
    req: KeyCreate = validate_body(KeyCreate, await read_json(request))
    if any(k.name == req.name for k in state.auth.config_keys()):
        raise APIError(409, f"client key {req.name!r} is defined in the config file", "key_exists", param="name")
    await state.tasks.refresh(force=True)  # tasks created on another replica count too
    known = await state.tasks.all()
    unknown = [t for t in req.tasks if t != "*" and t not in known]
    if unknown:
        # A key for a task that does not exist would only fail at the client's first request.
        raise APIError(400, f"no task named {', '.join(repr(t) for t in unknown[:5])}"
                            f"{f' (+{len(unknown) - 5} more)' if len(unknown) > 5 else ''}: create the task first, "
                            "or give '*' for every task", "task_not_found", param="tasks")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = {"key_hash": sha256_hex(secret), "tasks": req.tasks, "passthrough": req.passthrough,
              "created_at": time.time(), "key_prefix": secret[:len(KEY_PREFIX) + 4]}
    added = await anyio.to_thread.run_sync(state.store.add_client_key, req.name, record)
    if not added:
        raise APIError(409, f"client key {req.name!r} already exists; delete it first", "key_exists", param="name")
    await reload_keys(request)
    log_event("key.created", key_name=req.name, tasks=len(req.tasks), passthrough=req.passthrough)
    await audit(request, "key.create", req.name, tasks=req.tasks, passthrough=req.passthrough)
    view = _view(req.name, req.tasks, req.passthrough, "admin", record["created_at"], record["key_prefix"])
    # The only place the secret ever appears: it is not stored, logged or listed.
    return json_response({**view, "key": secret}, 201)


@router.delete("/{name}")
async def delete_key(request: Request, name: str) -> Response:
    state = request.app.state
    if any(k.name == name for k in state.auth.config_keys()):
        raise APIError(409, f"client key {name!r} is defined in the config file; remove it there", "key_static")
    removed = await anyio.to_thread.run_sync(state.store.delete_client_key, name)
    if not removed:
        raise APIError(404, f"client key {name!r} not found", "key_not_found")
    await reload_keys(request)
    log_event("key.deleted", key_name=name)
    await audit(request, "key.delete", name)
    return json_response({"object": "client_key", "name": name, "deleted": True})
