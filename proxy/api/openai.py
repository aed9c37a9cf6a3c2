"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

A request whose ``model`` is a task gets the task's cached DP demonstrations injected (chat: system
message; completions: prompt prefix) and goes to the task's upstream; any other known model is
forwarded unchanged. The upstream's answer is returned unchanged, so its ``model`` field is the
upstream's model name, not the task name (streams are passed through byte for byte; rewriting
every chunk would cost latency on the hot path). Errors are OpenAI-style bodies.

These are plain Starlette routes (:data:`routes`), not FastAPI ones: they read and validate their
bodies themselves anyway, and skipping FastAPI's per-request dependency and response machinery
saves CPU on the hot path (measured with ``benchmarks/proxy_overhead.py``). Their OpenAPI entries
come from :mod:`proxy.api.openapi`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route

from proxy.api.common import read_json, validate_body
from proxy.api.errors import not_found_model
from proxy.api.schemas import ChatRequest, CompletionRequest
from proxy.auth import Principal
from proxy.task_config import LOCAL_ALIASES, LOCAL_MODEL_NAME, TaskConfig
from proxy.errors import APIError, dumps, error_body
from proxy.serving.injection import check_completion_prompt, inject_chat, inject_completion
from proxy.serving.tasks import task_prompt
from proxy.upstreams.base import StreamError, Upstream, UpstreamError

async def _route(request: Request, model: str, principal: Principal) -> tuple[Upstream, Any]:
    """(upstream, task or None) for a model name, enforcing the caller's permissions."""
    state = request.app.state
    upstream = state.upstreams.get(model)
    if upstream is not None:
        request.state.model = model
        if not principal.passthrough:
            raise APIError(403, f"this key may not use the model '{model}'", "permission_denied", param="model")
        return upstream, None
    task = await state.tasks.get(model)
    if task is None or not principal.may_use_task(model):
        # A task this key may not use is answered exactly like one that does not exist: task names
        # are admin configuration, and a 403 would confirm which ones exist.
        request.state.model = "unknown"
        raise not_found_model(model)
    request.state.model = model
    request.state.task = model
    name = LOCAL_MODEL_NAME if task.upstream in LOCAL_ALIASES else task.upstream
    upstream = state.upstreams.get(name)
    if upstream is None:  # validated at task creation; the config may have changed since
        raise APIError(502, f"task {task.name} names an upstream that is not configured", "upstream_missing")
    return upstream, task


def _label_calls(upstream: Upstream, task: TaskConfig, payload: dict[str, Any], chat: bool) -> tuple[Any, Any]:
    """(call, stream call) answering with one of the set's label words (``answer: label`` tasks).

    The words are public configuration (the task's label words for the labels of the served set), and
    the answer is a function of the DP demonstrations and the client's own input: post-processing.
    """
    answer = getattr(upstream, "label_answer", None)
    answer_stream = getattr(upstream, "label_answer_stream", None)
    if answer is None or answer_stream is None:  # validated at task creation; the config may have changed
        raise APIError(502, f"task {task.name} answers with a label word, which only a local upstream can do",
                       "upstream_unsupported")
    prompt = task_prompt(task)
    words = [prompt.word(label) for label in payload.get("labels") or task.labels or []]
    if not words:
        raise APIError(502, f"task {task.name}: its demonstration set names no labels", "no_labels")
    return (lambda body: answer(body, words, chat)), (lambda body: answer_stream(body, words, chat))


def _code(exc: UpstreamError, status: int) -> str:
    return exc.code or ("upstream_timeout" if status == 504 else "upstream_error")


def _upstream_error(request: Request, model: str, exc: UpstreamError) -> APIError:
    status = exc.status if 400 <= exc.status < 600 else 502
    request.app.state.metrics.upstream_errors.labels(model, str(status)).inc()
    return APIError(status, exc.message, _code(exc, status), exc.type, headers=exc.headers)


