"""OpenAICompatSource against a real, independent server (llama-cpp-python serving the SmolLM2 GGUF)
and against small fake servers on loopback for the fault paths (retries, permanent failures)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from aggregation.datasets import TREC_PROMPT  # noqa: E402
from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations  # noqa: E402
from aggregation.mechanisms import Noise  # noqa: E402
from aggregation.prompts import Example  # noqa: E402
from aggregation.sources.openai_compat import OpenAICompatSource, SourceError  # noqa: E402

# SmolLM2's special tokens: <|endoftext|> = 0, <|im_end|> = 2 (both end a text).
SMOLLM2_END_IDS = (0, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# The real server: llama-cpp-python serving the same GGUF the local source converts.


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    from aggregation.sources.local import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "False",
             # One thread: llama.cpp's worker threads spin while waiting, which made prompt
             # evaluation ~3x slower on a busy 2-core machine than a single thread.
             "--n_threads", "1", "--n_threads_batch", "1"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {Path(log).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer within 90 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def llama(llama_base: str) -> Iterator[OpenAICompatSource]:
    # llama-cpp-python serves one request at a time: queued calls wait, so the timeout is generous
    # (a busy CI machine must not turn queueing into retries).
    with OpenAICompatSource("openai/smollm2", llama_base, api_key="unused", top_logprobs=20,
                            max_concurrency=2, timeout=300, end_token_ids=SMOLLM2_END_IDS) as src:
        yield src


PROMPTS = [
    "The capital of France is",
    "The capital of Germany is",
    "One, two, three, four,",
    "Question: Who wrote Hamlet?\nAnswer:",
]


def test_probs_shape_and_subprobability(llama: OpenAICompatSource) -> None:
    state = llama.open(PROMPTS)
    candidates = state.top_tokens(10)
    probs = state.probs(candidates)
    assert probs.shape == (len(PROMPTS), len(candidates))
    assert np.all(probs >= 0.0) and np.all(probs <= 1.0)
    assert np.all(probs.sum(axis=1) <= 1.0 + 1e-6)
    # Prompt 0 is the one top_tokens ranked, so its row has mass on every candidate.
    assert np.all(probs[0] > 0.0)


def test_likely_token_gets_high_probability(llama: OpenAICompatSource) -> None:
    state = llama.open(["The capital of France is", "The capital of Germany is"])
    probs = state.probs([" Paris", " Berlin"])
    assert probs[0, 0] > 0.5 and probs[0, 0] > 10 * probs[0, 1]
    assert probs[1, 1] > 0.5 and probs[1, 1] > 10 * probs[1, 0]


def test_missing_candidates_get_zero(llama: OpenAICompatSource) -> None:
    state = llama.open(["The capital of France is"])
    probs = state.probs([" Paris", " xylophoneqq", "\u2603\u2603"])
    assert probs[0, 0] > 0.5
    assert probs[0, 1] == 0.0 and probs[0, 2] == 0.0


def test_top_tokens_sorted_and_capped(llama: OpenAICompatSource) -> None:
    state = llama.open(["The capital of France is"])
    top = state.top_tokens(8)
    assert len(top) == 8 and top[0] == " Paris"
    row = state.probs(top)[0]
    assert np.all(np.diff(row) <= 1e-12), "top_tokens must be sorted by probability"
    # Asking for more than the server returns gives at most top_logprobs (+1: the sampled token).
    assert len(state.top_tokens(500)) <= llama.top_logprobs + 1


def test_suffix_and_advance_append_text(llama: OpenAICompatSource) -> None:
    opened = llama.open(["The capital of France is"], suffix=[" Paris", ","])
    advanced = llama.open(["The capital of France is"])
    advanced.advance(" Paris")
    advanced.advance(",")
    cands = opened.top_tokens(5)
    np.testing.assert_allclose(opened.probs(cands), advanced.probs(cands), rtol=1e-5)
    assert llama.decode([" Paris", ","]) == " Paris,"


def test_end_of_sequence_is_reported(llama_base: str) -> None:
    """When end-of-sequence is the greedy token, llama.cpp returns no logprobs unless biased."""
    chat_end = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n<|im_start|>assistant\nHi!"
    with OpenAICompatSource("openai/smollm2", llama_base, api_key="unused", timeout=300) as plain:
        state = plain.open([chat_end])
        assert state.top_tokens(5) == [""]  # point mass on the end token
        assert plain.is_end(state.top_tokens(1)[0])
    with OpenAICompatSource("openai/smollm2", llama_base, api_key="unused", timeout=300,
                            end_token_ids=SMOLLM2_END_IDS) as biased:
        state = biased.open([chat_end])
        top = state.top_tokens(5)
        assert len(top) == 5 and "" in top  # the real distribution, end token included
        p_end = state.probs([""])[0, 0]
        assert 0.0 < p_end < 1.0


TREC_POOL = [
    Example(t, "LOC") for t in [
        "Where is the Eiffel Tower?", "What country borders Spain to the north?",
        "Which city hosts the Louvre?", "Where do koalas live?", "What is the capital of Peru?",
        "Where is Mount Kilimanjaro?", "Which river flows through Cairo?",
        "In what state is Yellowstone?", "Where was the Magna Carta signed?",
        "What continent is Chile on?", "Where is the Great Barrier Reef?",
        "Which country has the city of Kyoto?", "Where is the Sahara desert?",
        "What ocean lies west of Portugal?", "Where are the Andes?",
        "Which city is called the Big Apple?", "Where is Lake Baikal?",
        "What island is Honolulu on?", "Where did the Titanic sink?", "Which country is Oslo in?",
    ]
]


@pytest.mark.parametrize("mode,epsilon,sigma", [("resample", math.inf, None), ("resample", None, 1.0), ("fixed", None, 1.0)])
def test_generate_demonstration_end_to_end(llama: OpenAICompatSource, mode: str, epsilon: float | None, sigma: float | None) -> None:
    config = GenerationConfig(mode=mode, num_subsets=2, shots_per_subset=2, max_tokens=5, top_k=10,
                              epsilon=epsilon, sigma=sigma)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": float(len(TREC_POOL))}, delta=1e-5)
    demo = generate_demonstration(llama, TREC_PROMPT, TREC_POOL, "LOC", config, plan.labels["LOC"], Noise(seed=3))
    assert demo.text and demo.tokens >= 1
    assert demo.text == llama.decode(demo.token_ids).strip()
    assert all(isinstance(t, str) for t in demo.token_ids)
    assert demo.model_calls >= 2 * demo.tokens - 1  # public + private call batches per token
    if sigma is None:
        assert plan.labels["LOC"].sigma is None  # epsilon = infinity: no noise
    else:
        assert plan.labels["LOC"].sigma == sigma


# ---------------------------------------------------------------------------------------------
# Fake upstreams on loopback for the fault paths.

GOOD_TOP = {" yes": math.log(0.6), " no": math.log(0.3)}


class _Fake:
    """A tiny /v1/completions server whose failure policy is a function of (call number, body)."""

    def __init__(self, policy: Callable[[int, dict], tuple[int, float]], error: str = "cannot handle prompt {prompt!r}"):
        self.policy = policy
        self.error = error
        self.prompts: list[str] = []
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with fake.lock:
                    fake.calls += 1
                    n = fake.calls
                    fake.prompts.append(body["prompt"])
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.auth.append(self.headers.get("authorization", ""))
                try:
                    status, delay = fake.policy(n, body)
                    time.sleep(delay)
                    if status == 200:
                        payload = {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                                   "choices": [{"text": " yes", "index": 0, "finish_reason": "length",
                                                "logprobs": {"tokens": [" yes"], "token_logprobs": [GOOD_TOP[" yes"]],
                                                             "text_offset": [0], "top_logprobs": [GOOD_TOP]}}]}
                    else:  # echo the prompt, as real servers sometimes do: it must not leak
                        payload = {"error": {"message": fake.error.format(prompt=body["prompt"]),
                                             "type": "invalid_request_error" if status == 400 else "server_error"}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server() -> Iterator[Callable[[Callable[[int, dict], tuple[int, float]]], _Fake]]:
    made: list[_Fake] = []

    def make(policy: Callable[[int, dict], tuple[int, float]]) -> _Fake:
        made.append(_Fake(policy))
        return made[-1]

    yield make
    for f in made:
        f.close()


def _source(base: str, **kw: object) -> OpenAICompatSource:
    opts: dict = dict(api_key="sk-test-secret", retries=3, backoff=0.001, timeout=5.0)
    opts.update(kw)
    return OpenAICompatSource("openai/fake", base, **opts)


PRIVATE = ["SECRET-RECORD-1 alice@example.com", "SECRET-RECORD-2", "SECRET-RECORD-3"]


def test_transient_failures_are_retried(fake_server: Callable) -> None:
    fake = fake_server(lambda n, body: (503, 0.0) if n <= 4 else (200, 0.0))
    with _source(fake.base) as src:
        probs = src.open(PRIVATE).probs([" yes", " no", " maybe"])
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs, [[0.6, 0.3, 0.0]] * 3, rtol=1e-9)
    assert fake.calls == 3 + 4  # every failed call was retried, none dropped
    assert src.requests == fake.calls


def test_rate_limit_and_timeout_are_retried(fake_server: Callable) -> None:
    # Call 2 answers long after the client's timeout; later calls answer at once.
    fake = fake_server(lambda n, body: {1: (429, 0.0), 2: (200, 6.0)}.get(n, (200, 0.0)))
    with _source(fake.base, timeout=2.0, max_concurrency=1) as src:
        probs = src.open(PRIVATE[:1]).probs([" yes"])
    assert probs.shape == (1, 1) and probs[0, 0] == pytest.approx(0.6)
    assert fake.calls >= 3 and src.requests >= 3  # 429, then a timed-out attempt, then success


def _assert_no_leak(err: SourceError) -> None:
    text = f"{err} {err!r} {err.__context__!r} {err.__cause__!r}"
    assert "SECRET" not in text and "alice" not in text and "sk-test-secret" not in text
    assert err.__context__ is None and err.__cause__ is None


def test_persistent_failure_gives_a_zero_row_not_fewer_rows(fake_server: Callable) -> None:
    # Only the prompt holding record 2 fails, always: its row is all-zero, the others are intact.
    fake = fake_server(lambda n, body: (503, 0.0) if "RECORD-2" in body["prompt"] else (200, 0.0))
    with _source(fake.base, retries=2) as src:
        state = src.open(PRIVATE)
        probs = state.probs([" yes", " no"])
    np.testing.assert_allclose(probs, [[0.6, 0.3], [0.0, 0.0], [0.6, 0.3]], rtol=1e-9)
    assert state.failed_rows == 1 and src.failed_rows == 1
    assert fake.calls == 2 + 3  # the failing prompt was tried 3 times; nothing else was sent


def test_every_row_failing_with_a_working_upstream_gives_zero_rows(fake_server: Callable) -> None:
    # Every private prompt is refused: zero rows, no abort, and no extra call that a private
    # failure would trigger (the old rule sent a probe here).
    fake = fake_server(lambda n, body: (400, 0.0) if "SECRET" in body["prompt"] else (200, 0.0))
    with _source(fake.base) as src:
        probs = src.open(PRIVATE).probs([" yes", " no"])
    assert probs.shape == (3, 2) and not probs.any()
    assert fake.calls == 3 and src.failed_rows == 3


def test_a_down_upstream_fails_the_public_call_not_the_private_rows(fake_server: Callable) -> None:
    # Private calls never abort a step, even when all of them fail: the abort is decided by the
    # public prompt's call, which every step makes whatever the data.
    fake = fake_server(lambda n, body: (503, 0.0))
    with _source(fake.base, retries=1) as src:
        probs = src.open(PRIVATE).probs([" yes"])
        assert probs.shape == (3, 1) and not probs.any()
        assert fake.calls == 3 * 2  # every row retried once, and nothing else sent
        with pytest.raises(SourceError) as info:
            src.open(["public prompt"]).top_tokens(5)
    _assert_no_leak(info.value)
    assert info.value.status == 503 and fake.calls == 3 * 2 + 2
    # A closed port: connection errors, the same outcome.
    with _source(f"http://127.0.0.1:{_free_port()}/v1", retries=0) as src:
        assert not src.open(PRIVATE).probs([" yes"]).any()
        with pytest.raises(SourceError) as info:
            src.open(["public prompt"]).top_tokens(5)
    _assert_no_leak(info.value)


def test_always_failing_server_raises(fake_server: Callable) -> None:
    fake = fake_server(lambda n, body: (503, 0.0))
    with _source(fake.base, retries=1) as src:
        with pytest.raises(SourceError) as info:
            src.open(PRIVATE).top_tokens(5)  # prompt 0 is the public prompt: its failure is public
    _assert_no_leak(info.value)
    assert fake.calls == 2  # one call (prompt 0 only) and one retry


def test_client_errors_are_not_retried(fake_server: Callable) -> None:
    fake = fake_server(lambda n, body: (400, 0.0))
    with _source(fake.base, retries=5, max_concurrency=1) as src:
        with pytest.raises(SourceError) as info:
            src.open(PRIVATE[:1]).top_tokens(3)
    _assert_no_leak(info.value)
    assert info.value.status == 400 and fake.calls == 1


def test_concurrency_is_bounded_and_key_sent_not_shown(fake_server: Callable) -> None:
    fake = fake_server(lambda n, body: (200, 0.05))
    with _source(fake.base, max_concurrency=2) as src:
        probs = src.open([f"prompt {i}" for i in range(8)]).probs([" yes"])
        assert "sk-test-secret" not in repr(src)
    assert probs.shape == (8, 1)
    assert 1 <= fake.max_in_flight <= 2
    assert all(a == "Bearer sk-test-secret" for a in fake.auth)


def test_full_vocabulary_is_refused() -> None:
    src = OpenAICompatSource("openai/none", "http://127.0.0.1:9/v1")
    assert src.vocabulary() is None
    with pytest.raises(ValueError):
        src.open(["x"]).probs(None)


# ---------------------------------------------------------------------------------------------
# A public length budget, and one long private record (issue 10, part 4).

CONTEXT_CHARS = 400  # the fake provider's context window, in characters
CONTEXT_ERROR = ("This model's maximum context length is 100 tokens. However, your messages resulted in "
                 "more tokens. Prompt: {prompt!r}")
LONG_RECORD = "SECRET-LONG " + "lorem ipsum dolor sit amet " * 30




def test_count_tokens_is_a_public_upper_bound() -> None:
    src = OpenAICompatSource("openai/none", "http://127.0.0.1:9/v1")
    assert src.count_tokens("") == 2 and src.count_tokens("abc") == 5
    assert src.count_tokens("é") == 4  # UTF-8 bytes, not characters
    assert src.count_tokens("b", prefix="a") == src.count_tokens("ab")
    coarse = OpenAICompatSource("openai/none", "http://127.0.0.1:9/v1", bytes_per_token=4.0)
    assert coarse.count_tokens("x" * 40) == 12
    # An upper bound for a real byte-level BPE tokenizer (SmolLM2's), even on unusual text.
    from transformers import AutoTokenizer

    from aggregation.sources.local import ensure_smollm2

    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    for text in [TREC_PROMPT.generation_prompt(TREC_POOL[:3], "LOC"), "ünïcödé ✓ 漢字 🙂", LONG_RECORD, " \n\t "]:
        assert len(tok(text)["input_ids"]) <= src.count_tokens(text)


def test_a_long_record_costs_its_row_only(fake_server: Callable) -> None:
    fake = fake_server(lambda n, body: (400, 0.0) if len(body["prompt"]) > CONTEXT_CHARS else (200, 0.0))
    fake.error = CONTEXT_ERROR
    short = ["SECRET-A where ?", "SECRET-B who ?"]
    with _source(fake.base) as src:
        with_long = src.open([short[0], LONG_RECORD, short[1]]).probs([" yes", " no"])
        without = src.open(short).probs([" yes", " no"])
    np.testing.assert_allclose(with_long[[0, 2]], without, rtol=1e-12)
    assert not with_long[1].any()
    assert fake.calls == 3 + 2  # the rejected prompt was not retried, and nothing else was sent


def _generate(src: OpenAICompatSource, pool: list[Example], seed: int, **kw: object):
    config = GenerationConfig(mode="resample", num_subsets=3, shots_per_subset=2, max_tokens=4, top_k=5,
                              sigma=1.0, **kw)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": float(len(pool))}, delta=1e-5)
    return generate_demonstration(src, TREC_PROMPT, pool, "LOC", config, plan.labels["LOC"], Noise(seed=seed))


POOL_WITH_LONG = [Example(f"SECRET-{i} Where is city {i} ?", "LOC") for i in range(7)] + [Example(LONG_RECORD, "LOC")]


def test_generation_fits_api_prompts_into_the_public_budget(fake_server: Callable) -> None:
    fake = fake_server(lambda n, body: (400, 0.0) if len(body["prompt"]) > CONTEXT_CHARS else (200, 0.0))
    with _source(fake.base) as src:
        for seed in range(3):
            demo = _generate(src, POOL_WITH_LONG, seed, max_prompt_tokens=CONTEXT_CHARS - 40)
            assert demo.tokens == 4
        assert src.failed_rows == 0
    assert max(len(p) for p in fake.prompts) <= CONTEXT_CHARS  # the long record was left out


def test_generation_survives_a_record_the_provider_rejects(fake_server: Callable) -> None:
    # A budget that admits the long record (4 bytes per token): the provider refuses its prompts,
    # which become zero rows; the generation neither fails nor changes shape because of it.
    fake = fake_server(lambda n, body: (400, 0.0) if len(body["prompt"]) > CONTEXT_CHARS else (200, 0.0))
    fake.error = CONTEXT_ERROR
    with _source(fake.base, bytes_per_token=4.0) as src:
        demos = [_generate(src, POOL_WITH_LONG, seed, max_prompt_tokens=1000) for seed in range(3)]
        assert src.failed_rows > 0  # the long record was sampled and refused at least once
        baseline = [_generate(src, POOL_WITH_LONG[:-1], seed, max_prompt_tokens=1000) for seed in range(3)]
    for demo, base in zip(demos, baseline):
        assert demo.tokens == base.tokens == 4
        assert demo.model_calls == base.model_calls  # M rows per step either way, no extra calls


# ---------------------------------------------------------------------------------------------
# The abort rule reads public calls only (issue 20, section 5).


def _generate_m1(src: OpenAICompatSource, pool: list[Example], seed: int, **kw: object):
    config = GenerationConfig(mode="resample", num_subsets=1, shots_per_subset=2, max_tokens=3, top_k=5,
                              sigma=1.0, max_prompt_tokens=1000, **kw)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 2.0}, delta=1e-5)
    assert plan.labels["LOC"].q == 1.0  # every record is sampled in every step
    return generate_demonstration(src, TREC_PROMPT, pool, "LOC", config, plan.labels["LOC"], Noise(seed=seed))


def test_a_refused_record_cannot_make_a_flaky_upstream_abort_the_step(fake_server: Callable) -> None:
    # M = 1. The upstream refuses any prompt holding the record "SECRET-REFUSED", and is flaky for
    # every call that is not a generation prompt (the old rule's probe "Hello" fails). With the
    # old rule (abort when every private call *and* the probe fail) D + the record aborted every
    # step and D never did. Now both run: the abort depends on the public prompt's call only.
    def policy(n: int, body: dict) -> tuple[int, float]:
        if "SECRET-REFUSED" in body["prompt"]:
            return 400, 0.0
        return (200, 0.0) if "Answer type" in body["prompt"] or "Question" in body["prompt"] else (503, 0.0)

    fake = fake_server(policy)
    d = [Example("SECRET-OK where is it ?", "LOC")]
    with _source(fake.base, retries=0) as src:
        without = _generate_m1(src, d, seed=1)
        with_record = _generate_m1(src, d + [Example("SECRET-REFUSED who is it ?", "LOC")], seed=1)
        assert src.failed_rows == with_record.tokens  # the refused record's prompt: a zero row per step
    assert without.tokens == with_record.tokens == 3
    assert with_record.model_calls == without.model_calls


def test_public_prior_on_an_api_sends_the_public_prompt_once_per_step(fake_server: Callable) -> None:
    # The public prompt's reply is read once per step (top list and probabilities) with public
    # failure rules; it used to be sent a second time as if it were a private row.
    fake = fake_server(lambda n, body: (200, 0.0))
    pool = [Example(f"SECRET-{i} where ?", "LOC") for i in range(4)]
    config = GenerationConfig(mode="resample", mechanism="public_prior", num_subsets=2, shots_per_subset=1,
                              max_tokens=3, top_k=2, epsilon=2.0)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 400.0}, delta=1e-5)
    with _source(fake.base) as src:
        demo = generate_demonstration(src, TREC_PROMPT, pool, "LOC", config, plan.labels["LOC"], Noise(seed=0))
    assert demo.tokens == 3 and fake.calls == 3 * (1 + 2)  # per step: the public prompt and M = 2 rows
