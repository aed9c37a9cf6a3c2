"""The FastAPI application: ``create_app(config)`` and the lifespan that wires the service together.

Everything stateful (store, budget service, HTTP client, upstreams, demonstration service, jobs,
metrics, authenticator) is created in the lifespan and lives on ``app.state``; there are no module
globals. The routers are in :mod:`proxy.api`, the request middleware in
:mod:`proxy.api.middleware`.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio
import httpx
from fastapi import FastAPI

from proxy.api.admin import router as admin_router
from proxy.api.budget import router as budget_router
from proxy.api.datasets import UploadsInFlight
from proxy.api.datasets import router as datasets_router
from proxy.api.errors import install_error_handlers
from proxy.api.health import router as health_router
from proxy.api.jobs import router as jobs_router
from proxy.api.keys import router as keys_router
from proxy.api.ui import router as ui_router
from proxy.api.middleware import RequestMiddleware
from proxy.api.openai import routes as openai_routes
from proxy.api.docs import router as docs_router
from proxy.api.openapi import router as openapi_router
from proxy.auth import Authenticator
from proxy.budget import BudgetService
from proxy.gctune import GcGuard
from proxy.config import Config, load_config
from proxy.task_config import LOCAL_MODEL_NAME
from proxy.jobs.manager import JobManager
from proxy.logs import log_event, setup_logging
from proxy.metrics import Metrics
from proxy.serving.demos import DemoService
from proxy.serving.tasks import TaskRegistry
from proxy.store import open_store

#: At shutdown, how long to wait for cancelled uploads to discard their staged rows.
UPLOAD_DRAIN_SECONDS = 15.0


def _local_source_factory(app: FastAPI, config: Config):
    """Load the local generator model once, sharing the local upstream's model when it exposes it."""

    def factory() -> Any:
        from aggregation.sources.local import LocalSource, load_model

        precision = config.server.local_precision
        upstream = app.state.upstreams.get(LOCAL_MODEL_NAME)
        getter = getattr(upstream, "model_and_tokenizer", None) or getattr(upstream, "_load", None)
        if callable(getter) and precision == "float32":
            model, tok = getter()
        else:  # another precision is a model of its own (the upstream answers in float32)
            model, tok = load_model(config.server.local_model, precision)
        return LocalSource(model, tok)

    return factory


def _load_local_model(model_dir: str | None) -> tuple[Any, Any]:
    """The local upstreams' model loader (imported lazily: torch and transformers are slow to import)."""
    from aggregation.sources.local import load_model

    return load_model(model_dir)


def _build_upstreams(config: Config, http: httpx.AsyncClient) -> dict[str, Any]:
    from proxy.upstreams.factory import build_upstream

    s = config.server
    ups: dict[str, Any] = {}
    local_model = "local/" + s.local_model if s.local_model else "local"
    ups[LOCAL_MODEL_NAME] = build_upstream(
        {"model_name": LOCAL_MODEL_NAME, "litellm_params": {"model": local_model}}, http, s.timeout, s.retries,
        local_loader=_load_local_model)
    for entry in config.model_list:
        ups[entry.model_name] = build_upstream(entry.model_dump(), http, s.timeout, s.retries,
                                               local_loader=_load_local_model, max_retry_wait=s.max_retry_wait)
    return ups


async def _refresh_client_keys(app: FastAPI, interval: float) -> None:
    """Keep this replica's copy of the admin-created client keys fresh (see proxy.auth)."""
    while True:
        await anyio.sleep(interval)
        try:
            records = await anyio.to_thread.run_sync(app.state.store.list_client_keys)
        except Exception as exc:  # noqa: BLE001 - a store hiccup: keep the last copy, try again
            log_event("keys.refresh_failed", error=type(exc).__name__)
            continue
        app.state.auth.load_stored(records)