async def _respond(request: Request, model: str, call: Any, stream_call: Any, body: dict[str, Any],
                   stream: bool) -> Response:
    if not stream:
        try:
            result = await call(body)
        except UpstreamError as exc:
            raise _upstream_error(request, model, exc) from None
        try:
            payload = dumps(result)
        except TypeError:  # orjson encodes at most 254 levels: an upstream answer nested deeper
            raise _upstream_error(request, model, UpstreamError(
                502, "the upstream's answer nests too deeply to be relayed")) from None
        return Response(payload, media_type="application/json")
    agen = stream_call(body)
    early: StreamError | None = None
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = b"data: [DONE]\n\n"
    except StreamError as exc:
        # The upstream answered 200 but its stream was unusable from the start: still reported in-band.
        first, early = b"", exc
    except UpstreamError as exc:
        raise _upstream_error(request, model, exc) from None
    metrics = request.app.state.metrics

    def in_band(exc: UpstreamError) -> bytes:
        metrics.upstream_errors.labels(model, str(exc.status)).inc()
        return b"data: " + error_body(exc.status, exc.message, _code(exc, exc.status), exc.type) \
            + b"\n\ndata: [DONE]\n\n"

    async def relay() -> AsyncIterator[bytes]:
        if early is not None:
            yield in_band(early)
            return
        yield first
        try:
            async for chunk in agen:
                yield chunk
        except UpstreamError as exc:
            # Headers are sent: report the failure in-band, the way OpenAI streams do.
            yield in_band(exc)

    return StreamingResponse(relay(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_completions(request: Request) -> Response:
    """Chat completion (a task's demonstrations injected as a system message)."""
    principal = request.app.state.auth.client(request)
    request.state.client = principal.name
    body = await read_json(request)
    req: ChatRequest = validate_body(ChatRequest, body, name_param=True)
    upstream, task = await _route(request, req.model, principal)
    if task is not None:
        demos = await request.app.state.demos.for_request(task, principal)
        body = dict(body)
        body["messages"] = inject_chat(body["messages"], demos.prefix)
        if task.answer == "label":
            call, stream_call = _label_calls(upstream, task, demos.payload, chat=True)
            return await _respond(request, req.model, call, stream_call, body, bool(req.stream))
    return await _respond(request, req.model, upstream.chat, upstream.chat_stream, body, bool(req.stream))


async def completions(request: Request) -> Response:
    """Text completion (a task's demonstrations injected as a prompt prefix)."""
    principal = request.app.state.auth.client(request)
    request.state.client = principal.name
    body = await read_json(request)
    req: CompletionRequest = validate_body(CompletionRequest, body, name_param=True)
    upstream, task = await _route(request, req.model, principal)
    if task is not None:
        check_completion_prompt(body["prompt"])
        demos = await request.app.state.demos.for_request(task, principal)
        body = dict(body)
        body["prompt"] = inject_completion(body["prompt"], demos.prefix)
        if task.answer == "label":
            call, stream_call = _label_calls(upstream, task, demos.payload, chat=False)
            return await _respond(request, req.model, call, stream_call, body, bool(req.stream))
    return await _respond(request, req.model, upstream.completion, upstream.completion_stream, body,
                          bool(req.stream))


async def list_models(request: Request) -> Response:
    """The tasks and (for keys allowed to pass through) models this caller may use."""
    principal = request.app.state.auth.client(request)
    request.state.client = principal.name
    state = request.app.state
    data = []
    for name, task in sorted((await state.tasks.all()).items()):
        if principal.may_use_task(name):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "dpicl-task"})
    if principal.passthrough:
        for name in sorted(state.upstreams):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "dpicl"})
    return Response(dumps({"object": "list", "data": data}), media_type="application/json")


class _Route(Route):
    """A Starlette route that records itself in the scope (as FastAPI's routes do), so metrics
    and logs are labelled with its path template."""

    def matches(self, scope: Any) -> tuple[Match, dict[str, Any]]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


#: The OpenAI-compatible routes, added to the app's router as they are.
routes = [
    _Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    _Route("/v1/completions", completions, methods=["POST"]),
    _Route("/v1/models", list_models, methods=["GET"]),
]
