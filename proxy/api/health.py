"""Operations routes: liveness, readiness (the store answers) and Prometheus metrics. No key needed;
nothing here depends on private data.
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
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
