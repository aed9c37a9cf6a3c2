"""What every upstream shares: the :class:`Upstream` interface, :class:`UpstreamError`, SSE helpers,
error-message scrubbing, retries and ``os.environ/`` secret resolution.

Contract for callers (the FastAPI app):

- ``build_upstream(entry, http, timeout, retries)`` (:mod:`proxy.upstreams.factory`) turns one
  LiteLLM-style ``model_list`` item into an :class:`Upstream`. **The upstream rewrites
  ``body["model"]`` itself** (on a copy) from ``litellm_params["model"]``, so callers may pass the
  client's body as is; the caller's dict is never mutated.
- ``chat``/``completion`` return OpenAI JSON dicts. ``chat_stream``/``completion_stream`` are async
  generators of SSE bytes ending with ``data: [DONE]``. Connecting, retrying and checking the
  upstream's status all happen before the first chunk is yielded, so an :class:`UpstreamError` raised
  by the first ``__anext__()`` can still become a normal HTTP error response; a later one (the
  upstream died mid-stream) can only be reported in-band, e.g. with :func:`sse_error`.
- Every failure is an :class:`UpstreamError` (502 unreachable / 5xx after retries, 504 timeout, or
  the upstream's own 4xx). Its message never contains prompt text: upstream messages are truncated
  and withheld entirely when they quote any part of the request (:func:`safe_upstream_message`),
  because the request carries our injected DP demonstrations and the client's private input.
  Only the ``message`` of a 4xx JSON error is passed on: a 5xx's text, a body that is not a JSON
  error (an HTML error page, a traceback) and anything that looks like markup or a traceback are
  withheld on every upstream kind (they describe the upstream's internals, not the request).
- Secrets come only from the environment: ``api_key: os.environ/NAME`` (any ``litellm_params`` value
  of that form is resolved); a literal ``api_key`` in the config is refused.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import re
import time
from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

try:  # orjson is a faster drop-in for the hot path; json is the fallback.
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_PREFIX = "os.environ/"
DONE = b"data: [DONE]\n\n"
#: Longest upstream error message passed on to clients.
MAX_ERROR_CHARS = 300
#: A run of this many characters shared by an error message and the request counts as quoting it.
_QUOTE_WINDOW = 16
#: Upstream "messages" that are really internals: markup (an HTML error page) or a traceback.
_INTERNALS = re.compile(r"<\s*[A-Za-z!/?]|Traceback \(most recent call|^\s*File \"|\n\s+at \S+\(", re.M)


# -- errors --------------------------------------------------------------------------------------------
class UpstreamError(Exception):
    """An upstream failure mapped to an HTTP status (502, 504, or the upstream's 4xx).

    ``message`` is safe to show to clients and to log: it never contains prompt text. ``headers``
    are response headers to pass on to the client (``Retry-After`` of a 429).
    """

    def __init__(self, status: int, message: str, type: str = "upstream_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = headers

    def to_dict(self) -> dict:
        """OpenAI-style error body."""
        return {"error": {"message": self.message, "type": self.type, "param": None,
                          "code": self.code or str(self.status)}}


class StreamError(UpstreamError):
    """A failure after the upstream accepted a streamed request (it answered 200 and began sending):
    the client is told in-band, with an SSE error event and ``[DONE]``, even before the first chunk."""


class Transient(UpstreamError):
    """A failure worth retrying (connection error, 5xx, 429); becomes an UpstreamError when retries run out.

    ``retry_after`` is the upstream's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, status: int, message: str, type: str = "upstream_error", retry_after: float | None = None):
        super().__init__(status, message, type)
        self.retry_after = retry_after

    def final(self) -> UpstreamError:
        """The error to report once no retry is left; a 429 keeps the upstream's ``Retry-After``."""
        headers = None
        if self.status == 429 and self.retry_after is not None:
            headers = {"Retry-After": str(max(0, math.ceil(self.retry_after)))}
        return UpstreamError(self.status, self.message, self.type, self.code, headers)


#: Exception class names (anywhere in the cause chain) meaning the upstream dropped the connection.
_CLOSED = frozenset({"RemoteProtocolError", "ServerDisconnectedError", "ClientPayloadError", "ReadError",
                     "TransferEncodingError", "ContentLengthError", "ConnectionResetError", "IncompleteReadError",
                     "BrokenPipeError", "ClientOSError"})
#: ... meaning no connection could be made.
_UNREACHABLE = frozenset({"ConnectError", "ClientConnectorError", "ConnectionRefusedError", "gaierror",
                          "ClientConnectorDNSError", "ClientConnectionError", "InvalidURL", "UnsupportedProtocol"})


def cause_names(exc: BaseException | None) -> list[str]:
    """Class names along an exception's ``__cause__`` / ``__context__`` chain, outermost first."""
    names: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(names) < 20:
        seen.add(id(exc))
        names.append(type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    return names


def connection_failure(name: str, exc: BaseException, mid_stream: bool = False) -> Transient | None:
    """A plain-words error for a failed connection (closed by the upstream, or never made), found
    by the exception's cause chain; None when the chain shows neither. Library class names are not
    put in the message: clients see what happened, not which library noticed it."""
    names = cause_names(exc)
    if any(n in _CLOSED for n in names):
        where = " mid-stream" if mid_stream else " before answering"
        return Transient(502, f"upstream {name!r} closed the connection{where}")
    if any(n in _UNREACHABLE for n in names):
        return Transient(502, f"could not connect to upstream {name!r}")
    return None


def sse_error(err: UpstreamError) -> bytes:
    """An in-band SSE error event plus ``[DONE]``, for failures after a stream has started."""
    return b"data: " + dumps(err.to_dict()) + b"\n\n" + DONE


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
    message = (message or "").strip()
    if _INTERNALS.search(message):
        return f"upstream returned HTTP {status}; its message was withheld"
    message = message[:MAX_ERROR_CHARS]
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


def status_error(status: int, content: bytes, headers: Mapping[str, str] | None, body: dict | None,
                  name: str) -> UpstreamError:
    """Map an upstream HTTP error status to the error we raise."""
    message, type_ = "", None
    try:
        data = loads(content)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message, type_ = str(err.get("message") or err.get("detail") or ""), err.get("type")
        elif isinstance(err, str):
            message = err
    except ValueError:
        pass  # not a JSON error (an HTML page, a traceback): withheld, only the status is reported
    message = safe_upstream_message(message, body, status)
    if status == 429:
        return Transient(429, f"upstream {name!r} rate-limited the request: {message}", "rate_limit_error",
                          _retry_after(headers))
    if status >= 500:
        # A server error's text describes the upstream's internals: report the status only.
        return Transient(502, f"upstream {name!r} failed (HTTP {status})", "upstream_error", _retry_after(headers))
    if status in (401, 403):
        # The proxy's own upstream credentials were refused: a proxy misconfiguration, not the
        # client's fault, so it is a 502 rather than the client-facing 401/403.
        return UpstreamError(502, f"upstream {name!r} refused the proxy's credentials (HTTP {status})",
                             "upstream_auth_error")
    return UpstreamError(status, message, type_ if isinstance(type_, str) else "invalid_request_error")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` value (delta-seconds or an HTTP date), None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    return parse_retry_after(headers.get("retry-after") or headers.get("Retry-After"))


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


class RetryingUpstream(Upstream):
    """Retry with exponential backoff and jitter on transient failures, shared by the remote upstreams.

    ``max_retry_wait`` caps the time one request spends waiting between attempts, in total: a
    ``Retry-After`` longer than what is left ends the retries at once (the client gets the 429
    with the upstream's ``Retry-After``) instead of holding the connection.
    """

    def __init__(self, name: str, timeout: float, retries: int, backoff: float, max_retry_wait: float = 8.0):
        self.name = name
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_retry_wait = max(0.0, float(max_retry_wait))

    def _delay(self, attempt: int, err: Transient, left: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up (the hint is beyond ``left``)."""
        hinted = err.retry_after
        if hinted is not None:
            return hinted if hinted <= left else None
        # "Full jitter" between half and all of base * 2^attempt, so replicas do not retry in lockstep.
        return min(left, self.backoff * (2 ** attempt) * (0.5 + random.random() / 2))

    async def _with_retries(self, attempt: Callable[[], Awaitable[T]]) -> T:
        waited = 0.0
        for i in range(self.retries + 1):
            try:
                return await attempt()
            except Transient as err:
                delay = None if i == self.retries else self._delay(i, err, self.max_retry_wait - waited)
                if delay is None:
                    raise err.final() from None
                log.info("upstream %s transient failure (%s), retry %d/%d", self.name, err.status, i + 1, self.retries)
                waited += delay
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _timeout_error(self, where: str = "") -> UpstreamError:
        return UpstreamError(504, f"upstream {self.name!r} timed out after {self.timeout:g}s{where}", "timeout")
