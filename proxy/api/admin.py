"""Admin API (bearer ``DPICL_ADMIN_KEY``): tasks and demonstration sets. Datasets are in
:mod:`proxy.api.datasets`, budgets and the audit log in :mod:`proxy.api.budget`.

No endpoint returns private rows. See docs/admin-api.md.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from proxy.api.common import audit, json_response, read_json, require_admin, validate_body
from proxy.api.schemas import WarmRequest
from proxy.auth import Principal
from proxy.config import TaskConfig
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.serving.warmups import public_view as warmup_view
from proxy.store.base import NotFound


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


# -- tasks ------------------------------------------------------------------------------------


async def _task_or_404(request: Request, name: str) -> TaskConfig:
    task = await request.app.state.tasks.get(name)
    if task is None:
        raise APIError(404, f"task {name!r} not found", "task_not_found")
    return task


def _task_view(task: TaskConfig, static: bool) -> dict[str, Any]:
    return {**task.model_dump(mode="json"), "source": "config" if static else "admin"}


@router.post("/tasks")
async def create_task(request: Request) -> Response:
    state = request.app.state
    task: TaskConfig = validate_body(TaskConfig, await read_json(request))
    if state.tasks.is_static(task.name):
        raise APIError(409, f"task {task.name!r} is defined in the config file and cannot be replaced",
                       "task_exists")
    if task.name in state.upstreams:
        raise APIError(409, f"{task.name!r} is already a model name", "task_exists")
    try:
        state.config.check_task_models(task)
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_task") from None
    await state.tasks.put(task)
    state.demos.forget(task=task.name)
    log_event("task.created", task=task.name)
    await audit(request, "task.create", task.name, dataset=task.dataset)
    return json_response(_task_view(task, False), 201)


@router.get("/tasks")
async def list_tasks(request: Request) -> Response:
    state = request.app.state
    await state.tasks.refresh(force=True)
    tasks = await state.tasks.all()
    return json_response({"object": "list", "data": [_task_view(t, state.tasks.is_static(n)) for n, t in sorted(tasks.items())]})


@router.get("/tasks/{name}")
async def get_task(request: Request, name: str) -> Response:
    await request.app.state.tasks.refresh(force=True)
    task = await _task_or_404(request, name)
    # The width a warm-up would use now: public, or derived from the stored DP row-length release.
    width = await request.app.state.demos.prompt_width(task)
    return json_response({**_task_view(task, request.app.state.tasks.is_static(name)), "prompt_width": width})


@router.delete("/tasks/{name}")
async def delete_task(request: Request, name: str) -> Response:
    state = request.app.state
    if state.tasks.is_static(name):
        raise APIError(409, f"task {name!r} is defined in the config file; remove it there", "task_static")
    task = await _task_or_404(request, name)
    await state.demos.drop(task)
    removed = await state.tasks.delete(name)
    if not removed:
        raise APIError(404, f"task {name!r} not found", "task_not_found")
    log_event("task.deleted", task=name)
    await audit(request, "task.delete", name)
    return json_response({"name": name, "deleted": True})


# -- demonstration sets -----------------------------------------------------------------------


@router.post("/tasks/{name}/demos")
async def warm_demos(request: Request, name: str) -> Response:
    """Queue the task's warm-up: 202 with the warm-up view (its cost stated, charged when it starts).

    ``{"dry_run": true}`` only prices it (200); ``{"wait": true}`` blocks until it finishes (200
    with the finished view, or the warm-up's error).
    """
    principal: Principal = require_admin(request)
    state = request.app.state
    task = await _task_or_404(request, name)
    request.state.task = name
    raw = await request.body()
    req = WarmRequest() if not raw.strip() else validate_body(WarmRequest, await read_json(request))
    if req.dry_run:
        return json_response({"task": name, **await state.demos.price(task, principal.actor)})
    rec = await state.demos.start_warmup(task, principal.actor, admin=True, wait=req.wait,
                                         gone=request.is_disconnected)
    await audit(request, "warmup.start", name, dataset=task.dataset, warmup_id=rec.get("id"))
    finished = rec["state"] in ("done", "failed", "cancelled", "lost")
    return json_response(warmup_view(rec), 200 if finished else 202)


# -- warm-ups ---------------------------------------------------------------------------------


@router.get("/warmups")
async def list_warmups(request: Request) -> Response:
    recs = await anyio.to_thread.run_sync(request.app.state.demos.warmups.list)
    return json_response({"object": "list", "data": [warmup_view(r) for r in recs]})


async def _warmup_call(request: Request, fn: Any, wid: str) -> dict[str, Any]:
    try:
        return await anyio.to_thread.run_sync(fn, wid)
    except NotFound:
        raise APIError(404, f"warm-up {wid!r} not found", "warmup_not_found") from None


@router.get("/warmups/{wid}")
async def get_warmup(request: Request, wid: str) -> Response:
    return json_response(warmup_view(await _warmup_call(request, request.app.state.demos.warmups.get, wid)))


@router.post("/warmups/{wid}/cancel")
async def cancel_warmup(request: Request, wid: str) -> Response:
    """Cancel a warm-up: 200 cancelled (it was queued: nothing charged), 202 cancel requested (it
    runs: it stops before its next token, its charge stays), 409 finished, 404 unknown. Audited."""
    rec, at_once = await _warmup_call(request, request.app.state.demos.warmups.cancel, wid)
    await audit(request, "warmup.cancel", str(rec.get("task")), warmup_id=wid,
                was="queued" if at_once else "running", charged=bool(rec.get("charged")))
    return json_response(warmup_view(rec), 200 if at_once else 202)


@router.get("/tasks/{name}/demos")
async def get_demos(request: Request, name: str) -> Response:
    task = await _task_or_404(request, name)
    return json_response(await request.app.state.demos.cached(task))


@router.delete("/tasks/{name}/demos")
async def delete_demos(request: Request, name: str) -> Response:
    task = await _task_or_404(request, name)
    n = await request.app.state.demos.drop(task)
    log_event("demos.deleted", task=name, sets=n)
    return json_response({"task": name, "deleted": n})
