"""Upstream models the proxy forwards requests to: any provider through litellm, a direct HTTP fast
path for OpenAI-compatible servers, and the built-in local model (``proxy.local_llm``).

Contract for callers (the FastAPI app):

- ``build_upstream(entry, http, timeout, retries)`` turns one LiteLLM-style ``model_list`` item into
  an :class:`Upstream`. **The upstream rewrites ``body["model"]`` itself** (on a copy) from
  ``litellm_params["model"]``, so callers may pass the client's body as is; the caller's dict is
  never mutated.
- ``chat``/``completion`` return OpenAI JSON dicts. ``chat_stream``/``completion_stream`` are async
  generators of SSE bytes ending with ``data: [DONE]``. Connecting, retrying and checking the
  upstream's status all happen before the first chunk is yielded, so an :class:`UpstreamError` raised
  by the first ``__anext__()`` can still become a normal HTTP error response; a later one (the
  upstream died mid-stream) can only be reported in-band, e.g. with :func:`sse_error`.
- Every failure is an :class:`UpstreamError` (502 unreachable / 5xx after retries, 504 timeout, or
  the upstream's own 4xx). Its message never contains prompt text: upstream messages are truncated
  and withheld entirely when they quote any part of the request (:func:`safe_upstream_message`),
  because the request carries our injected DP demonstrations and the client's private input.
- Secrets come only from the environment: ``api_key: os.environ/NAME`` (any ``litellm_params`` value
  of that form is resolved); a literal ``api_key`` in the config is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

import httpx

try:  # orjson is a faster drop-in for the hot path; json is the fallback.
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_PREFIX = "os.environ/"
DONE = b"data: [DONE]\n\n"
#: Longest upstream error message passed on to clients.
MAX_ERROR_CHARS = 300
#: A run of this many characters shared by an error message and the request counts as quoting it.
_QUOTE_WINDOW = 16
#: ``litellm_params`` the direct HTTP path understands; any other key means "use litellm".
FAST_PATH_PARAMS = frozenset({"model", "api_base", "api_key", "timeout", "stream_timeout", "max_retries",
                              "num_retries", "extra_headers", "organization"})
#: ``litellm_params`` that configure our own retry/timeout handling and are not passed to litellm.
_OWN_PARAMS = frozenset({"timeout", "stream_timeout", "max_retries", "num_retries"})


# -- errors --------------------------------------------------------------------------------------------
class UpstreamError(Exception):
    """An upstream failure mapped to an HTTP status (502, 504, or the upstream's 4xx).

    ``message`` is safe to show to clients and to log: it never contains prompt text.
    """

    def __init__(self, status: int, message: str, type: str = "upstream_error", code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code

    def to_dict(self) -> dict:
        """OpenAI-style error body."""
        return {"error": {"message": self.message, "type": self.type, "param": None,
                          "code": self.code or str(self.status)}}


class _Transient(UpstreamError):
    """A failure worth retrying (connection error, 5xx, 429); becomes an UpstreamError when retries run out."""

    def __init__(self, status: int, message: str, type: str = "upstream_error", retry_after: float | None = None):
        super().__init__(status, message, type)
        self.retry_after = retry_after


def sse_error(err: UpstreamError) -> bytes:
    """An in-band SSE error event plus ``[DONE]``, for failures after a stream has started."""
    return b"data: " + _dumps(err.to_dict()) + b"\n\n" + DONE


def _request_texts(body: dict | None) -> list[str]:
    """Every piece of free text in a request body (message contents, prompts)."""
    if not body:
        return []
    texts: list[str] = []
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list):
        texts.extend(p for p in prompt if isinstance(p, str))
    for key in ("suffix", "system"):
        if isinstance(body.get(key), str):
            texts.append(body[key])
    return [t for t in texts if t]


def safe_upstream_message(message: str, body: dict | None, status: int) -> str:
    """The upstream's error message, truncated, or withheld when it quotes the request.

    Some providers echo offending input in their errors; the request contains our injected
    demonstrations and the client's text, so any overlap of ``_QUOTE_WINDOW`` characters (or a whole
    short request text) withholds the message. Conservative on purpose: a false positive only costs
    detail in an error message.
    """
    message = (message or "").strip()[:MAX_ERROR_CHARS]
    texts = _request_texts(body)
    if texts and message:
        joined = "\x00".join(texts)
        normalised = joined.replace("\n", "\\n")  # providers often quote with escapes (repr/JSON)
        leak = any(len(t) >= 6 and t in message for t in texts)
        for i in range(0, max(0, len(message) - _QUOTE_WINDOW + 1)):
            if leak:
                break
            window = message[i:i + _QUOTE_WINDOW]
            leak = window in joined or window in normalised
        if leak:
            return f"upstream rejected the request (HTTP {status}); its message quoted the request and was withheld"
    return message or f"upstream returned HTTP {status}"


def _status_error(status: int, content: bytes, headers: Mapping[str, str] | None, body: dict | None,
                  name: str) -> UpstreamError:
    """Map an upstream HTTP error status to the error we raise."""
    message, type_ = "", None
    try:
        data = _loads(content)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message, type_ = str(err.get("message") or err.get("detail") or ""), err.get("type")
        elif isinstance(err, str):
            message = err
    except ValueError:
        message = content[:MAX_ERROR_CHARS].decode("utf-8", "replace")
    message = safe_upstream_message(message, body, status)
    if status >= 500:
        return _Transient(502, f"upstream {name!r} failed (HTTP {status}): {message}", "upstream_error")
    if status == 429:
        return _Transient(429, f"upstream {name!r} rate-limited the request: {message}", "rate_limit_error",
                          _retry_after(headers))
    if status in (401, 403):
        # The proxy's own upstream credentials were refused: a proxy misconfiguration, not the
        # client's fault, so it is a 502 rather than the client-facing 401/403.
        return UpstreamError(502, f"upstream {name!r} refused the proxy's credentials (HTTP {status})",
                             "upstream_auth_error")
    return UpstreamError(status, message, type_ if isinstance(type_, str) else "invalid_request_error")


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    try:
        return float(headers["retry-after"]) if headers and "retry-after" in headers else None
    except ValueError:
        return None


# -- config helpers ----------------------------------------------------------------------------------
def resolve_env(value: Any, what: str) -> Any:
    """Resolve an ``os.environ/NAME`` reference; other values are returned unchanged."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        var = value[len(ENV_PREFIX):]
        resolved = os.environ.get(var)
        if resolved is None:
            raise ValueError(f"{what} refers to environment variable {var}, which is not set")
        return resolved
    return value


