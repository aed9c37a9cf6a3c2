"""Admin API (bearer ``DPICL_ADMIN_KEY``): datasets, budgets, tasks and demonstration sets.

No endpoint returns private rows: uploads answer with id, row count and labels; listings show
metadata; budgets show ledger entries (events, actors, reasons). See docs/admin-api.md.
"""

from __future__ import annotations

import math
import re
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from aggregation.datasets import DataError, deduplicate, parse_rows
from proxy.api.common import json_response, read_json, require_admin, validate_body
from proxy.api.schemas import BudgetUpdate, WarmRequest
from proxy.auth import Principal
from proxy.config import TaskConfig
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.serving.warmups import public_view as warmup_view
from proxy.store.base import DatasetMeta, NotFound

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _meta(meta: DatasetMeta) -> dict[str, Any]:
    return {
        "id": meta.id, "name": meta.name, "version": meta.version, "rows": meta.rows, "labels": meta.labels,
        "budget_epsilon": meta.budget_epsilon, "budget_delta": meta.budget_delta, "public": meta.public,
        "created_at": meta.created_at, "noisy_counts_released": meta.noisy_counts is not None,
    }


def _float_field(form: Any, name: str, default: float) -> float:
    raw = form.get(name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    if not isinstance(raw, str):
        raise APIError(400, f"'{name}' must be a form field, not a file", "invalid_budget", param=name)
    try:
        return float(raw)
    except ValueError:
        raise APIError(400, f"'{name}' must be a number", "invalid_budget", param=name) from None


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool_field(form: Any, name: str, default: bool) -> bool:
    # A typo must not silently pick a side: 'deduplicate=fasle' is refused, not read as true.
    raw = form.get(name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    value = raw.strip().lower() if isinstance(raw, str) else None
    if value not in _TRUE + _FALSE:
        raise APIError(400, f"'{name}' must be true or false", "invalid_request", param=name)
    return value in _TRUE


async def _dataset_or_404(request: Request, dataset_id: str) -> DatasetMeta:
    try:
        return await anyio.to_thread.run_sync(request.app.state.store.get_dataset, dataset_id)
    except NotFound:
        raise APIError(404, f"dataset {dataset_id!r} not found", "dataset_not_found") from None


# -- datasets ---------------------------------------------------------------------------------


@router.post("/datasets")
async def upload_dataset(request: Request) -> Response:
    """Multipart upload: ``file`` (JSONL or CSV with text,label), ``name``, optional ``epsilon``,
    ``delta`` (the dataset's budget), ``public`` and ``deduplicate`` (default true)."""
    ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if ctype != "multipart/form-data":
        raise APIError(415, "upload datasets as multipart/form-data with fields 'file' and 'name'",
                       "unsupported_media_type")
    server = request.app.state.config.server
    try:
        form = await request.form(max_files=1, max_fields=10, max_part_size=server.max_body_bytes)
    except APIError:
        raise
    except Exception:
        # Multipart parser errors may quote the part they choked on: answer without details.
        raise APIError(400, "malformed multipart body", "invalid_multipart") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "missing 'file' (a JSONL or CSV file with 'text' and 'label')", "missing_file",
                           param="file")
        name = form.get("name")
        if not isinstance(name, str) or not _DATASET_NAME.match(name):
            raise APIError(400, "'name' is required: 1-128 letters, digits and ._-", "invalid_name", param="name")
        epsilon = _float_field(form, "epsilon", server.default_budget_epsilon)
        delta = _float_field(form, "delta", server.default_budget_delta)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise APIError(400, "epsilon must be a positive finite number", "invalid_budget", param="epsilon")
        if not (0 < delta < 1):
            raise APIError(400, "delta must be in (0, 1)", "invalid_budget", param="delta")
        public = _bool_field(form, "public", False)
        dedup = _bool_field(form, "deduplicate", True)
        filename = upload.filename or "data.jsonl"
        if not filename.lower().endswith((".jsonl", ".json", ".ndjson", ".csv")):
            raise APIError(415, "the file must be .jsonl or .csv", "unsupported_file_type", param="file")
        data = await upload.read()
    finally:
        await form.close()

    def parse() -> tuple[list[tuple[str, str]], int]:
        examples = parse_rows(data, filename)
        dropped = 0
        if dedup:
            examples, dropped = deduplicate(examples)
        return [(e.text, e.label) for e in examples], dropped

    try:
        rows, dropped = await anyio.to_thread.run_sync(parse)
    except DataError as exc:  # names the row number, never its content
        raise APIError(400, f"invalid dataset file: {exc}", "invalid_dataset", param="file") from None
    except UnicodeDecodeError:
        raise APIError(400, "invalid dataset file: it is not UTF-8 text", "invalid_dataset", param="file") from None
    store = request.app.state.store
    meta = await anyio.to_thread.run_sync(lambda: store.create_dataset(name, rows, epsilon, delta, public))
    request.app.state.metrics.record_spend(meta.id, 0.0, meta.budget_epsilon)
    log_event("dataset.uploaded", dataset_id=meta.id, rows=meta.rows, labels=len(meta.labels))
    # Told to the uploader only (who holds the file); not logged and not part of stored metadata.
    return json_response({**_meta(meta), "duplicates_removed": dropped}, 201)


@router.get("/datasets")
async def list_datasets(request: Request) -> Response:
    metas = await anyio.to_thread.run_sync(request.app.state.store.list_datasets)
    return json_response({"object": "list", "data": [_meta(m) for m in metas]})


@router.get("/datasets/{dataset_id}")
async def get_dataset(request: Request, dataset_id: str) -> Response:
    return json_response(_meta(await _dataset_or_404(request, dataset_id)))


@router.delete("/datasets/{dataset_id}")
async def delete_dataset(request: Request, dataset_id: str) -> Response:
    await _dataset_or_404(request, dataset_id)
    state = request.app.state
    try:
        await anyio.to_thread.run_sync(state.store.delete_dataset, dataset_id)
    except NotFound:
        raise APIError(404, f"dataset {dataset_id!r} not found", "dataset_not_found") from None
    state.demos.forget(dataset_id=dataset_id)
    forget = getattr(state.budget, "forget", None)
    if callable(forget):
        forget(dataset_id)
    state.metrics.forget_dataset(dataset_id)
    log_event("dataset.deleted", dataset_id=dataset_id)
    return json_response({"id": dataset_id, "deleted": True})


# -- budgets ----------------------------------------------------------------------------------


@router.get("/budget")
async def all_budgets(request: Request) -> Response:
    budget = request.app.state.budget

    def collect() -> list[dict[str, Any]]:
        return [budget.status(m.id) for m in request.app.state.store.list_datasets()]

    data = await anyio.to_thread.run_sync(collect)
    for status in data:
        _gauge(request, status)
    return json_response({"object": "list", "data": data})


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _gauge(request: Request, status: dict[str, Any]) -> None:
    spent = status.get("spent_epsilon")
    request.app.state.metrics.record_spend(status["dataset_id"], spent if spent is not None else math.inf,
                                           status.get("budget_epsilon"))


@router.get("/datasets/{dataset_id}/budget")
async def dataset_budget(request: Request, dataset_id: str) -> Response:
    store = request.app.state.store
    try:
        await anyio.to_thread.run_sync(store.get_dataset, dataset_id)
    except NotFound:
        # A deleted dataset keeps its ledger (the audit trail): show it read-only.
        entries = await anyio.to_thread.run_sync(store.ledger, dataset_id)
        if not entries:
            raise APIError(404, f"dataset {dataset_id!r} not found", "dataset_not_found") from None
        return json_response({
            "dataset_id": dataset_id, "deleted": True,
            "spent_epsilon": _finite(entries[-1].epsilon_after),
            "entries": [{"seq": e.seq, "partition": e.partition, "event": e.event,
                         "epsilon_after": _finite(e.epsilon_after), "actor": e.actor, "reason": e.reason,
                         "created_at": e.created_at} for e in entries],
        })
    status = await anyio.to_thread.run_sync(request.app.state.budget.status, dataset_id)
    _gauge(request, status)
    return json_response(status)


@router.put("/datasets/{dataset_id}/budget")
async def set_budget(request: Request, dataset_id: str) -> Response:
    await _dataset_or_404(request, dataset_id)
    update: BudgetUpdate = validate_body(BudgetUpdate, await read_json(request))
    budget = request.app.state.budget
    try:
        status = await anyio.to_thread.run_sync(lambda: budget.set_budget(dataset_id, update.epsilon, update.delta))
    except ValueError as exc:  # e.g. lowering below what is spent (numbers only)
        raise APIError(400, str(exc), "invalid_budget", param="epsilon") from None
    _gauge(request, status)
    log_event("budget.set", dataset_id=dataset_id, epsilon=update.epsilon, delta=update.delta)
    return json_response(status)


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
    return json_response(_task_view(task, request.app.state.tasks.is_static(name)))


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
    rec = await state.demos.start_warmup(task, principal.actor, admin=True, wait=req.wait)
    finished = rec["state"] in ("done", "failed", "cancelled")
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
    rec = await _warmup_call(request, request.app.state.demos.warmups.cancel, wid)
    return json_response(warmup_view(rec))


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
