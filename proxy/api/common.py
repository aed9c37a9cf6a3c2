"""Helpers shared by the routers: reading a JSON body, validating it against a pydantic model,
answering JSON, and the admin-key dependency. Errors are OpenAI-style and never echo the body.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response

from proxy.auth import Principal
from proxy.config import format_validation_errors
from proxy.errors import APIError, JSONDecodeError, dumps, loads


#: Deepest nesting of arrays and objects accepted in a JSON body. orjson encodes at most 254
#: levels (a deeper body would fail later, when it is forwarded or stored, as a 500); no OpenAI or
#: admin body comes close to this.
MAX_JSON_DEPTH = 64


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests arrays/objects more than ``limit`` levels deep.

    Iterative (a recursive walk would itself hit Python's recursion limit) and visits containers
    only, so a normal chat body costs a few microseconds.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (415 / 400 / 413 on bad input; never echoes the body)."""
    ctype = request.headers.get("content-type")
    if ctype is not None and "json" not in ctype.split(";", 1)[0].lower():
        raise APIError(415, "Content-Type must be application/json", "unsupported_media_type")
    raw = await request.body()
    if not raw:
        raise APIError(400, "the request body is empty; send a JSON object", "invalid_json")
    try:
        body = loads(raw)
    except (JSONDecodeError, ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    if too_deep(body):
        raise APIError(400, f"the request body nests arrays/objects more than {MAX_JSON_DEPTH} levels deep",
                       "invalid_json")
    return body


def validate_body(model: type | TypeAdapter, body: dict[str, Any], name_param: bool = False,
                  strict: bool = True) -> Any:
    """``body`` as ``model`` (a pydantic model or a TypeAdapter of a union), else an OpenAI-style 400.

    Strict by default: JSON types must match (``"5"`` and ``true`` are not numbers, ``"yes"`` is
    not a boolean). ``name_param``: name the first invalid field in the error's ``param`` (the
    OpenAI routes do).
    """
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(body, strict=strict)
        return model.model_validate(body, strict=strict)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        param = ".".join(str(x) for x in errors[0]["loc"]) if errors and name_param else None
        raise APIError(400, "invalid request: " + format_validation_errors(errors), "invalid_request",
                       param=param) from None


def json_response(obj: Any, status: int = 200) -> Response:
    """``obj`` as a JSON answer."""
    return Response(dumps(obj), status_code=status, media_type="application/json")


def require_admin(request: Request) -> Principal:
    """Dependency of the admin routers: the caller must hold the admin key (401/403 otherwise)."""
    principal = request.app.state.auth.admin(request)
    request.state.client = principal.name
    request.state.model = "-"
    return principal


async def audit(request: Request, action: str, target: str, **details: Any) -> None:
    """Append an admin audit record (docs/admin-api.md): the acting key's name, the action, its
    target and details. Callers pass names, ids and numbers only, never row text."""
    actor = str(getattr(request.state, "client", None) or "admin")
    store = request.app.state.store
    await anyio.to_thread.run_sync(lambda: store.append_audit(actor, action, target, details))