def resolve_params(params: dict, model_name: str) -> dict:
    """Resolve ``os.environ/`` references in ``litellm_params``; refuse literal API keys."""
    out: dict = {}
    for key, value in params.items():
        if key == "api_key" and value is not None and not (isinstance(value, str) and value.startswith(ENV_PREFIX)):
            raise ValueError(f"model {model_name!r}: api_key must be given as os.environ/NAME "
                             "(secrets are read from the environment only)")
        out[key] = resolve_env(value, f"model {model_name!r} litellm_params.{key}")
    return out


class Upstream(ABC):
    """One model the proxy can forward to; ``name`` is the model name clients send."""

    name: str

    @abstractmethod
    async def chat(self, body: dict) -> dict:
        """Non-streaming chat completion; returns OpenAI ``chat.completion`` JSON."""

    @abstractmethod
    def chat_stream(self, body: dict) -> AsyncIterator[bytes]:
        """Streaming chat completion as SSE bytes ending with ``data: [DONE]``."""

    @abstractmethod
    async def completion(self, body: dict) -> dict:
        """Non-streaming text completion; returns OpenAI ``text_completion`` JSON."""

    @abstractmethod
    def completion_stream(self, body: dict) -> AsyncIterator[bytes]:
        """Streaming text completion as SSE bytes ending with ``data: [DONE]``."""

    async def aclose(self) -> None:
        """Release resources owned by this upstream (never a client passed in by the caller)."""


