"""Admin API: privacy budgets per dataset name, explicit ledger resets and the audit log.

Every version of a dataset name shares one budget and one ledger (docs/privacy.md); the old
per-dataset routes map a dataset id to its name. See docs/admin-api.md, "Budgets and audit".
"""

from __future__ import annotations

import math
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from proxy.api.common import audit, json_response, read_json, require_admin, validate_body
from proxy.api.schemas import BudgetReset, BudgetUpdate
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.store.base import NotFound

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _gauge(request: Request, dataset_ids: list[str], spent: float | None, budget: float) -> None:
    for dataset_id in dataset_ids:
        request.app.state.metrics.record_spend(dataset_id, spent if spent is not None else math.inf, budget)


def _not_found(name: str) -> APIError:
    return APIError(404, f"dataset name {name!r} not found (see dpicl datasets list)", "dataset_not_found")


def _name_or_id(store: Any, ref: str) -> str:
    """The dataset name ``ref`` names: itself when it is a name, else the name of the version with id ``ref``."""
    try:
        store.get_population(ref)
        return ref
    except NotFound:
        try:
            return store.get_dataset(ref).name
        except NotFound:
            raise _not_found(ref) from None


async def _resolve(request: Request, ref: str) -> str:
    return await anyio.to_thread.run_sync(_name_or_id, request.app.state.store, ref)


@router.get("/budget")
async def all_budgets(request: Request) -> Response:
    """Every dataset name with its budget and spend across all its versions."""
    data = await anyio.to_thread.run_sync(request.app.state.budget.populations)
    for view in data:
        _gauge(request, view["versions"], view["epsilon_spent"], view["epsilon_budget"])
    return json_response({"object": "list", "data": data})


@router.get("/budget/{name}")
async def name_budget(request: Request, name: str) -> Response:
    """A name's budget and ledger; ``name`` may also be the id of one of its versions."""
    name = await _resolve(request, name)
    try:
        view = await anyio.to_thread.run_sync(request.app.state.budget.population, name)
    except NotFound:
        raise _not_found(name) from None
    _gauge(request, view["versions"], view["epsilon_spent"], view["epsilon_budget"])
    return json_response(view)


async def _set(request: Request, name: str, update: BudgetUpdate) -> dict[str, Any]:
    budget = request.app.state.budget
    try:
        view = await anyio.to_thread.run_sync(lambda: budget.set_name_budget(name, update.epsilon, update.delta))
    except NotFound:
        raise _not_found(name) from None
    except ValueError as exc:  # e.g. lowering below what is spent (numbers only)
        raise APIError(400, str(exc), "invalid_budget", param="epsilon") from None
    _gauge(request, view["versions"], view["epsilon_spent"], view["epsilon_budget"])
    log_event("budget.set", dataset_name=name, epsilon=update.epsilon, delta=update.delta)
    await audit(request, "budget.set", name, epsilon=update.epsilon, delta=view["delta_budget"])
    return view


@router.put("/budget/{name}")
async def set_name_budget(request: Request, name: str) -> Response:
    update: BudgetUpdate = validate_body(BudgetUpdate, await read_json(request))
    return json_response(await _set(request, await _resolve(request, name), update))


@router.post("/budget/{name}/reset")
async def reset_budget(request: Request, name: str) -> Response:
    """Restart a name's accounting: an explicit admin action with a required reason (audited).
    The ledger keeps every entry; only the composition restarts after the reset marker."""
    body: BudgetReset = validate_body(BudgetReset, await read_json(request))
    name = await _resolve(request, name)
    budget = request.app.state.budget
    actor = str(getattr(request.state, "client", None) or "admin")
    try:
        view = await anyio.to_thread.run_sync(lambda: budget.reset(name, actor, body.reason))
    except NotFound:
        raise _not_found(name) from None
    log_event("budget.reset", dataset_name=name)
    await audit(request, "budget.reset", name, reason=body.reason)
    return json_response(view)


# -- the per-dataset routes (a dataset id maps to its name) -----------------------------------


async def _name_of(request: Request, dataset_id: str) -> str:
    try:
        meta = await anyio.to_thread.run_sync(request.app.state.store.get_dataset, dataset_id)
    except NotFound:
        raise APIError(404, f"dataset {dataset_id!r} not found (a deleted version's spend stays in its name's "
                            f"ledger: dpicl budget show NAME)", "dataset_not_found") from None
    return meta.name


def _deleted_version_owner(store: Any, dataset_id: str) -> str | None:
    """The name whose ledger charged a (deleted) dataset id, if any."""
    for pop in store.list_populations():
        if any(e.dataset_id == dataset_id for e in store.ledger(pop.name)):
            return pop.name
    return None


@router.get("/datasets/{dataset_id}/budget")
async def dataset_budget(request: Request, dataset_id: str) -> Response:
    state = request.app.state
    try:
        await anyio.to_thread.run_sync(state.store.get_dataset, dataset_id)
    except NotFound:
        # A deleted version: its spend stays in its name's ledger; show that, read-only.
        name = await anyio.to_thread.run_sync(_deleted_version_owner, state.store, dataset_id)
        if name is None:
            raise APIError(404, f"dataset {dataset_id!r} not found", "dataset_not_found") from None
        view = await anyio.to_thread.run_sync(state.budget.population, name)
        return json_response({"dataset_id": dataset_id, "deleted": True, "name": name,
                              "spent_epsilon": view["epsilon_spent"], "budget_epsilon": view["epsilon_budget"],
                              "entries": view["ledger"]})
    try:
        status = await anyio.to_thread.run_sync(request.app.state.budget.status, dataset_id)
    except NotFound:
        raise APIError(404, f"dataset {dataset_id!r} not found", "dataset_not_found") from None
    _gauge(request, [dataset_id], status["spent_epsilon"], status["budget_epsilon"])
    return json_response(status)


@router.put("/datasets/{dataset_id}/budget")
async def set_dataset_budget(request: Request, dataset_id: str) -> Response:
    name = await _name_of(request, dataset_id)
    update: BudgetUpdate = validate_body(BudgetUpdate, await read_json(request))
    await _set(request, name, update)
    status = await anyio.to_thread.run_sync(request.app.state.budget.status, dataset_id)
    return json_response(status)


# -- audit log ------------------------------------------------------------------------------


@router.get("/audit")
async def audit_log(request: Request, limit: int = Query(100, ge=1, le=1000),
                    before: int | None = Query(None, ge=1, le=2**62)) -> Response:
    """Newest-first admin audit records; page with ``before`` = the smallest ``seq`` seen.

    The bounds are declared on the parameters, so the OpenAPI document states them and a value
    outside them is a 400 (``invalid_request``, naming the parameter)."""
    entries = await anyio.to_thread.run_sync(lambda: request.app.state.store.audit(limit, before))
    return json_response({"object": "list", "data": [
        {"seq": e.seq, "time": e.time, "actor": e.actor, "action": e.action, "target": e.target,
         "details": e.details} for e in entries]})
