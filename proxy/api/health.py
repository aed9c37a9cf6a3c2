"""Operations routes: liveness and readiness (the store answers), public and independent of private
data; Prometheus metrics, which need the admin key or the scrape token (per-dataset budgets and
route latencies, such as a warm-up's duration, are admin-only: see docs/serving.md).
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from starlette.responses import Response

from proxy.errors import APIError, dumps
from proxy.metrics import CONTENT_TYPE_LATEST

router = APIRouter()


@router.get("/health/liveness")
async def liveness() -> Response:
    return Response(dumps({"status": "ok"}), media_type="application/json")


@router.get("/health/readiness")
async def readiness(request: Request) -> Response:
    try:
        ok = await anyio.to_thread.run_sync(request.app.state.store.ping)
    except Exception:  # noqa: BLE001 - unreachable store = not ready
        ok = False
    if not ok:
        raise APIError(503, "store unreachable", "store_unavailable")
    return Response(dumps({"status": "ok", "store": "ok"}), media_type="application/json")


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    """Prometheus text format (``Authorization: Bearer`` the scrape token or the admin key)."""
    request.app.state.auth.metrics(request)
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