class _RetryingUpstream(Upstream):
    """Retry with exponential backoff and jitter on transient failures, shared by the remote upstreams."""

    def __init__(self, name: str, timeout: float, retries: int, backoff: float):
        self.name = name
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)

    def _delay(self, attempt: int, err: _Transient) -> float:
        cap = 8.0
        hinted = err.retry_after
        if hinted is not None:
            return min(cap, max(0.0, hinted))
        # "Full jitter" between half and all of base * 2^attempt, so replicas do not retry in lockstep.
        return min(cap, self.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)

    async def _with_retries(self, attempt: Callable[[], Awaitable[T]]) -> T:
        for i in range(self.retries + 1):
            try:
                return await attempt()
            except _Transient as err:
                if i == self.retries:
                    raise UpstreamError(err.status, err.message, err.type, err.code) from None
                log.info("upstream %s transient failure (%s), retry %d/%d", self.name, err.status, i + 1, self.retries)
                await asyncio.sleep(self._delay(i, err))
        raise AssertionError("unreachable")  # pragma: no cover

    def _timeout_error(self, where: str = "") -> UpstreamError:
        return UpstreamError(504, f"upstream {self.name!r} timed out after {self.timeout:g}s{where}", "timeout")


# -- direct HTTP fast path -----------------------------------------------------------------------------
class OpenAIHTTPUpstream(_RetryingUpstream):
    """OpenAI-compatible server over a shared, pooled ``httpx.AsyncClient``: bodies pass through with
    only ``model`` rewritten, and streamed SSE bytes are relayed unchanged (decoded from any
    content-encoding)."""

    #: Whether this class talks through ``self.http`` (subclasses with their own client set False).
    _uses_httpx = True

    def __init__(self, name: str, model: str, api_base: str, api_key: str | None = None,
                 http: httpx.AsyncClient | None = None, timeout: float = 60.0, retries: int = 2,
                 backoff: float = 0.25, extra_headers: dict | None = None, organization: str | None = None):
        super().__init__(name, timeout, retries, backoff)
        self.model = model
        self._owns_http = http is None and self._uses_httpx
        self.http = http
        if self._owns_http:
            self.http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64), timeout=self.timeout)
        base = api_base.rstrip("/")
        self._chat_url = base + "/chat/completions"
        self._completion_url = base + "/completions"
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        if organization:
            self._headers["openai-organization"] = organization
        self._headers.update({str(k): str(v) for k, v in (extra_headers or {}).items()})
        self._stream_headers = {**self._headers, "accept": "text/event-stream"}
        self._http_timeout = httpx.Timeout(self.timeout)

    def _payload(self, body: dict, stream: bool) -> bytes:
        out = dict(body)
        out["model"] = self.model
        if stream:
            out["stream"] = True
        else:
            out.pop("stream", None)
        return _dumps(out)

    async def _post(self, url: str, body: dict) -> dict:
        payload = self._payload(body, stream=False)

        async def attempt() -> dict:
            try:
                r = await self.http.post(url, content=payload, headers=self._headers, timeout=self._http_timeout)
            except httpx.TimeoutException:
                raise self._timeout_error() from None
            except httpx.TransportError as exc:
                raise _Transient(502, f"could not reach upstream {self.name!r} ({type(exc).__name__})") from None
            if r.status_code >= 400:
                raise _status_error(r.status_code, r.content, r.headers, body, self.name)
            try:
                return _loads(r.content)
            except ValueError:
                raise UpstreamError(502, f"upstream {self.name!r} returned invalid JSON") from None

        return await self._with_retries(attempt)

    async def _stream(self, url: str, body: dict) -> AsyncIterator[bytes]:
        payload = self._payload(body, stream=True)

        async def attempt() -> httpx.Response:
            request = self.http.build_request("POST", url, content=payload, headers=self._stream_headers,
                                              timeout=self._http_timeout)
            try:
                resp = await self.http.send(request, stream=True)
            except httpx.TimeoutException:
                raise self._timeout_error() from None
            except httpx.TransportError as exc:
                raise _Transient(502, f"could not reach upstream {self.name!r} ({type(exc).__name__})") from None
            if resp.status_code >= 400:
                try:
                    content = await resp.aread()
                except httpx.HTTPError:
                    content = b""
                finally:
                    await resp.aclose()
                raise _status_error(resp.status_code, content, resp.headers, body, self.name)
            return resp

        resp = await self._with_retries(attempt)
        try:
            async for chunk in resp.aiter_bytes():
                if chunk:
                    yield chunk
        except httpx.TimeoutException:
            raise self._timeout_error(" mid-stream") from None
        except httpx.TransportError as exc:
            raise UpstreamError(502, f"upstream {self.name!r} stream broke ({type(exc).__name__})") from None
        finally:
            await resp.aclose()

    async def chat(self, body: dict) -> dict:
        return await self._post(self._chat_url, body)

    def chat_stream(self, body: dict) -> AsyncIterator[bytes]:
        return self._stream(self._chat_url, body)

    async def completion(self, body: dict) -> dict:
        return await self._post(self._completion_url, body)

    def completion_stream(self, body: dict) -> AsyncIterator[bytes]:
        return self._stream(self._completion_url, body)

    async def aclose(self) -> None:
        if self._owns_http and self.http is not None:
            await self.http.aclose()


