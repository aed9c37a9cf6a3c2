"""Upstream protocol faults (fake upstream on loopback with fault modes): unreadable bodies and event
streams, dropped connections, 429 with Retry-After, and plain error messages; on each upstream
kind and through the live app."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from proxy.app import create_app
from proxy.devtools.fake_upstream import FakeOptions, FakeUpstream
from proxy.upstreams import StreamError, UpstreamError, build_upstream
from proxy.upstreams.base import parse_retry_after
from proxy.upstreams.litellm import plain_message
from proxy.upstreams.sse import SSEChecker
from tests.test_app_support import ADMIN_KEY, CLIENT_KEY, FAKE_MODEL, LiveServer, assert_openai_error, make_config
from tests.test_upstreams import CHAT, KINDS, _FAST_PATH, collect, run

CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
#: What a client-facing message must never contain: library class names and prefixes.
INTERNALS = re.compile(r"litellm|OpenAIException|[A-Z][a-z]+(Error|Exception)\b|HTTP 500|aiohttp|httpx")


def make_upstream(kind: str, base_url: str, retries: int = 0, max_retry_wait: float = 8.0, timeout: float = 5.0) -> Any:
    entry = {"model_name": "m", "fast_path": _FAST_PATH[kind],
             "litellm_params": {"model": "openai/fake-model", "api_base": base_url}}
    return build_upstream(entry, None, timeout, retries, backoff=0.01, max_retry_wait=max_retry_wait)


async def _attempt(up: Any, stream: bool) -> Any:
    try:
        if stream:
            return await collect(up.chat_stream(CHAT))
        return await up.chat(CHAT)
    finally:
        await up.aclose()


def fail(kind: str, stream: bool, **options: Any) -> UpstreamError:
    with FakeUpstream(FakeOptions(**options)) as fake:
        with pytest.raises(UpstreamError) as info:
            run(_attempt(make_upstream(kind, fake.base_url), stream))
    err = info.value
    assert not INTERNALS.search(err.message), err.message
    return err


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", ["bad_json", "non_object", "not_sse"])
def test_unreadable_answer_is_502_not_a_success(kind: str, fault: str) -> None:
    err = fail(kind, False, fault=fault)
    assert err.status == 502 and not isinstance(err, StreamError)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", ["bad_json", "non_object", "not_sse", "close_mid_stream"])
def test_unreadable_or_broken_stream_is_a_stream_error(kind: str, fault: str) -> None:
    # StreamError: the caller reports it in-band (error event, then [DONE]) even before any chunk.
    err = fail(kind, True, fault=fault)
    assert isinstance(err, StreamError) and err.status == 502
    if fault == "close_mid_stream":
        assert "closed the connection mid-stream" in err.message


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
def test_closed_connection_is_reported_as_such(kind: str, stream: bool) -> None:
    err = fail(kind, stream, fault="close")
    assert err.status == 502 and "closed the connection" in err.message


@pytest.mark.parametrize("kind", KINDS)
def test_server_error_message_is_plain(kind: str) -> None:
    err = fail(kind, False, fail_first=-1, fail_status=503)
    # A server error's own text describes the upstream's internals: only its status is passed on.
    assert err.status == 502 and "fake failure" not in err.message and "HTTP 503" in err.message


@pytest.mark.parametrize("kind", KINDS)
def test_long_retry_after_is_not_waited_and_is_passed_on(kind: str) -> None:
    with FakeUpstream(FakeOptions(fail_first=-1, fail_status=429, retry_after="3600")) as fake:
        up = make_upstream(kind, fake.base_url, retries=3, max_retry_wait=2.0)
        with pytest.raises(UpstreamError) as info:
            run(_attempt(up, False))
        assert fake.state.requests == 1  # the hint is beyond the cap: no retry, no sleep
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "3600"}


@pytest.mark.parametrize("kind", KINDS)
def test_short_retry_after_is_honoured_within_the_cap(kind: str) -> None:
    with FakeUpstream(FakeOptions(fail_first=1, fail_status=429, retry_after="0")) as fake:
        answer = run(_attempt(make_upstream(kind, fake.base_url, retries=2, max_retry_wait=2.0), False))
        assert fake.state.requests == 2
    assert answer["choices"][0]["message"]["content"].startswith("fake answer")


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    future = parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT")
    assert future is not None and future > 1e9


def test_plain_message_drops_library_prefixes() -> None:
    raw = "litellm.RateLimitError: RateLimitError: OpenAIException - slow down please"
    assert plain_message(raw) == "slow down please"
    assert plain_message("litellm.InternalServerError: InternalServerError: OpenAIException - x") == "x"
    assert plain_message("model overloaded") == "model overloaded"


# -- the SSE checker ----------------------------------------------------------------------------------
def test_sse_checker_relays_whole_events_across_chunk_boundaries() -> None:
    checker = SSEChecker("m")
    stream = b': keep-alive\r\n\r\nevent: x\r\ndata: {"a":\r\ndata: 1}\r\n\r\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    out = b""
    for i in range(0, len(stream), 7):
        out += checker.feed(stream[i:i + 7])
    out += checker.finish()
    assert out == stream and checker.done


@pytest.mark.parametrize("bad", [b"data: {oops}\n\n", b"data: [1,2,3]\n\n", b"data: \"text\"\n\n",
                                 b"<html>502 Bad Gateway</html>\n\n"])
def test_sse_checker_refuses_what_is_not_an_event_stream(bad: bytes) -> None:
    with pytest.raises(StreamError):
        SSEChecker("m").feed(b'data: {"ok": 1}\n\n' + bad)


def test_sse_checker_needs_done() -> None:
    checker = SSEChecker("m")
    checker.feed(b'data: {"ok": 1}\n\n')
    with pytest.raises(StreamError, match="closed the stream before it finished"):
        checker.finish()


# -- through the live app ---------------------------------------------------------------------------------
def _serve(tmp_path: Any, fake: FakeUpstream, **server: Any) -> LiveServer:
    cfg = make_config(f"sqlite:///{tmp_path}/f.db", fake.base_url, None, client_tasks=["*"],
                      extra_server={"retries": 2, **server})
    return LiveServer(create_app(cfg))


CHAT_BODY = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hello"}]}


@pytest.mark.parametrize("fault", ["bad_json", "not_sse", "close_mid_stream"])
def test_app_reports_bad_streams_in_band(tmp_path: Any, fault: str) -> None:
    with FakeUpstream(FakeOptions(fault=fault)) as fake, _serve(tmp_path, fake) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={**CHAT_BODY, "stream": True}, headers=CLIENT)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e[6:] for e in r.text.split("\n\n") if e.strip()]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "upstream_error" and not INTERNALS.search(error["message"])
        # Nothing of the broken stream was relayed as if it were a completion.
        assert all("choices" not in json.loads(e) for e in events[:-1] if fault != "close_mid_stream")
        metrics = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        assert 'dpicl_upstream_errors_total{model="fake-model",status="502"} 1.0' in metrics


def test_app_non_object_body_is_502(tmp_path: Any) -> None:
    with FakeUpstream(FakeOptions(fault="non_object")) as fake, _serve(tmp_path, fake) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT_BODY, headers=CLIENT)
        err = assert_openai_error(r, 502)
        assert "not an object" in err["message"]


def test_app_passes_retry_after_on_429(tmp_path: Any) -> None:
    with FakeUpstream(FakeOptions(fail_first=-1, fail_status=429, retry_after="3600")) as fake, \
            _serve(tmp_path, fake, max_retry_wait=1.0) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT_BODY, headers=CLIENT, timeout=30)
        assert_openai_error(r, 429)
        assert r.headers["retry-after"] == "3600"
        assert fake.state.requests == 1
