"""A tiny, fast OpenAI-compatible fake server for tests and benchmarks (loopback only).

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both also streamed as SSE) and
``GET /v1/models`` with a fixed short answer that echoes what it received ("fake answer: 3 messages,
120 chars"), so a test can see that demonstrations were injected without looking at the text.
Options make it fail the first N requests (500/503/4xx, optionally with ``Retry-After``), delay, hang,
or answer with a protocol fault (invalid JSON or SSE, a non-object body, a dropped connection), for
retry, timeout and fault tests.

Speed matters because it is the "direct" baseline of ``benchmarks/proxy_overhead.py``: this is a
minimal HTTP/1.1 keep-alive server on ``asyncio`` streams (uvicorn without httptools/uvloop parses
with h11 in pure Python and is several times slower here). It is a test tool, not a web server: it
reads ``Content-Length`` bodies only and trusts its loopback clients.

Run it as ``python -m proxy.devtools.fake_upstream --port 8001`` or, in a test::

    with FakeUpstream(FakeOptions(fail_first=2)) as fake:
        client.post(fake.base_url + "/chat/completions", ...)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

try:  # orjson is optional; it only makes the fake faster.
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads

MODEL_IDS = ["fake-model"]
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 413: "Payload Too Large",
            422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class FakeOptions:
    """Behaviour of the fake server."""

    #: Fail this many requests (to the completion routes) first; -1 fails every request.
    fail_first: int = 0
    #: HTTP status of those failures (5xx for retry tests, 4xx for pass-through tests).
    fail_status: int = 503
    #: Put the request's first message / prompt into error messages, like some providers do
    #: (lets tests check that the proxy never passes prompt text back in its errors).
    echo_in_errors: bool = False
    #: Seconds to wait before answering each completion request.
    delay: float = 0.0
    #: Never answer completion requests (timeout tests).
    hang: bool = False
    #: For streams: send the first chunk, then hang (mid-stream timeout tests).
    hang_mid_stream: bool = False
    #: Require ``Authorization: Bearer <api_key>`` when set.
    api_key: str | None = None
    #: ``Retry-After`` header value sent with the failures above (e.g. "3600" with fail_status 429).
    retry_after: str | None = None
    #: Answer with a protocol fault instead of a completion (see :data:`FAULTS`).
    fault: str | None = None


#: Fault modes: ``bad_json`` 200 with a body (or stream events) that is not JSON; ``non_object`` 200
#: with the JSON array ``[1,2,3]`` (as the body or as stream events); ``not_sse`` a 200 event stream
#: whose body is plain text; ``close`` closes the connection without answering; ``close_mid_stream``
#: sends the first stream event, then closes the connection; ``html_error`` answers ``fail_status``
#: with an HTML page quoting a server-side traceback (:data:`HTML_TRACEBACK`).
FAULTS = ("bad_json", "non_object", "not_sse", "close", "close_mid_stream", "html_error")
#: The body of the ``html_error`` fault: what a crashed web framework's debug page sends.
HTML_TRACEBACK = (b"<html><head><title>500 Internal Server Error</title></head><body><pre>"
                  b"Traceback (most recent call last):\n  File \"/srv/app/handlers.py\", line 42, in chat\n"
                  b"    secret_config = load('/etc/upstream/credentials.yaml')\nKeyError: 'db_password'"
                  b"</pre></body></html>")


@dataclass
class FakeState:
    """What the server has seen (read by tests; mutated only on the server's loop)."""

    requests: int = 0
    failures: int = 0
    last_body: dict | None = None
    last_headers: dict = field(default_factory=dict)


def _error(status: int, message: str, type_: str = "fake_error") -> tuple[int, bytes]:
    return status, _dumps({"error": {"message": message, "type": type_, "param": None, "code": str(status)}})


def _chars(body: dict) -> tuple[int, int]:
    """(number of messages, total characters) of a chat body, or (0, prompt length)."""
    if "messages" in body:
        msgs = body.get("messages") or []
        total = 0
        for m in msgs:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                total += len(c)
            elif isinstance(c, list):
                total += sum(len(p.get("text", "")) for p in c if isinstance(p, dict))
        return len(msgs), total
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = "".join(p for p in prompt if isinstance(p, str))
    return 0, len(prompt) if isinstance(prompt, str) else 0


def answer_text(body: dict) -> str:
    """The fixed answer for a request (echoes sizes only, never content)."""
    n, chars = _chars(body)
    if "messages" in body:
        return f"fake answer: {n} messages, {chars} chars"
    return f"fake answer: prompt {chars} chars"


class _Server:
    """Request handling shared by the thread and process modes."""

    def __init__(self, options: FakeOptions):
        self.options = options
        self.state = FakeState()
        self._ids = itertools.count(1)

    # -- HTTP plumbing -----------------------------------------------------------------------------
    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                raw = await reader.readexactly(length) if length else b""
                keep_alive = headers.get("connection", "").lower() != "close"
                await self.dispatch(method, path.split("?", 1)[0], headers, raw, writer)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # the server is stopping; a keep-alive connection was idle
            return
        finally:
            try:
                writer.close()
            except Exception:  # pragma: no cover - closing a dead socket
                pass

    @staticmethod
    def _write(writer: asyncio.StreamWriter, status: int, payload: bytes, ctype: str = "application/json",
               extra: bytes = b"") -> None:
        writer.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
            % (status, _REASONS.get(status, "Status").encode(), ctype.encode(), len(payload), extra)
            + payload
        )

    @staticmethod
    def _abort(writer: asyncio.StreamWriter) -> None:
        """Drop the connection at once (no response, or a response cut short)."""
        writer.transport.abort()
        raise ConnectionResetError("fault: connection closed on purpose")

    async def dispatch(self, method: str, path: str, headers: dict, raw: bytes, writer: asyncio.StreamWriter) -> None:
        path = path[3:] if path.startswith("/v1/") else path
        if method == "GET" and path in ("/models", "/v1/models"):
            data = {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                                               for m in MODEL_IDS]}
            self._write(writer, 200, _dumps(data))
        elif method == "GET" and path in ("/health", "/healthz"):
            self._write(writer, 200, b'{"status":"ok"}')
        elif method == "POST" and path in ("/chat/completions", "/completions"):
            await self.complete(path == "/chat/completions", headers, raw, writer)
        else:
            self._write(writer, *_error(404, f"no route {method} {path}"))
        await writer.drain()

    # -- the fake model ----------------------------------------------------------------------------
    async def complete(self, chat: bool, headers: dict, raw: bytes, writer: asyncio.StreamWriter) -> None:
        opts, state = self.options, self.state
        state.requests += 1
        if opts.api_key is not None and headers.get("authorization") != f"Bearer {opts.api_key}":
            self._write(writer, *_error(401, "invalid api key", "authentication_error"))
            return
        try:
            body = _loads(raw)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            self._write(writer, *_error(400, "body is not a JSON object", "invalid_request_error"))
            return
        state.last_body, state.last_headers = body, headers
        if opts.fail_first < 0 or state.failures < opts.fail_first:
            state.failures += 1
            msg = f"fake failure {state.failures}"
            if opts.echo_in_errors:
                msgs = body.get("messages") or [{}]
                first = msgs[0].get("content") if isinstance(msgs[0], dict) else ""
                msg += f": could not process {first or body.get('prompt', '')!r}"
            extra = b"retry-after: %s\r\n" % opts.retry_after.encode() if opts.retry_after else b""
            self._write(writer, *_error(opts.fail_status, msg, "invalid_request_error" if opts.fail_status < 500
                                        else "server_error"), extra=extra)
            return
        if opts.fault and await self.fault(opts.fault, bool(body.get("stream")), writer):
            return
        if opts.hang:
            await asyncio.Event().wait()  # until the client goes away and the server stops
        if opts.delay:
            await asyncio.sleep(opts.delay)
        text = answer_text(body)
        model = body.get("model", "fake-model")
        rid = f"fake-{next(self._ids)}"
        prompt_tokens = max(1, _chars(body)[1] // 4)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}
        created = int(time.time())
        if not body.get("stream"):
            if chat:
                data = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop", "logprobs": None}], "usage": usage}
            else:
                data = {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                        "usage": usage}
            self._write(writer, 200, _dumps(data))
            return
        await self.stream(chat, body, rid, created, model, text, usage, writer)

    async def fault(self, fault: str, stream: bool, writer: asyncio.StreamWriter) -> bool:
        """Answer with ``fault`` (True) or leave the request to the normal path (False)."""
        if fault == "close":
            self._abort(writer)
        if fault == "html_error":
            self._write(writer, self.options.fail_status, HTML_TRACEBACK, "text/html")
            return True
        if fault in ("bad_json", "non_object") and not stream:
            self._write(writer, 200, b"{this is not json" if fault == "bad_json" else b"[1,2,3]")
            return True
        if fault in ("bad_json", "non_object", "not_sse"):
            body = {"bad_json": b"data: {this is not json\n\n", "non_object": b"data: [1,2,3]\n\n",
                    "not_sse": b"Hello, this is plain text and not an event stream.\n\n"}[fault]
            self._write(writer, 200, body + b"data: [DONE]\n\n", "text/event-stream")
            return True
        return False  # close_mid_stream acts inside stream()

    async def stream(self, chat: bool, body: dict, rid: str, created: int, model: str, text: str,
                     usage: dict, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        words = text.split(" ")
        pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                d: dict = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}

        events = ([chunk(None, None, role=True)] if chat else []) + [chunk(p, None) for p in pieces]
        events.append(chunk(None, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            last = chunk(None, None)
            last["choices"], last["usage"] = [], usage
            events.append(last)
        for i, ev in enumerate(events):
            data = b"data: " + _dumps(ev) + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            if i == 0 and self.options.hang_mid_stream:
                await writer.drain()
                await asyncio.Event().wait()
            if i == 0 and self.options.fault == "close_mid_stream":
                await writer.drain()
                self._abort(writer)
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class FakeUpstream:
    """The fake server running on its own event loop in a daemon thread (for tests)."""

    def __init__(self, options: FakeOptions | None = None, host: str = "127.0.0.1", port: int = 0):
        self.options = options or FakeOptions()
        self.host = host
        self._server = _Server(self.options)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def state(self) -> FakeState:
        """Counters and the last request body seen."""
        return self._server.state

    def start(self) -> "FakeUpstream":
        """Start serving in a background thread; returns once the socket is listening."""
        ready = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(self._server.handle_connection, sock=self._sock)
            ready.set()
            async with server:
                await self._stop.wait()
                server.close()
                # Cancel handlers that hang on purpose so the loop can finish.
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    def stop(self) -> None:
        """Stop the server and its thread."""
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(port: int, *extra_args: str, host: str = "127.0.0.1", timeout: float = 15.0) -> subprocess.Popen:
    """Start the fake server as a separate process and wait until it listens (for benchmarks)."""
    proc = subprocess.Popen([sys.executable, "-m", "proxy.devtools.fake_upstream", "--host", host,
                             "--port", str(port), *extra_args])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake upstream exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("fake upstream did not start listening")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m proxy.devtools.fake_upstream --port P``."""
    p = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream for tests and benchmarks.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--fail-first", type=int, default=0, help="fail the first N requests (-1: all)")
    p.add_argument("--fail-status", type=int, default=503)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--hang", action="store_true", help="never answer completion requests")
    p.add_argument("--api-key", default=None, help="require this bearer key")
    p.add_argument("--retry-after", default=None, help="Retry-After header of the failures")
    p.add_argument("--fault", choices=FAULTS, default=None, help="answer with this protocol fault")
    a = p.parse_args(argv)
    opts = FakeOptions(fail_first=a.fail_first, fail_status=a.fail_status, delay=a.delay, hang=a.hang,
                       api_key=a.api_key, retry_after=a.retry_after, fault=a.fault)
    server = _Server(opts)

    async def serve() -> None:
        srv = await asyncio.start_server(server.handle_connection, a.host, a.port, backlog=1024)
        print(f"fake upstream on http://{a.host}:{a.port}/v1", flush=True)
        async with srv:
            await srv.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
