"""``/docs``: FastAPI's Swagger UI for the admin, and ``/openapi.json``, the document it reads.

Both hold no data, so both are public, as in any FastAPI app: the document is built from the
routes and request models only (the same document as the admin-only ``/admin/openapi.json``;
``tests/test_openapi.py`` checks that it does not change with the configuration or the stored
datasets, tasks and keys). The admin clicks "Authorize" and enters the admin key: every /admin
and /v1 operation declares the bearer security scheme, so "Try it out" sends
``Authorization: Bearer KEY``. Swagger UI keeps the key in the page only (``persistAuthorization``
off: a reload forgets it, nothing is written to the browser's storage).

Swagger UI's script and stylesheet are the copy the ``litellm`` package ships (a dependency), so
the page works offline; if that copy is missing, FastAPI's default CDN links are used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import Response

from proxy.api.common import json_response
from proxy.api.openapi import cached_openapi
from proxy.errors import APIError

router = APIRouter()

_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}
_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
#: The page's inline start-up script is FastAPI's; no framing (clickjacking), no referrer.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
                                "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: "
                                "https://fastapi.tiangolo.com; connect-src 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def swagger_assets() -> dict[str, Path]:
    """Swagger UI's files as shipped inside the installed litellm package (empty if absent)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0]) / "proxy" / "swagger"
    return {name: folder / name for name in _ASSETS if (folder / name).is_file()}


_FILES = swagger_assets()


@router.get("/openapi.json", include_in_schema=False)
async def public_openapi(request: Request) -> Response:
    """The OpenAPI document: routes and request models only, no data."""
    return json_response(cached_openapi(request.app))


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> Response:
    """Swagger UI over ``/openapi.json``; "Authorize" takes the admin key."""
    local = len(_FILES) == len(_ASSETS)
    page = get_swagger_ui_html(
        openapi_url="/openapi.json", title=f"{request.app.title} - API",
        swagger_ui_parameters={"persistAuthorization": False, "displayRequestDuration": True},
        **({"swagger_js_url": "/docs/swagger-ui-bundle.js", "swagger_css_url": "/docs/swagger-ui.css",
            "swagger_favicon_url": "/docs/favicon.png"} if local else {}),
    )
    return Response(page.body, media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/docs/{name}", include_in_schema=False)
async def swagger_file(name: str) -> Response:
    """One of Swagger UI's own files (a fixed list: no path reaches anything else)."""
    file = _FILES.get(name)
    if file is None:
        raise APIError(404, "no such file", "not_found")
    return Response(file.read_bytes(), media_type=_TYPES[file.suffix], headers={"Cache-Control": "max-age=3600"})
