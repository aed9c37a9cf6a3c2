"""``GET /admin/openapi.json``: the live server's OpenAPI document (admin key required; the same
document is public at ``/openapi.json`` for the Swagger UI at ``/docs``, see proxy/api/docs.py).

The routes read their bodies themselves (``read_json`` + ``validate_body``, so that errors never
echo input and requests are forwarded unchanged), which hides the bodies from FastAPI's generator.
:data:`BODIES` names the pydantic model each route validates, and :func:`build_openapi` puts them
in the document, with the bearer security scheme and the OpenAI-style error body as every
operation's ``default`` response. A POST/PUT/PATCH route missing from the table is documented as
taking any JSON object, so the document stays complete when routes are added.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from starlette.responses import Response
from starlette.routing import Route

from proxy.api.common import json_response, require_admin
from proxy.api.keys import KeyCreate
from proxy.api.schemas import (
    MAX_BUDGET_EPSILON, MIN_BUDGET_EPSILON, BudgetReset, BudgetUpdate, ChatRequest, CompletionRequest, WarmRequest,
)
from proxy.task_config import TaskConfig
from proxy.jobs.requests import JobRequest

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

_REF = "#/components/schemas/{model}"
#: (method, path template) -> the model its JSON body is validated against.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/chat/completions"): ChatRequest,
    ("POST", "/v1/completions"): CompletionRequest,
    ("PUT", "/admin/datasets/{dataset_id}/budget"): BudgetUpdate,
    ("PUT", "/admin/budget/{name}"): BudgetUpdate,
    ("POST", "/admin/budget/{name}/reset"): BudgetReset,
    ("POST", "/admin/keys"): KeyCreate,
    ("POST", "/admin/tasks"): TaskConfig,
    ("POST", "/admin/tasks/{name}/demos"): WarmRequest,
    ("POST", "/admin/jobs"): JobRequest,
}
#: Routes whose JSON body is optional (an empty body means the model's defaults).
OPTIONAL_BODIES = frozenset({("POST", "/admin/tasks/{name}/demos")})
#: Routes that take no body at all.
NO_BODY = frozenset({("POST", "/admin/jobs/{job_id}/cancel"), ("POST", "/admin/warmups/{wid}/cancel")})
#: Multipart uploads: (method, path) -> form fields (all strings except ``file``).
FORMS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/admin/datasets"): {
        "required": ["file", "name"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "JSONL or CSV with text,label"},
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
            "labels": {"type": "string", "description": "the label domain: a JSON list or comma-separated "
                                                        "(required unless public)"},
            "epsilon": {"type": "number", "minimum": MIN_BUDGET_EPSILON, "maximum": MAX_BUDGET_EPSILON,
                        "description": "the dataset name's budget (its first upload sets it)"},
            "delta": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "public": {"type": "string", "enum": ["true", "false"]},
            "deduplicate": {"type": "string", "enum": ["true", "false"]},
        },
    },
}
#: Responses that are not JSON: (method, path) -> content types of the 200 answer.
CONTENT: dict[tuple[str, str], list[str]] = {
    ("POST", "/v1/chat/completions"): ["application/json", "text/event-stream"],
    ("POST", "/v1/completions"): ["application/json", "text/event-stream"],
    ("GET", "/metrics"): ["text/plain"],
    ("GET", "/admin/jobs/{job_id}/result"): ["application/jsonl", "application/zip", "application/octet-stream"],
}
#: Success statuses other than 200: (method, path) -> statuses (their bodies are JSON objects).
SUCCESS: dict[tuple[str, str], tuple[int, ...]] = {
    ("POST", "/admin/datasets"): (201,),
    ("POST", "/admin/tasks"): (201,),
    ("POST", "/admin/keys"): (201,),
    ("POST", "/admin/jobs"): (201,),
    ("POST", "/admin/tasks/{name}/demos"): (200, 202),  # 200: priced (dry run) or finished (wait)
    ("POST", "/admin/warmups/{wid}/cancel"): (200, 202),  # 200: was queued; 202: stop requested
}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def _schema(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of a model (or a union) with its definitions moved into ``components``."""
    adapter = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    schema = adapter.json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    name = getattr(model, "__name__", None)
    if name and schema.get("type") == "object":
        components[name] = schema
        return {"$ref": _REF.format(model=name)}
    return schema


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes with their request bodies and error responses."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="dpicl proxy: OpenAI-compatible routes (/v1) and the admin API (/admin).")
    # Plain Starlette routes (the /v1 hot path) are not in FastAPI's document: add them.
    paths = doc.setdefault("paths", {})
    for route in app.routes:
        if isinstance(route, Route) and not isinstance(route, APIRoute) and route.include_in_schema:
            summary = ((route.endpoint.__doc__ or "").strip().splitlines() or [route.name])[0]
            for method in sorted((route.methods or set()) - {"HEAD"}):
                paths.setdefault(route.path, {})[method.lower()] = {
                    "summary": summary, "operationId": f"{route.name}_{method.lower()}"}
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            key = (method.upper(), path)
            # Our error handler answers 400 for every invalid input; FastAPI's 422 never happens.
            op.get("responses", {}).pop("422", None)
            content = {ct: {} for ct in CONTENT.get(key, ["application/json"])}
            responses: dict[str, Any] = {}
            for status in SUCCESS.get(key, (200,)):
                described = {200: "success", 201: "created", 202: "accepted (queued)"}[status]
                body = {"application/json": {"schema": {"type": "object"}}} if key in SUCCESS else content
                responses[str(status)] = {"description": described, "content": body}
            responses["default"] = {"description": "an OpenAI-style error",
                                    "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}
            op["responses"] = responses
            if path.startswith("/admin") or path.startswith("/v1"):
                op["security"] = [{"bearer": []}]
            if key in FORMS:
                op["requestBody"] = {"required": True, "content": {"multipart/form-data": {
                    "schema": {"type": "object", **FORMS[key]}}}}
            elif key in BODIES:
                op["requestBody"] = {"required": key not in OPTIONAL_BODIES, "content": {
                    "application/json": {"schema": _schema(BODIES[key], schemas)}}}
            elif method in ("post", "put", "patch") and key not in NO_BODY:
                op["requestBody"] = {"required": False, "content": {"application/json": {
                    "schema": {"type": "object"}}}}
    return doc


def cached_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, built once (the routes do not change while it runs)."""
    doc = getattr(app.state, "openapi_doc", None)
    if doc is None:
        doc = app.state.openapi_doc = build_openapi(app)
    return doc


@router.get("/openapi.json")
async def openapi_document(request: Request) -> Response:
    """The OpenAPI document (the same as the public ``/openapi.json``; proxy/api/docs.py)."""
    return json_response(cached_openapi(request.app))
