"""Admin API for offline jobs (Private Evolution, DP-SGD). See docs/jobs.md.

``POST /admin/jobs`` reserves the job's full privacy cost before it is enqueued; the other routes
read records, request cancellation and download results. Every answer is free of private text.
Errors are OpenAI-style: 400 bad parameters, 402 over budget, 404 unknown job/dataset, 409 wrong
job state, 501 a job kind this install cannot run (the missing extra is named; nothing charged).
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import TypeAdapter
from starlette.responses import Response

from proxy.api.common import audit, json_response, read_json, require_admin, validate_body
from proxy.errors import APIError
from proxy.jobs.manager import JobManager
from proxy.jobs.requirements import MissingExtra
from proxy.jobs.requests import JobConflict, JobRequest, JobRequestError, public_view
from proxy.store.base import BudgetExceeded, NotFound

router = APIRouter(prefix="/admin/jobs", dependencies=[Depends(require_admin)])

_REQUEST = TypeAdapter(JobRequest)


def manager(request: Request) -> JobManager:
    """The app's :class:`JobManager` (``app.state.jobs``, created in the lifespan)."""
    return request.app.state.jobs


async def _call(fn: Any, *args: Any) -> Any:
    """Run a blocking manager call in a thread and map its errors to OpenAI-style answers."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except BudgetExceeded as exc:
        # The message gives the remaining budget and never private text.
        raise APIError(402, str(exc), "budget_exceeded") from None
    except NotFound as exc:
        raise APIError(404, str(exc), "not_found") from None
    except JobRequestError as exc:
        raise APIError(400, str(exc), "invalid_request") from None
    except JobConflict as exc:
        raise APIError(409, str(exc), "invalid_job_state") from None
    except MissingExtra as exc:
        # This install cannot run the job kind: refused before anything is charged.
        raise APIError(501, str(exc), "missing_extra") from None


@router.post("")
async def submit_job(request: Request, principal: Any = Depends(require_admin)) -> Response:
    """Plan the job, reserve its cost in the ledger, enqueue it; answers 201 with the record."""
    body = await read_json(request)
    req = validate_body(_REQUEST, body)
    jobs = manager(request)
    record = await _call(jobs.submit, req, getattr(principal, "actor", "admin"))
    await audit(request, "job.submit", record["id"], kind=req.kind, dataset_id=record.get("dataset_id"),
                epsilon_charged=record.get("epsilon_charged"))
    return json_response(public_view(record), 201)


@router.get("")
async def list_jobs(request: Request) -> Response:
    records = await _call(manager(request).list)
    return json_response({"object": "list", "data": [public_view(r) for r in records]})


@router.get("/{job_id}")
async def show_job(job_id: str, request: Request) -> Response:
    return json_response(public_view(await _call(manager(request).get, job_id)))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> Response:
    """Cancel a queued job at once, or ask a running one to stop at its next iteration/step.

    The reserved privacy cost stays spent either way."""
    return json_response(public_view(await _call(manager(request).cancel, job_id)))


@router.get("/{job_id}/result")
async def job_result(job_id: str, request: Request, part: str = "synthetic") -> Response:
    """The synthetic dataset (JSONL, ``part=synthetic``) or the LoRA adapter (``part=adapter``)."""
    data, media, name = await _call(manager(request).result, job_id, part)
    return Response(data, media_type=media, headers={"content-disposition": f'attachment; filename="{name}"'})
