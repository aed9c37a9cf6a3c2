"""``dpicl serve``: run the proxy with uvicorn (JSON log lines only)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer


def is_loopback(host: str) -> bool:
    """Does binding ``host`` keep the server reachable from this machine only?"""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public interface


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file (default: $DPICL_CONFIG; none = defaults)."),
    workers: int = typer.Option(1, min=1, help="Worker processes sharing the port (state is in the store; "
                                               "each keeps its own in-memory caches)."),
    log_level: str = typer.Option("info", help="Log level of the server's JSON log lines."),
) -> None:
    """Serve the OpenAI-compatible proxy, the admin API and the admin console (/admin/ui).

    With no config it starts on SQLite (in $DPICL_DATA_DIR) with the built-in local model,
    exposed as local/smollm2. The admin API needs DPICL_ADMIN_KEY, and so does any --host other
    than a loopback address (without an admin key the server runs open).
    """
    import uvicorn

    from proxy.config import ConfigError, load_config
    from proxy.logs import server_logging

    if config is not None:
        os.environ["DPICL_CONFIG"] = str(config.expanduser().resolve())
    try:
        cfg = load_config()  # validate now so errors are one clear line, not a traceback
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2)
    if cfg.admin_key is None and not is_loopback(host):
        # Without an admin key /v1 needs no client key: never expose that beyond this machine.
        typer.echo(f"error: refusing to listen on {host} without an admin key: set DPICL_ADMIN_KEY "
                   "(or serve on 127.0.0.1)", err=True)
        raise typer.Exit(code=2)
    try:  # a store that cannot be opened (bad URL scheme, unwritable path, old schema): one line too
        from proxy.store import open_store

        open_store(cfg.store.url).close()
    except Exception as exc:  # noqa: BLE001 - store messages never echo a URL's password
        typer.echo(f"error: store.url (or DPICL_STORE_URL): {exc}", err=True)
        raise typer.Exit(code=2)
    log_config = server_logging()  # before the app (and transformers) are imported
    from proxy.httpguard import http_protocol

    # uvicorn's HTTP protocol with a deadline for request headers (slow-header clients are closed).
    # timeout_graceful_shutdown: after SIGTERM, requests still running after the grace period are
    # cancelled (an upload between two chunks discards its staged rows), so shutdown is bounded.
    common = dict(host=host, port=port, log_level=log_level, access_log=False, proxy_headers=False,
                  log_config=log_config, http=http_protocol(cfg.server.header_timeout),
                  timeout_graceful_shutdown=cfg.server.shutdown_grace_seconds)
    if workers == 1:
        from proxy.app import create_app

        uvicorn.run(create_app(cfg, freeze_gc=True), **common)
    else:
        # Each worker process builds its own app from the environment (DPICL_CONFIG), and writes
        # its metrics to a directory that /metrics (in any worker) adds up.
        from proxy.metrics import MULTIPROC_ENV

        own_dir = None
        if not os.environ.get(MULTIPROC_ENV):
            own_dir = tempfile.mkdtemp(prefix="dpicl-metrics-")
            os.environ[MULTIPROC_ENV] = own_dir
        try:
            uvicorn.run("proxy.app:app_from_env", factory=True, workers=workers, **common)
        finally:
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``dpicl`` app."""
    app.command("serve")(serve)