class AiohttpOpenAIUpstream(OpenAIHTTPUpstream):
    """The fast path on an ``aiohttp`` session owned by this upstream instead of the shared httpx client.

    Same behaviour as :class:`OpenAIHTTPUpstream`; chosen by default because aiohttp's client costs
    far less CPU per request (measured in ``benchmarks/proxy_overhead.py``: in-process against the
    same fake upstream it served several times httpx's requests/s, and the gap widens with
    concurrency). The session is created lazily inside the running event loop (aiohttp requires it).
    """

    _uses_httpx = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._session: Any = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, keepalive_timeout=30),
                # sock_read bounds the wait for each chunk, like httpx's read timeout.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
            )
            self._session_loop = loop
        return self._session

    async def _post(self, url: str, body: dict) -> dict:
        import aiohttp

        payload = self._payload(body, stream=False)

        async def attempt() -> dict:
            try:
                async with self._client().post(url, data=payload, headers=self._headers) as r:
                    content = await r.read()
                    status, headers = r.status, r.headers
            except asyncio.TimeoutError:
                raise self._timeout_error() from None
            except aiohttp.ClientError as exc:
                raise _Transient(502, f"could not reach upstream {self.name!r} ({type(exc).__name__})") from None
            if status >= 400:
                raise _status_error(status, content, headers, body, self.name)
            try:
                return _loads(content)
            except ValueError:
                raise UpstreamError(502, f"upstream {self.name!r} returned invalid JSON") from None

        return await self._with_retries(attempt)

    async def _stream(self, url: str, body: dict) -> AsyncIterator[bytes]:
        import aiohttp

        payload = self._payload(body, stream=True)

        async def attempt() -> Any:
            try:
                resp = await self._client().post(url, data=payload, headers=self._stream_headers)
            except asyncio.TimeoutError:
                raise self._timeout_error() from None
            except aiohttp.ClientError as exc:
                raise _Transient(502, f"could not reach upstream {self.name!r} ({type(exc).__name__})") from None
            if resp.status >= 400:
                try:
                    content = await resp.read()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    content = b""
                finally:
                    resp.release()
                raise _status_error(resp.status, content, resp.headers, body, self.name)
            return resp

        resp = await self._with_retries(attempt)
        try:
            async for chunk in resp.content.iter_any():
                if chunk:
                    yield chunk
        except asyncio.TimeoutError:
            raise self._timeout_error(" mid-stream") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(502, f"upstream {self.name!r} stream broke ({type(exc).__name__})") from None
        finally:
            resp.release()

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        await super().aclose()


