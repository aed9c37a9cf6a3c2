"""Any litellm-supported provider, through ``litellm.acompletion`` / ``atext_completion``, with our
own retries and timeouts and litellm's responses reduced to plain OpenAI JSON.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx

from proxy.upstreams.base import DONE, RetryingUpstream, StreamError, Transient, UpstreamError, cause_names, \
    connection_failure, dumps, status_error

#: ``litellm_params`` that configure our own retry/timeout handling and are not passed to litellm.
_OWN_PARAMS = frozenset({"timeout", "stream_timeout", "max_retries", "num_retries"})


def _litellm() -> Any:
    """Import litellm lazily (slow import; it must not fetch its cost map from the network)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def _to_dict(obj: Any) -> dict:
    """A litellm response as OpenAI JSON (litellm's ``provider_specific_fields`` extras removed)."""
    data = obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)
    data.pop("provider_specific_fields", None)
    for choice in data.get("choices") or []:
        choice.pop("provider_specific_fields", None)
        if isinstance(choice.get("message"), dict):
            choice["message"].pop("provider_specific_fields", None)
    return data


def _clean_chunk(chunk: Any) -> dict:
    """A litellm stream chunk as OpenAI JSON: drop litellm's null extras, keep the required keys."""
    data = chunk.model_dump(exclude_none=True) if hasattr(chunk, "model_dump") else dict(chunk)
    data.pop("provider_specific_fields", None)
    text_completion = data.get("object") == "text_completion"
    for choice in data.get("choices") or []:
        choice.setdefault("finish_reason", None)
        choice.pop("provider_specific_fields", None)
        if text_completion:
            choice["text"] = choice.get("text") or ""
        else:
            choice.setdefault("delta", {})
            choice["delta"].pop("provider_specific_fields", None)
    return data


#: litellm's prefixes on provider messages ("litellm.RateLimitError: RateLimitError: OpenAIException - ").
_LIB_PREFIX = re.compile(r"^\s*(?:litellm\.)?[A-Za-z]*(?:Error|Exception)\s*(?::|-)\s*")


def plain_message(message: str) -> str:
    """A provider's error message without the library's class-name prefixes."""
    for _ in range(5):
        stripped = _LIB_PREFIX.sub("", message, count=1)
        if stripped == message:
            break
        message = stripped
    return message.strip()


def _has_content(data: dict) -> bool:
    """Whether a cleaned stream chunk carries anything from the model (text, a role, tool calls, usage)."""
    if data.get("usage"):
        return True
    for choice in data.get("choices") or []:
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if any(delta.get(k) for k in ("content", "role", "tool_calls", "function_call", "reasoning_content")):
            return True
    return False


def _response_headers(exc: BaseException) -> dict | None:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
    try:
        return {str(k).lower(): str(v) for k, v in dict(headers).items()} if headers is not None else None
    except (TypeError, ValueError):
        return None