async def _watch_gc(guard: GcGuard, interval: float = 1.0) -> None:
    """Let the GC guard re-freeze after slow full collections (from the loop, not inside the collector)."""
    try:
        while True:
            await asyncio.sleep(interval)
            if guard.tick():
                log_event("server.gc_refrozen", refreezes=guard.refreezes)
    finally:
        guard.stop()


def create_app(config: Config | None = None, freeze_gc: bool = False) -> FastAPI:
    """The proxy application for ``config`` (default: :func:`proxy.config.load_config`).

    ``freeze_gc`` (set by ``dpicl serve``): freeze the startup heap out of the garbage collector's
    way, and re-freeze after slow full collections (lazily imported torch, a loaded model); see
    :mod:`proxy.gctune`: full collections were most of the latency tail. Left off for tests, which
    build many apps in one process.
    """
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
        try:
            app.state.auth.load_stored(await anyio.to_thread.run_sync(store.list_client_keys))
        except Exception as exc:  # noqa: BLE001 - a store that is down now: start (readiness says 503), retry later
            log_event("keys.load_failed", error=type(exc).__name__)
        app.state.http = http
        app.state.upstreams = _build_upstreams(config, http)
        app.state.tasks = TaskRegistry(config, store, config.server.cache_recheck_seconds)
        app.state.demos = DemoService(config, store, app.state.budget, metrics, app.state.tasks,
                                      local_source=_local_source_factory(app, config))
        app.state.uploads = UploadsInFlight()
        app.state.jobs = JobManager.create(store, app.state.budget, config, metrics=metrics)
        try:  # warm-ups our previous incarnation held: queued ones run here, running ones are lost
            await anyio.to_thread.run_sync(app.state.demos.warmups.recover)
        except Exception as exc:  # noqa: BLE001 - a store that is down now: readers settle them later
            log_event("warmup.recover_failed", error=type(exc).__name__)
        if app.state.auth.open:
            log_event("server.open_mode", note="/v1 accepts requests without a key")
        if config.admin_key is None:
            log_event("server.admin_disabled", note="set DPICL_ADMIN_KEY to enable the admin API")
        keys_task = asyncio.create_task(_refresh_client_keys(app, max(0.5, config.server.cache_recheck_seconds)))
        guard_task = None
        if freeze_gc:
            guard = GcGuard()
            guard.start()
            guard_task = asyncio.create_task(_watch_gc(guard))
        try:
            yield
        finally:
            keys_task.cancel()
            if guard_task is not None:
                guard_task.cancel()
            for up in app.state.upstreams.values():
                try:
                    await up.aclose()
                except Exception:  # noqa: BLE001 - best effort on shutdown
                    pass
            await http.aclose()
            app.state.demos.close()
            await anyio.to_thread.run_sync(app.state.jobs.close)
            # Uploads cancelled by the shutdown may still be discarding their staged rows in a
            # thread: closing the store under it could crash the process. If one is stuck, leave
            # the store open (the process is ending; its rows are swept on the next start).
            if await app.state.uploads.drain(UPLOAD_DRAIN_SECONDS):
                store.close()
            else:
                log_event("server.uploads_left", note="store left open; staged rows are swept on the next start")

    app = FastAPI(title="dpicl proxy", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.config = config  # also before the lifespan: servers read their HTTP settings from it
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware, limit=config.server.max_body_bytes, metrics=metrics,
                       access_log=config.server.access_log, body_timeout=config.server.body_timeout)

    app.router.routes.extend(openai_routes)
    app.include_router(admin_router)
    app.include_router(datasets_router)
    app.include_router(budget_router)
    app.include_router(jobs_router)
    app.include_router(keys_router)
    app.include_router(ui_router)
    app.include_router(health_router)
    app.include_router(openapi_router)
    app.include_router(docs_router)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory proxy.app:app_from_env`` (config from ``DPICL_CONFIG``), as
    ``dpicl serve --workers N`` runs it in each worker process."""
    from proxy.logs import server_logging

    server_logging()  # each worker process: JSON lines only
    return create_app(load_config(), freeze_gc=True)