# -- litellm -------------------------------------------------------------------------------------------
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


class LiteLLMUpstream(_RetryingUpstream):
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
            return _Transient(502, f"upstream {self.name!r} call failed ({type(exc).__name__})")
        message = str(getattr(exc, "message", "") or "")
        return _status_error(status, _dumps({"error": {"message": message}}), None, body, self.name)

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
            yield b"data: " + _dumps(_clean_chunk(chunk)) + b"\n\n"
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


# -- factory -------------------------------------------------------------------------------------------
def is_local(model: str) -> bool:
    """Whether a ``litellm_params.model`` selects the built-in local model."""
    return model == "local" or model.startswith("local/")


def fast_path_applies(params: dict) -> bool:
    """Whether the direct HTTP path can serve these ``litellm_params`` exactly as litellm would."""
    model = str(params.get("model", ""))
    if not params.get("api_base"):
        return False
    if not (model.startswith("openai/") or model.startswith("hosted_vllm/")):
        return False
    return set(params) <= FAST_PATH_PARAMS


def _has_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401 - a litellm dependency, so normally present
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return True


def build_upstream(entry: dict, http: httpx.AsyncClient | None, timeout: float, retries: int,
                   backoff: float = 0.25) -> Upstream:
    """Build the upstream for one LiteLLM-style ``model_list`` item.

    ``entry = {"model_name": "gpt-x", "litellm_params": {"model": "openai/gpt-4o", "api_base": ...,
    "api_key": "os.environ/OPENAI_API_KEY", ...}}``. ``litellm_params.model`` of ``local`` or
    ``local/smollm2`` selects the built-in SmolLM2, ``local/<dir>`` any local HF model directory.
    ``litellm_params.timeout`` and ``num_retries``/``max_retries`` override the global ``timeout`` and
    ``retries``. OpenAI-compatible entries (``openai/...`` with ``api_base``, or ``hosted_vllm/...``)
    use the direct HTTP fast path (measured faster, see docs/upstreams.md) unless the entry sets
    ``fast_path: false`` or has ``litellm_params`` the fast path does not handle; ``fast_path:
    httpx`` uses the shared ``http`` client instead of an aiohttp session (``aiohttp``, the default).
    Raises ``ValueError`` for an invalid entry or a missing environment variable.
    """
    name = entry.get("model_name")
    raw = entry.get("litellm_params") or {}
    if not isinstance(name, str) or not name:
        raise ValueError("model_list entry needs a model_name")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str) or not raw["model"]:
        raise ValueError(f"model {name!r}: litellm_params.model is required")
    params = resolve_params(raw, name)
    model = params["model"]
    timeout = float(params.get("timeout", timeout))
    retries = int(params.get("num_retries", params.get("max_retries", retries)))

    if is_local(model):
        from proxy.upstreams.local import LocalChatUpstream

        target = model.partition("/")[2]
        return LocalChatUpstream(name, None if target in ("", "smollm2") else target,
                                 max_tokens_cap=int(params.get("max_tokens_cap", 512)))
    fast = entry.get("fast_path", True)
    if fast not in (True, False, "aiohttp", "httpx"):
        raise ValueError(f"model {name!r}: fast_path must be true, false, 'aiohttp' or 'httpx'")
    if fast is not False and fast_path_applies(params):
        cls = OpenAIHTTPUpstream if fast == "httpx" or not _has_aiohttp() else AiohttpOpenAIUpstream
        return cls(
            name, model.split("/", 1)[1], params["api_base"], api_key=params.get("api_key"),
            http=http if cls is OpenAIHTTPUpstream else None, timeout=timeout, retries=retries, backoff=backoff,
            extra_headers=params.get("extra_headers"), organization=params.get("organization"))
    return LiteLLMUpstream(name, params, timeout=timeout, retries=retries, backoff=backoff)
