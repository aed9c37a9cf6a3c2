"""The FastAPI application: ``create_app(config)``.

Everything stateful (store, budget service, HTTP client, upstreams, demonstration service, metrics,
authenticator) is created in the lifespan and lives on ``app.state``; there are no module globals.
A pure-ASGI middleware enforces the body-size limit, records metrics, writes one JSON access-log
line per request and turns any unexpected exception into a bare OpenAI-style 500 (so no traceback,
which could quote data, reaches a log or a client).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio
import httpx
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.auth import Authenticator
from proxy.budget import BudgetService
from proxy.config import LOCAL_MODEL_NAME, Config, load_config
from proxy.serving.demos import DemoService
from proxy.serving.tasks import TaskRegistry
from proxy.errors import APIError, BodyTooLarge, dumps, error_body, install_error_handlers
from proxy.jobs.manager import JobManager
from proxy.logs import log_event, log_request, setup_logging
from proxy.metrics import CONTENT_TYPE_LATEST, Metrics
from proxy.store import open_store

log = logging.getLogger("dpicl.app")


class RequestMiddleware:
    """Body limit (Content-Length and streamed size), metrics, access log, last-resort 500."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, access_log: bool = True):
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        async def reply(err: APIError) -> None:
            await send_wrapper({"type": "http.response.start", "status": err.status,
                                "headers": [(b"content-type", b"application/json")]})
            await send_wrapper({"type": "http.response.body",
                                "body": error_body(err.status, err.message, err.code, err.type)})

        try:
            length = _content_length(scope)
            if length is not None and length > self.limit:
                await reply(BodyTooLarge(self.limit))
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise BodyTooLarge(self.limit)
                return message

            await self.app(scope, limited_receive, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - last resort; never re-raise (uvicorn logs tracebacks)
            if isinstance(exc, APIError):
                err = exc
            elif isinstance(exc, ValueError) and str(exc).startswith("invalid content-length"):
                err = APIError(400, "invalid Content-Length header", "invalid_header")
            else:
                log.error("unhandled %s on %s %s", type(exc).__name__, scope.get("method"), scope.get("path", "")[:200])
                err = APIError(500, "internal server error", "internal_error")
            if not response_started:
                await reply(err)
            else:
                status = err.status
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            model = state.get("model") or "-"
            self.metrics.requests.labels(path, model, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)
            if self.access_log:
                log_request(scope.get("method", "?"), scope.get("path", ""), status, started, state)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                n = int(value)
            except ValueError:
                raise ValueError("invalid content-length") from None
            if n < 0:
                raise ValueError("invalid content-length")
            return n
    return None


def _local_source_factory(app: FastAPI, config: Config):
    """Load the local generator model once, sharing the local upstream's model when it exposes it."""

    def factory() -> Any:
        from aggregation.sources.local import LocalSource, load_model

        upstream = app.state.upstreams.get(LOCAL_MODEL_NAME)
        getter = getattr(upstream, "model_and_tokenizer", None) or getattr(upstream, "_load", None)
        if callable(getter):
            model, tok = getter()
        else:
            model, tok = load_model(config.server.local_model)
        return LocalSource(model, tok)

    return factory


def _load_local_model(model_dir: str | None) -> tuple[Any, Any]:
    """The local upstreams' model loader (imported lazily: torch and transformers are slow to import)."""
    from aggregation.sources.local import load_model

    return load_model(model_dir)


def _build_upstreams(config: Config, http: httpx.AsyncClient) -> dict[str, Any]:
    from proxy.upstreams import build_upstream

    s = config.server
    ups: dict[str, Any] = {}
    local_model = "local/" + s.local_model if s.local_model else "local"
    ups[LOCAL_MODEL_NAME] = build_upstream(
        {"model_name": LOCAL_MODEL_NAME, "litellm_params": {"model": local_model}}, http, s.timeout, s.retries,
        local_loader=_load_local_model)
    for entry in config.model_list:
        ups[entry.model_name] = build_upstream(entry.model_dump(), http, s.timeout, s.retries,
                                               local_loader=_load_local_model)
    return ups


def create_app(config: Config | None = None) -> FastAPI:
    """The proxy application for ``config`` (default: :func:`proxy.config.load_config`)."""
    config = config if config is not None else load_config()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_logging()
        store = await anyio.to_thread.run_sync(open_store, config.store.url)
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.server.timeout),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        )
        app.state.config = config
        app.state.store = store
        app.state.budget = BudgetService(store)
        app.state.metrics = metrics
        app.state.auth = Authenticator(config)
        app.state.http = http
        app.state.upstreams = _build_upstreams(config, http)
        app.state.tasks = TaskRegistry(config, store, config.server.cache_recheck_seconds)
        app.state.demos = DemoService(config, store, app.state.budget, metrics, app.state.tasks,
                                      local_source=_local_source_factory(app, config))
        app.state.jobs = JobManager.create(store, app.state.budget, config, metrics=metrics)
        if app.state.auth.open:
            log_event("server.open_mode", note="/v1 accepts requests without a key")
        if config.admin_key is None:
            log_event("server.admin_disabled", note="set DPICL_ADMIN_KEY to enable the admin API")
        try:
            yield
        finally:
            for up in app.state.upstreams.values():
                try:
                    await up.aclose()
                except Exception:  # noqa: BLE001 - best effort on shutdown
                    pass
            await http.aclose()
            app.state.demos.close()
            await anyio.to_thread.run_sync(app.state.jobs.close)
            store.close()

    app = FastAPI(title="dpicl proxy", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware, limit=config.server.max_body_bytes, metrics=metrics,
                       access_log=config.server.access_log)

    from proxy.routes_admin import router as admin_router
    from proxy.routes_jobs import router as jobs_router
    from proxy.routes_openai import router as openai_router

    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(jobs_router)

    @app.get("/health/liveness")
    async def liveness() -> Response:
        return Response(dumps({"status": "ok"}), media_type="application/json")

    @app.get("/health/readiness")
    async def readiness(request: Request) -> Response:
        try:
            ok = await anyio.to_thread.run_sync(request.app.state.store.ping)
        except Exception:  # noqa: BLE001 - unreachable store = not ready
            ok = False
        if not ok:
            raise APIError(503, "store unreachable", "store_unavailable")
        return Response(dumps({"status": "ok", "store": "ok"}), media_type="application/json")

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory proxy.app:app_from_env`` (config from ``DPICL_CONFIG``)."""
    return create_app(load_config())
