"""Upstreams against the loopback fake OpenAI server (both the litellm path and the direct HTTP
fast path), plus the local model's mechanics on a tiny random Llama and one slow real-SmolLM2 test."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import warnings
from typing import Any, AsyncIterator, Iterator

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DPICL_CACHE_DIR", "/tmp/dpicl-cache")

from tests.test_app_support import tiny_model_dir  # noqa: E402,F401 - fixture
from proxy.devtools.fake_upstream import FakeOptions, FakeUpstream, answer_text, free_port  # noqa: E402
from proxy.upstreams import (  # noqa: E402
    AiohttpOpenAIUpstream,
    LiteLLMUpstream,
    OpenAIHTTPUpstream,
    Upstream,
    UpstreamError,
    build_upstream,
    safe_upstream_message,
)

#: The fast path on aiohttp (default) and on the shared httpx client, and the litellm path.
KINDS = ["aiohttp", "httpx", "litellm"]
_CLASSES = {"aiohttp": AiohttpOpenAIUpstream, "httpx": OpenAIHTTPUpstream, "litellm": LiteLLMUpstream}
_FAST_PATH = {"aiohttp": True, "httpx": "httpx", "litellm": False}
CHAT = {"model": "client-name", "messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "where is the Eiffel tower?"}]}
COMPLETION = {"model": "client-name", "prompt": "Question: where?\nAnswer:", "max_tokens": 5}


def run(coro: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # litellm's cached aiohttp sessions
        return asyncio.run(coro)


@pytest.fixture
def fake() -> Iterator[Any]:
    """Factory: start a fake upstream with the given options; all are stopped at teardown."""
    started: list[FakeUpstream] = []

    def make(**options: Any) -> FakeUpstream:
        server = FakeUpstream(FakeOptions(**options)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def upstream(kind: str, base_url: str, timeout: float = 5.0, retries: int = 2, **params: Any) -> Upstream:
    entry = {"model_name": "client-name", "fast_path": _FAST_PATH[kind],
             "litellm_params": {"model": "openai/fake-model", "api_base": base_url, **params}}
    up = build_upstream(entry, None, timeout, retries, backoff=0.01)
    assert type(up) is _CLASSES[kind]
    return up


async def collect(stream: AsyncIterator[bytes]) -> list[Any]:
    """Parse an SSE byte stream into JSON events (and the final ``"[DONE]"``)."""
    raw = b"".join([chunk async for chunk in stream]).decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), raw
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


async def call(up: Upstream, coro: Any) -> Any:
    try:
        return await coro
    finally:
        await up.aclose()


# -- happy paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_chat_and_completion(fake: Any, kind: str) -> None:
    server = fake()
    body = json.loads(json.dumps(CHAT))

    async def go() -> tuple[dict, dict]:
        up = upstream(kind, server.base_url)
        try:
            return await up.chat(body), await up.completion(COMPLETION)
        finally:
            await up.aclose()

    chat, completion = run(go())
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == answer_text(CHAT) == "fake answer: 2 messages, 34 chars"
    assert chat["usage"]["total_tokens"] > 0
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == answer_text(COMPLETION)
    # The upstream model name comes from litellm_params; the caller's dict is left alone.
    assert server.state.last_body["model"] == "fake-model"
    assert server.state.last_body["max_tokens"] == 5
    assert body == CHAT


@pytest.mark.parametrize("kind", KINDS)
def test_streams_end_with_done(fake: Any, kind: str) -> None:
    server = fake()

    async def go() -> tuple[list, list]:
        up = upstream(kind, server.base_url)
        try:
            return await collect(up.chat_stream(CHAT)), await collect(up.completion_stream(COMPLETION))
        finally:
            await up.aclose()

    chat, completion = run(go())
    for events in (chat, completion):
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        assert any(e["choices"] and e["choices"][0]["finish_reason"] == "stop" for e in events[:-1])
    assert chat[0]["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in chat[:-1] if e["choices"]) == answer_text(CHAT)
    assert "".join(e["choices"][0]["text"] for e in completion[:-1] if e["choices"]) == answer_text(COMPLETION)
    assert server.state.last_body["stream"] is True


# -- failures ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_retries_recover_from_transient_503(fake: Any, kind: str) -> None:
    server = fake(fail_first=2, fail_status=503)
    up = upstream(kind, server.base_url, retries=3)
    answer = run(call(up, up.chat(CHAT)))
    assert answer["choices"][0]["message"]["content"] == answer_text(CHAT)
    assert server.state.requests == 3


@pytest.mark.parametrize("kind", KINDS)
def test_stream_retries_before_first_chunk(fake: Any, kind: str) -> None:
    server = fake(fail_first=1, fail_status=500)
    up = upstream(kind, server.base_url, retries=2)
    events = run(call(up, collect(up.chat_stream(CHAT))))
    assert events[-1] == "[DONE]"
    assert server.state.requests == 2


@pytest.mark.parametrize("kind", KINDS)
def test_persistent_failure_is_502(fake: Any, kind: str) -> None:
    server = fake(fail_first=-1, fail_status=500)
    up = upstream(kind, server.base_url, retries=2)
    with pytest.raises(UpstreamError) as info:
        run(call(up, up.chat(CHAT)))
    assert info.value.status == 502
    assert server.state.requests == 3  # first try + 2 retries


@pytest.mark.parametrize("kind", KINDS)
def test_unreachable_is_502(kind: str) -> None:
    up = upstream(kind, f"http://127.0.0.1:{free_port()}/v1", retries=1)
    with pytest.raises(UpstreamError) as info:
        run(call(up, up.completion(COMPLETION)))
    assert info.value.status == 502


@pytest.mark.parametrize("kind", KINDS)
def test_hang_is_504_without_retry(fake: Any, kind: str) -> None:
    server = fake(hang=True)
    up = upstream(kind, server.base_url, timeout=0.5, retries=2)
    with pytest.raises(UpstreamError) as info:
        run(call(up, up.chat(CHAT)))
    assert info.value.status == 504
    assert server.state.requests == 1  # timeouts are not retried (they would multiply the wait)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_hang_is_504(fake: Any, kind: str) -> None:
    server = fake(hang=True)
    up = upstream(kind, server.base_url, timeout=0.5, retries=0)
    with pytest.raises(UpstreamError) as info:
        run(call(up, collect(up.chat_stream(CHAT))))
    assert info.value.status == 504


@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
def test_mid_stream_hang_is_504_after_first_chunk(fake: Any, kind: str) -> None:
    server = fake(hang_mid_stream=True)
    up = upstream(kind, server.base_url, timeout=0.5, retries=0)
    received: list[bytes] = []

    async def go() -> None:
        async for chunk in up.chat_stream(CHAT):
            received.append(chunk)

    with pytest.raises(UpstreamError) as info:
        run(call(up, go()))
    assert info.value.status == 504 and received and received[0].startswith(b"data: ")


@pytest.mark.parametrize("kind", KINDS)
def test_4xx_passes_through_without_retry(fake: Any, kind: str) -> None:
    server = fake(fail_first=-1, fail_status=400)
    up = upstream(kind, server.base_url, retries=3)
    with pytest.raises(UpstreamError) as info:
        run(call(up, up.completion(COMPLETION)))
    assert info.value.status == 400
    assert "fake failure 1" in info.value.message
    assert server.state.requests == 1


@pytest.mark.parametrize("kind", KINDS)
def test_4xx_quoting_the_prompt_is_withheld(fake: Any, kind: str) -> None:
    secret = "Question: what is the capital of the secret demo country?"
    server = fake(fail_first=-1, fail_status=422, echo_in_errors=True)
    up = upstream(kind, server.base_url, retries=0)
    body = {"model": "x", "messages": [{"role": "system", "content": secret}, {"role": "user", "content": "hi"}]}
    with pytest.raises(UpstreamError) as info:
        run(call(up, up.chat(body)))
    assert info.value.status == 422
    assert "secret demo" not in info.value.message and "capital" not in info.value.message
    assert "withheld" in info.value.message


@pytest.mark.parametrize("kind", KINDS)
def test_rejected_credentials_are_502_not_401(fake: Any, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = fake(api_key="right-key")
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "wrong-key")
    up = upstream(kind, server.base_url, retries=0, api_key="os.environ/FAKE_UPSTREAM_KEY")
    with pytest.raises(UpstreamError) as info:
        run(call(up, up.chat(CHAT)))
    assert info.value.status == 502 and "credentials" in info.value.message
    assert "wrong-key" not in info.value.message


@pytest.mark.parametrize("kind", KINDS)
def test_api_key_comes_from_environment(fake: Any, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = fake(api_key="right-key")
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "right-key")
    up = upstream(kind, server.base_url, api_key="os.environ/FAKE_UPSTREAM_KEY")
    assert run(call(up, up.chat(CHAT)))["choices"][0]["message"]["content"] == answer_text(CHAT)
    assert server.state.last_headers["authorization"] == "Bearer right-key"


def test_literal_or_missing_secrets_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"model_name": "m", "litellm_params": {"model": "openai/x", "api_base": "http://h/v1", "api_key": "sk-lit"}}
    with pytest.raises(ValueError, match="os.environ"):
        build_upstream(entry, None, 5, 0)
    monkeypatch.delenv("DPICL_TEST_MISSING_KEY", raising=False)
    entry["litellm_params"]["api_key"] = "os.environ/DPICL_TEST_MISSING_KEY"
    with pytest.raises(ValueError, match="DPICL_TEST_MISSING_KEY"):
        build_upstream(entry, None, 5, 0)


# -- selection and helpers -----------------------------------------------------------------------------
def test_upstream_selection() -> None:
    from proxy.upstreams.local import LocalChatUpstream

    def kind(params: dict, **entry: Any) -> str:
        return type(build_upstream({"model_name": "m", "litellm_params": params, **entry}, None, 5, 1)).__name__

    assert kind({"model": "openai/gpt-4o", "api_base": "http://h/v1"}) == "AiohttpOpenAIUpstream"
    assert kind({"model": "hosted_vllm/llama", "api_base": "http://h/v1"}) == "AiohttpOpenAIUpstream"
    assert kind({"model": "openai/gpt-4o", "api_base": "http://h/v1"}, fast_path="httpx") == "OpenAIHTTPUpstream"
    assert kind({"model": "openai/gpt-4o", "api_base": "http://h/v1"}, fast_path=False) == "LiteLLMUpstream"
    assert kind({"model": "openai/gpt-4o"}) == "LiteLLMUpstream"  # no api_base
    assert kind({"model": "openai/gpt-4o", "api_base": "http://h/v1", "temperature": 0}) == "LiteLLMUpstream"
    assert kind({"model": "anthropic/claude-3-5-haiku"}) == "LiteLLMUpstream"
    assert kind({"model": "local"}) == LocalChatUpstream.__name__
    assert kind({"model": "local/smollm2"}) == LocalChatUpstream.__name__
    with pytest.raises(ValueError):
        build_upstream({"model_name": "m", "litellm_params": {}}, None, 5, 1)
    with pytest.raises(ValueError, match="fast_path"):
        kind({"model": "openai/gpt-4o", "api_base": "http://h/v1"}, fast_path="yes")


def test_safe_upstream_message() -> None:
    body = {"messages": [{"role": "user", "content": "Question: who wrote the private memo?\nAnswer:"}]}
    assert safe_upstream_message("context too long: 9000 tokens", body, 400) == "context too long: 9000 tokens"
    quoted = "invalid input 'Question: who wrote the private memo?\\nAnswer:'"
    assert "memo" not in safe_upstream_message(quoted, body, 400)
    assert len(safe_upstream_message("x" * 5000, None, 400)) <= 300


# -- local model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_local() -> Any:
    """LocalChatUpstream over a tiny random Llama with the SmolLM2 tokenizer (mechanics only)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from aggregation.sources.local import ensure_smollm2
    from proxy.upstreams.local import LocalChatUpstream

    try:
        tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {exc}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LocalChatUpstream("tiny", model=LlamaForCausalLM(config).eval(), tokenizer=tok, max_tokens_cap=12)


