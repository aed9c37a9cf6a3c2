"""Any litellm-supported provider, through ``litellm.acompletion`` / ``atext_completion``, with our
own retries and timeouts and litellm's responses reduced to plain OpenAI JSON.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx

from proxy.upstreams.base import DONE, RetryingUpstream, Transient, UpstreamError, dumps, status_error

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


class LiteLLMUpstream(RetryingUpstream):
    """Any litellm-supported provider through ``litellm.acompletion`` / ``atext_completion``.

    ``litellm_params`` other than the retry/timeout settings are passed to litellm and take
    precedence over the client's body (the operator's config wins, as in LiteLLM's router).
    litellm's own retries are disabled; ours apply.
    """

    def __init__(self, name: str, params: dict, timeout: float = 60.0, retries: int = 2, backoff: float = 0.25):
        super().__init__(name, timeout, retries, backoff)
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
        status = getattr(exc, "status_code", None)
        if isinstance(exc, lib.exceptions.APIConnectionError) or not isinstance(status, int):
            # Unknown failures: report the type only (litellm messages may embed request details).
            return Transient(502, f"upstream {self.name!r} call failed ({type(exc).__name__})")
        message = str(getattr(exc, "message", "") or "")
        return status_error(status, dumps({"error": {"message": message}}), None, body, self.name)

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
        while True:
            try:
                chunk = await asyncio.wait_for(iterator.__anext__(), self.timeout)
            except StopAsyncIteration:
                break
            except Exception as exc:  # noqa: BLE001
                err = self._map(exc, body)
                raise UpstreamError(err.status, err.message, err.type, err.code) from None
            yield b"data: " + dumps(_clean_chunk(chunk)) + b"\n\n"
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
