"""The admin console: static files (HTML, JS, CSS, vendored uPlot) under ``/admin/ui``.

The files hold no data and need no key; the page asks for the admin key, keeps it in the tab's
``sessionStorage`` and calls the same admin API as the CLI. Only the files shipped in
``proxy/ui`` are served (a fixed list read at import, so no path can reach anything else).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import RedirectResponse, Response

from proxy.errors import APIError

router = APIRouter(prefix="/admin/ui")

_ROOT = Path(__file__).resolve().parent.parent / "ui"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
#: url path -> file; only files with a known type (licences and notes are not served).
FILES = {p.relative_to(_ROOT).as_posix(): p for p in sorted(_ROOT.rglob("*")) if p.is_file() and p.suffix in _TYPES}

#: The console loads only its own files; inline styles are allowed for the chart library's
#: element sizing. No framing (clickjacking), no referrer, no caching of the pages.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@router.get("", include_in_schema=False)
async def console_root() -> Response:
    return RedirectResponse("/admin/ui/", status_code=307)


@router.get("/", include_in_schema=False)
async def console_index() -> Response:
    return _serve("index.html")


@router.get("/{path:path}", include_in_schema=False)
async def console_file(path: str) -> Response:
    return _serve(path)


def _serve(path: str) -> Response:
    file = FILES.get(path)
    if file is None:
        raise APIError(404, "no such console file", "not_found")
    return Response(file.read_bytes(), media_type=_TYPES[file.suffix], headers=_HEADERS)
