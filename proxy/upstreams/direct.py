"""The direct HTTP fast path for OpenAI-compatible servers: request bodies pass through with only
``model`` rewritten and streamed SSE bytes are relayed unchanged, on an aiohttp session (default)
or the app's shared httpx client. Chosen by :func:`proxy.upstreams.factory.build_upstream`.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import httpx

from proxy.upstreams.base import RetryingUpstream, StreamError, Transient, UpstreamError, connection_failure, dumps, \
    loads, status_error
from proxy.upstreams.sse import checked


def json_object(content: bytes, name: str) -> dict:
    """A non-streamed upstream answer as a JSON object; anything else is a 502 (never relayed as 200)."""
    try:
        data = loads(content)
    except ValueError:
        raise UpstreamError(502, f"upstream {name!r} returned a body that is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError(502, f"upstream {name!r} returned JSON that is not an object")
    return data


class OpenAIHTTPUpstream(RetryingUpstream):
    """OpenAI-compatible server over a shared, pooled ``httpx.AsyncClient``: bodies pass through with
    only ``model`` rewritten, and streamed SSE bytes are relayed unchanged (decoded from any
    content-encoding)."""

    #: Whether this class talks through ``self.http`` (subclasses with their own client set False).
    _uses_httpx = True

    def __init__(self, name: str, model: str, api_base: str, api_key: str | None = None,
                 http: httpx.AsyncClient | None = None, timeout: float = 60.0, retries: int = 2,
                 backoff: float = 0.25, extra_headers: dict | None = None, organization: str | None = None,
                 max_retry_wait: float = 8.0):
        super().__init__(name, timeout, retries, backoff, max_retry_wait)
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
        return dumps(out)

    async def _post(self, url: str, body: dict) -> dict:
        payload = self._payload(body, stream=False)

        async def attempt() -> dict:
            try:
                r = await self.http.post(url, content=payload, headers=self._headers, timeout=self._http_timeout)
            except httpx.TimeoutException:
                raise self._timeout_error() from None
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
            if r.status_code >= 400:
                raise status_error(r.status_code, r.content, r.headers, body, self.name)
            return json_object(r.content, self.name)

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
                raise self._unreachable(exc) from None
            if resp.status_code >= 400:
                try:
                    content = await resp.aread()
                except httpx.HTTPError:
                    content = b""
                finally:
                    await resp.aclose()
                raise status_error(resp.status_code, content, resp.headers, body, self.name)
            return resp

        resp = await self._with_retries(attempt)
        try:
            async for chunk in resp.aiter_bytes():
                if chunk:
                    yield chunk
        except httpx.TimeoutException:
            raise self._timeout_error(" mid-stream") from None
        except httpx.TransportError as exc:
            raise self._broken(exc) from None
        finally:
            await resp.aclose()

    def _unreachable(self, exc: BaseException) -> Transient:
        """A failed attempt's connection error, in plain words."""
        return connection_failure(self.name, exc) or Transient(502, f"could not reach upstream {self.name!r}")

    def _broken(self, exc: BaseException) -> StreamError:
        """A stream that broke after the upstream answered 200."""
        err = connection_failure(self.name, exc, mid_stream=True)
        message = err.message if err else f"the stream from upstream {self.name!r} broke off"
        return StreamError(502, message)

    async def chat(self, body: dict) -> dict:
        return await self._post(self._chat_url, body)

    def chat_stream(self, body: dict) -> AsyncIterator[bytes]:
        return checked(self._stream(self._chat_url, body), self.name)

    async def completion(self, body: dict) -> dict:
        return await self._post(self._completion_url, body)

    def completion_stream(self, body: dict) -> AsyncIterator[bytes]:
        return checked(self._stream(self._completion_url, body), self.name)

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
                raise self._unreachable(exc) from None
            if status >= 400:
                raise status_error(status, content, headers, body, self.name)
            return json_object(content, self.name)

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
                raise self._unreachable(exc) from None
            if resp.status >= 400:
                try:
                    content = await resp.read()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    content = b""
                finally:
                    resp.release()
                raise status_error(resp.status, content, resp.headers, body, self.name)
            return resp

        resp = await self._with_retries(attempt)
        try:
            async for chunk in resp.content.iter_any():
                if chunk:
                    yield chunk
        except asyncio.TimeoutError:
            raise self._timeout_error(" mid-stream") from None
        except aiohttp.ClientError as exc:
            raise self._broken(exc) from None
        finally:
            resp.release()

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        await super().aclose()