class LiteLLMUpstream(RetryingUpstream):
    """Any litellm-supported provider through ``litellm.acompletion`` / ``atext_completion``.

    ``litellm_params`` other than the retry/timeout settings are passed to litellm and take
    precedence over the client's body (the operator's config wins, as in LiteLLM's router).
    litellm's own retries are disabled; ours apply.
    """

    def __init__(self, name: str, params: dict, timeout: float = 60.0, retries: int = 2, backoff: float = 0.25,
                 max_retry_wait: float = 8.0):
        super().__init__(name, timeout, retries, backoff, max_retry_wait)
        self.model = params["model"]
        self._params = {k: v for k, v in params.items() if k not in _OWN_PARAMS and k != "model"}
        if self._params.get("api_base") and not self._params.get("api_key") and "/" in self.model:
            # A keyless self-hosted server: litellm's openai client would otherwise refuse to run, or
            # send OPENAI_API_KEY from the environment to this api_base. Send a placeholder instead.
            self._params["api_key"] = "no-key"
        self._lib = _litellm()

    def _kwargs(self, body: dict, stream: bool) -> dict:
        kw = {k: v for k, v in body.items() if k not in ("model", "stream")}
        kw.update(self._params)
        kw.update(model=self.model, stream=stream, timeout=self.timeout, num_retries=0, max_retries=0)
        return kw

    def _map(self, exc: BaseException, body: dict) -> UpstreamError:
        lib = self._lib
        if isinstance(exc, UpstreamError):
            return exc
        if isinstance(exc, (asyncio.TimeoutError, lib.exceptions.Timeout, httpx.TimeoutException)):
            return self._timeout_error()
        # A dropped or refused connection reaches us as litellm's "InternalServerError" (status 500):
        # the cause chain says what really happened.
        dropped = connection_failure(self.name, exc)
        if dropped is not None:
            return dropped
        status = getattr(exc, "status_code", None)
        if isinstance(exc, lib.exceptions.APIConnectionError) or not isinstance(status, int):
            # Unknown failures: no details (litellm messages may embed request details).
            return Transient(502, f"the call to upstream {self.name!r} failed")
        if status >= 500 and "HTTPStatusError" not in cause_names(exc):
            # litellm reports an unreadable 200 answer (not JSON, not an object) as its own HTTP 500.
            return UpstreamError(502, f"upstream {self.name!r} returned an answer that could not be read")
        message = plain_message(str(getattr(exc, "message", "") or ""))
        return status_error(status, dumps({"error": {"message": message}}), _response_headers(exc), body, self.name)

    async def _call(self, fn: Callable[..., Awaitable[Any]], kwargs: dict, body: dict) -> Any:
        async def attempt() -> Any:
            try:
                # litellm's timeout is per HTTP call; the outer bound also covers its own overhead.
                return await asyncio.wait_for(fn(**kwargs), self.timeout + 1.0)
            except Exception as exc:  # noqa: BLE001 - every failure is mapped to an UpstreamError
                raise self._map(exc, body) from None

        return await self._with_retries(attempt)

    async def _relay(self, stream: Any, body: dict) -> AsyncIterator[bytes]:
        iterator = stream.__aiter__()
        # Chunks with nothing from the model are held back until one has content: litellm turns an
        # unreadable upstream stream into a lone empty "stop" chunk, which must be an error, not an
        # empty completion.
        held: list[bytes] | None = []
        while True:
            try:
                chunk = await asyncio.wait_for(iterator.__anext__(), self.timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise self._timeout_error(" mid-stream") from None
            except Exception as exc:  # noqa: BLE001
                # After the upstream's 200 only a dropped connection or an unreadable event remains.
                dropped = connection_failure(self.name, exc, mid_stream=True)
                message = dropped.message if dropped else f"upstream {self.name!r} sent an invalid event stream"
                raise StreamError(502, message) from None
            data = _clean_chunk(chunk)
            line = b"data: " + dumps(data) + b"\n\n"
            if held is not None:
                held.append(line)
                if not _has_content(data):
                    continue
                line, held = b"".join(held), None
            yield line
        if held is not None:
            raise StreamError(502, f"upstream {self.name!r} sent an empty or unreadable stream")
        yield DONE

    async def chat(self, body: dict) -> dict:
        return _to_dict(await self._call(self._lib.acompletion, self._kwargs(body, False), body))

    async def chat_stream(self, body: dict) -> AsyncIterator[bytes]:
        stream = await self._call(self._lib.acompletion, self._kwargs(body, True), body)
        async for chunk in self._relay(stream, body):
            yield chunk

    async def completion(self, body: dict) -> dict:
        return _to_dict(await self._call(self._lib.atext_completion, self._kwargs(body, False), body))

    async def completion_stream(self, body: dict) -> AsyncIterator[bytes]:
        stream = await self._call(self._lib.atext_completion, self._kwargs(body, True), body)
        async for chunk in self._relay(stream, body):
            yield chunk