def test_local_chat_completion_and_streams(tiny_local: Any) -> None:
    chat_body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}

    async def go() -> tuple:
        chat = await tiny_local.chat(chat_body)
        streamed = await collect(tiny_local.chat_stream({**chat_body, "stream_options": {"include_usage": True}}))
        capped = await tiny_local.completion({"prompt": "Hello", "max_tokens": 1000, "temperature": 0})
        completion_stream = await collect(tiny_local.completion_stream({"prompt": "Hello", "max_tokens": 5,
                                                                         "temperature": 0.7, "top_p": 0.9}))
        return chat, streamed, capped, completion_stream

    chat, streamed, capped, completion_stream = run(go())
    choice = chat["choices"][0]
    assert chat["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert chat["usage"]["prompt_tokens"] > 1 and 1 <= chat["usage"]["completion_tokens"] <= 8
    assert choice["finish_reason"] in ("stop", "length")
    # Greedy streaming produces the same text as greedy non-streaming.
    assert streamed[-1] == "[DONE]" and streamed[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in streamed[:-1] if e["choices"])
    assert text == choice["message"]["content"]
    assert streamed[-2]["usage"] == chat["usage"]
    assert capped["usage"]["completion_tokens"] <= 12  # max_tokens is capped
    assert completion_stream[-1] == "[DONE]" and completion_stream[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_local_stop_strings_and_bad_params(tiny_local: Any) -> None:
    body = {"prompt": "Hello", "max_tokens": 10, "temperature": 0}
    full = run(tiny_local.completion(body))["choices"][0]["text"]
    assert len(full) > 4
    stop = full[3:5]  # a stop string that occurs inside the greedy output
    cut = run(tiny_local.completion({**body, "stop": [stop]}))["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"
    streamed = run(collect(tiny_local.completion_stream({**body, "stop": stop})))
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == cut["text"]
    for bad in ({"temperature": 3}, {"n": 2}, {"max_tokens": 0}, {"stop": 5}, {"prompt": {"a": 1}}):
        with pytest.raises(UpstreamError) as info:
            run(tiny_local.completion({**body, **bad}))
        assert info.value.status == 400


@pytest.mark.slow
def test_real_smollm2_answers_sensibly() -> None:
    from aggregation.sources.local import load_model
    from proxy.upstreams.local import LocalChatUpstream

    up = LocalChatUpstream("smollm2", loader=load_model)  # the loader the app passes
    body = {"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            "temperature": 0, "max_tokens": 16}
    answer = run(call(up, up.chat(body)))
    assert "paris" in answer["choices"][0]["message"]["content"].lower()


def test_first_request_logs_that_it_loads_the_local_model(tiny_model_dir: str) -> None:
    """A first request that has to load (or convert) the local model says so in the log, once,
    instead of waiting silently; later requests add no such line."""
    from aggregation.sources.local import load_model
    from proxy.upstreams.local import LocalChatUpstream
    from tests.test_app_support import capture_logs

    up = LocalChatUpstream("tiny", tiny_model_dir, loader=load_model, max_tokens_cap=4)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    models_log = logging.getLogger("dpicl.models")
    saved = models_log.level
    models_log.setLevel(logging.INFO)  # what the server's setup_logging gives the dpicl loggers
    def lines(logs: Any) -> list[dict]:
        # capture_logs listens on "dpicl" and on the root logger: a propagated record comes twice.
        return [json.loads(line) for line in dict.fromkeys(logs.lines) if line.startswith("{")]

    with capture_logs() as logs:
        async def twice() -> list[dict]:
            await up.chat(body)
            seen = lines(logs)
            await up.chat(body)
            return seen

        first = run(call(up, twice()))
        later = lines(logs)[len(first):]
    models_log.setLevel(saved)
    events = [r.get("event") for r in first]
    assert events.count("model.loading") == 1 and events.count("model.loaded") == 1, first
    loaded = next(r for r in first if r.get("event") == "model.loaded")
    assert loaded["level"] == "info" and loaded["seconds"] >= 0 and loaded["model"] == tiny_model_dir
    assert not any(str(r.get("event", "")).startswith("model.") for r in later)


def test_label_answers_score_words_as_the_evaluation_does() -> None:
    # The two label-word scorers (serving's upstream, the evaluation's ModelScorer) live apart by
    # the import rules (proxy/upstreams/labels.py says why): they must give the same numbers.
    pytest.importorskip("torch")
    from aggregation.datasets import TREC_PROMPT
    from aggregation.evaluation.scoring import ModelScorer
    from aggregation.prompts import Example
    from proxy.upstreams import labels
    from tests.tiny_model import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    words = ["location", "number", "person", "zygomorphic"]  # 1 and several tokens
    prefix = TREC_PROMPT.serving_prefix([Example("Where is Oslo ?", "LOC")])
    query = TREC_PROMPT.query("Who wrote Hamlet ?")
    ids = list(tok(prefix + query, add_special_tokens=False)["input_ids"])
    served = labels.score_words(model, ids, labels.word_token_ids(tok, words, chat=False))
    assert served == pytest.approx(list(ModelScorer(model, tok, words).logprobs(prefix, [query])[0]), abs=1e-6)


def test_local_label_answer_is_the_best_scored_word(tiny_local: Any) -> None:
    # The batched, right-padded scoring equals a plain forward pass per word, and the answer is the
    # word with the highest summed log-probability (words of 1 and several tokens mixed).
    import torch

    from proxy.upstreams import labels

    words = ["location", "number", "person", "zygomorphic"]
    body = {"prompt": "Question: Who wrote Hamlet?\nAnswer type:"}
    model, tok = tiny_local.model_and_tokenizer()
    ids = tiny_local._encode(body, False)
    cands = labels.word_token_ids(tok, words, chat=False)
    assert cands[0] == list(tok(" location", add_special_tokens=False)["input_ids"])  # leading space, as in eval
    assert max(len(c) for c in cands) > 1
    plain = []
    for cand in cands:
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([ids + cand])).logits[0].double(), -1)
        plain.append(sum(float(logp[len(ids) - 1 + t, c]) for t, c in enumerate(cand)))
    assert labels.score_words(model, ids, cands) == pytest.approx(plain, abs=1e-6)
    best = words[max(range(len(words)), key=lambda i: plain[i])]
    out = run(tiny_local.label_answer(body, words, chat=False))
    assert out["choices"][0]["text"] == best and out["object"] == "text_completion"
    chat = {"messages": [{"role": "user", "content": body["prompt"]}], "stream_options": {"include_usage": True}}
    reply = run(tiny_local.label_answer(chat, words, chat=True))["choices"][0]["message"]["content"]
    assert reply in words
    events = run(collect(tiny_local.label_answer_stream(chat, words, chat=True)))
    assert events[-1] == "[DONE]" and "usage" in events[-2]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]) == reply
