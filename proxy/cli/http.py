"""The admin CLI's HTTP client: where the server is, the admin key, and errors as one line.

Every admin command (datasets, budget, tasks, keys, jobs) goes through :class:`AdminClient`, so an
unreachable server, a refused key or an error answer always ends the same way: one line on stderr
(``error: ...``) and exit status 1. Nothing here prints a traceback.
"""

from __future__ import annotations

import math
import os
from typing import Any, NoReturn, Optional

import httpx
import typer

DEFAULT_URL = "http://127.0.0.1:8000"

URL_OPTION = typer.Option(None, "--url", help="Server URL (default: $DPICL_URL or http://127.0.0.1:8000).")
KEY_OPTION = typer.Option(None, "--admin-key", help="Admin key (default: $DPICL_ADMIN_KEY).")
JSON_OPTION = typer.Option(False, "--json", help="Print the server's JSON answer instead of a table.")


def die(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def error_line(resp: httpx.Response) -> str:
    """One line describing an error answer (OpenAI-style body when there is one)."""
    try:
        err = resp.json()["error"]
        message, code = str(err.get("message") or "").strip(), err.get("code")
    except Exception:  # noqa: BLE001 - not an OpenAI-style body (a proxy in between, an old server)
        message, code = " ".join(resp.text.split())[:200], None
    line = f"HTTP {resp.status_code}: {message or resp.reason_phrase}"
    if code:
        line += f" ({code})"
    if resp.status_code == 401:
        line += "; check --admin-key / DPICL_ADMIN_KEY (it must equal the server's DPICL_ADMIN_KEY)"
    elif resp.status_code == 403:
        line += "; that is a client key, the admin commands need the admin key"
    return line


def non_finite_field(value: Any, where: str = "") -> str | None:
    """The path of the first inf/nan number in a JSON body (JSON cannot carry them), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the body"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite_field(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class AdminClient:
    """A small synchronous client of the admin API (use as a context manager)."""

    def __init__(self, url: Optional[str] = None, admin_key: Optional[str] = None, timeout: float = 120.0):
        self.url = (url or os.environ.get("DPICL_URL") or DEFAULT_URL).rstrip("/")
        key = admin_key or os.environ.get("DPICL_ADMIN_KEY")
        if not key:
            die("the admin key is needed: set DPICL_ADMIN_KEY (or pass --admin-key)", 2)
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._http.close()

    def send(self, method: str, path: str, ok_missing: bool = False, **kwargs: Any) -> httpx.Response:
        """The response of one request; exits with one line on a transport error or an error answer.

        ``ok_missing``: hand back a 404/405 answer instead of exiting (to fall back to older routes).
        """
        bad = non_finite_field(kwargs.get("json"))
        if bad:  # from --file specs and --param/--gen values: one line, not an encoder traceback
            die(f"{bad} must be a finite number (inf and nan cannot be sent)", 2)
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            die(f"the dpicl server at {self.url} did not answer in time")
        except httpx.TransportError:
            die(f"cannot reach a dpicl server at {self.url} (is 'dpicl serve' running? set DPICL_URL or --url)")
        if resp.status_code >= 400 and not (ok_missing and resp.status_code in (404, 405)):
            die(error_line(resp))
        return resp

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET ``path`` and return the JSON answer."""
        return self.send("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        """POST ``path`` and return the JSON answer."""
        return self.send("POST", path, **kwargs).json()

    def put(self, path: str, **kwargs: Any) -> Any:
        """PUT ``path`` and return the JSON answer."""
        return self.send("PUT", path, **kwargs).json()

    def delete(self, path: str, **kwargs: Any) -> Any:
        """DELETE ``path`` and return the JSON answer."""
        return self.send("DELETE", path, **kwargs).json()
