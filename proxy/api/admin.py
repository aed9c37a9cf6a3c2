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
from proxy.task_config import TaskConfig
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.serving.tasks import task_problem, task_status
from proxy.serving.warmups import public_view as warmup_view
from proxy.store.base import DatasetMeta, NotFound, Store


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


# -- tasks ------------------------------------------------------------------------------------


async def _task_or_404(request: Request, name: str) -> TaskConfig:
    task = await request.app.state.tasks.get(name)
    if task is None:
        raise APIError(404, f"task {name!r} not found", "task_not_found")
    return task


def _dataset_or_none(store: Store, ref: str) -> DatasetMeta | None:
    try:
        return store.resolve_dataset(ref)
    except NotFound:
        return None


async def _task_view(request: Request, task: TaskConfig) -> dict[str, Any]:
    """The task's settings, where it comes from, and whether it can be warmed now (``status``:
    ready, waiting for its dataset's upload, or invalid with the reason in ``status_detail``)."""
    meta = await anyio.to_thread.run_sync(_dataset_or_none, request.app.state.store, task.dataset)
    status, detail = task_status(task, meta)
    source = "config" if request.app.state.tasks.is_static(task.name) else "admin"
    return {**task.model_dump(mode="json"), "source": source, "status": status, "status_detail": detail}


async def _check_new_task(request: Request, task: TaskConfig, allow_missing_dataset: bool) -> None:
    """Refuse at creation what would only fail at warm-up (admin-facing one-liners)."""
    if "/" in task.name:
        # Task names are path segments of /admin/tasks/{name}: a '/' makes the task unreachable.
        raise APIError(400, "name must not contain '/' (letters, digits and ._:- only)", "invalid_task",
                       param="name")
    meta = await anyio.to_thread.run_sync(_dataset_or_none, request.app.state.store, task.dataset)
    if meta is None:
        if allow_missing_dataset:
            return  # listed as waiting until the dataset is uploaded
        raise APIError(400, f"dataset {task.dataset!r} is not uploaded; upload it first, or create the task with "
                            "allow_missing_dataset=true (dpicl tasks add --allow-missing-dataset) to wait for it",
                       "dataset_not_found", param="dataset")
    problem = task_problem(task, meta)
    if problem:
        raise APIError(400, f"task {task.name!r}: {problem}", "invalid_task")


@router.post("/tasks")
async def create_task(request: Request, allow_missing_dataset: bool = False) -> Response:
    """Create (or replace) a task. Its dataset must be uploaded unless ``allow_missing_dataset``
    (the task is then ``waiting``), its labels must be in the dataset's domain and its epsilon
    within the dataset's whole budget."""
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
    await _check_new_task(request, task, allow_missing_dataset)
    await state.tasks.put(task)
    state.demos.forget(task=task.name)
    log_event("task.created", task=task.name)
    await audit(request, "task.create", task.name, dataset=task.dataset)
    return json_response(await _task_view(request, task), 201)


@router.get("/tasks")
async def list_tasks(request: Request) -> Response:
    state = request.app.state
    await state.tasks.refresh(force=True)
    tasks = await state.tasks.all()
    return json_response({"object": "list", "data": [await _task_view(request, t) for _, t in sorted(tasks.items())]})


@router.get("/tasks/{name}")
async def get_task(request: Request, name: str) -> Response:
    await request.app.state.tasks.refresh(force=True)
    task = await _task_or_404(request, name)
    # The width a warm-up would use now: public, or derived from the stored DP row-length release.
    width = await request.app.state.demos.prompt_width(task)
    return json_response({**await _task_view(request, task), "prompt_width": width})


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
    """What is cached for a task. A task waiting for its dataset has nothing cached (200, not an
    error: the console and ``dpicl tasks demos`` list it as waiting)."""
    task = await _task_or_404(request, name)
    state = request.app.state
    if await anyio.to_thread.run_sync(_dataset_or_none, state.store, task.dataset) is None:
        status, detail = task_status(task, None)
        return json_response({"task": name, "key": None, "dataset_id": None, "cached": False, "status": status,
                              "status_detail": detail})
    return json_response(await state.demos.cached(task))


@router.delete("/tasks/{name}/demos")
async def delete_demos(request: Request, name: str) -> Response:
    task = await _task_or_404(request, name)
    n = await request.app.state.demos.drop(task)
    log_event("demos.deleted", task=name, sets=n)
    return json_response({"task": name, "deleted": n})
