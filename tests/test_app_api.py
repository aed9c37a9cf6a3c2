"""OpenAI-compatible routes against a real uvicorn server: the official openai client, injection,
pass-through, model listing, client keys and admin auth."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from proxy.app import create_app
from tests.test_app_support import (  # noqa: F401 - fixtures
    CLIENT_KEY, FAKE_MODEL, LiveServer, admin_headers, assert_openai_error, dataset_rows,
    fake_upstream, jsonl_bytes, make_config, task_spec, tiny_model_dir, upload,
)

INSTRUCTION = "Classify the question by the type of its answer."


@pytest.fixture(scope="module")
def module_fake():
    from proxy.devtools.fake_upstream import FakeUpstream

    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def served(tmp_path_factory, module_fake, tiny_model_dir):
    """One server for the module: task 'trec' (config), a client key allowed to use it, warmed demos."""
    tmp_path = tmp_path_factory.mktemp("served")
    fake_upstream = module_fake
    spec = task_spec("trec", "questions", generation={"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1,
                                                      "max_tokens": 3, "top_k": 8, "sigma": 1.0})
    label_spec = {**spec, "name": "trec-label", "upstream": "local/smollm2", "answer": "label"}
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir, tasks=[spec, label_spec],
                      client_tasks=["trec", "trec-label"])
    with LiveServer(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert upload(http, "questions", jsonl_bytes(dataset_rows()), epsilon=20).status_code == 201
        warm = http.post("/admin/tasks/trec/demos", headers=admin_headers(), json={"wait": True})
        assert warm.status_code == 200, warm.text
        # The label task's set is generated in the background; its test waits for it.
        assert http.post("/admin/tasks/trec-label/demos", headers=admin_headers()).status_code in (200, 202)
        yield srv, http, fake_upstream, warm.json()["result"]


def _client(srv: LiveServer, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _assert_injected(system: str, demos: list[dict]) -> None:
    assert system.startswith(INSTRUCTION)
    words = {"LOC": "location", "NUM": "number", "HUM": "person"}
    for d in demos:
        block = f"Question: {' '.join(d['text'].split())}\nAnswer type: {words[d['label']]}"
        assert block in system, (block, system)
    assert system.count("Answer type:") == len(demos)


def test_openai_client_chat_injects_demonstrations(served):
    srv, _, fake, warm = served
    client = _client(srv)
    out = client.chat.completions.create(model="trec", messages=[{"role": "user", "content": "Question: Where is Rome?"}])
    sent = fake.state.last_body
    assert sent["model"] == FAKE_MODEL
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    _assert_injected(sent["messages"][0]["content"], warm["demonstrations"])
    assert sent["messages"][1] == {"role": "user", "content": "Question: Where is Rome?"}
    # The upstream's answer comes back unchanged (the fake reports what it received).
    assert out.choices[0].message.content == f"fake answer: 2 messages, {sum(len(m['content']) for m in sent['messages'])} chars"
    assert out.model == FAKE_MODEL


def test_chat_prepends_to_existing_system_message(served):
    srv, _, fake, warm = served
    _client(srv).chat.completions.create(model="trec", messages=[
        {"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Question: Who?"}])
    msgs = fake.state.last_body["messages"]
    assert len(msgs) == 2
    assert msgs[0]["content"].endswith("Answer with one word.")
    _assert_injected(msgs[0]["content"], warm["demonstrations"])


def test_openai_client_chat_streaming(served):
    srv, _, fake, warm = served
    stream = _client(srv).chat.completions.create(model="trec", stream=True,
                                                  messages=[{"role": "user", "content": "Question: How many?"}])
    text = "".join((chunk.choices[0].delta.content or "") for chunk in stream if chunk.choices)
    sent = fake.state.last_body
    assert sent["stream"] is True
    _assert_injected(sent["messages"][0]["content"], warm["demonstrations"])
    assert text.startswith("fake answer: 2 messages")


def test_raw_stream_ends_with_done(served):
    srv, http, _, _ = served
    r = http.post("/v1/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                  json={"model": "trec", "prompt": "Question: Why?\nAnswer type:", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.rstrip().endswith("data: [DONE]")


def test_openai_client_completions_prefix_and_stream(served):
    srv, _, fake, warm = served
    client = _client(srv)
    query = "Question: Where is Paris?\nAnswer type:"
    out = client.completions.create(model="trec", prompt=query, max_tokens=2)
    prompt = fake.state.last_body["prompt"]
    assert prompt.endswith(query)
    _assert_injected(prompt[: -len(query)], warm["demonstrations"])
    assert out.choices[0].text == f"fake answer: prompt {len(prompt)} chars"
    chunks = list(client.completions.create(model="trec", prompt=query, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("fake answer: prompt")
    assert fake.state.last_body["prompt"] == prompt


def test_pass_through_is_unchanged(served):
    srv, _, fake, _ = served
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hello"}], "temperature": 0.3,
            "user": "u-1", "max_tokens": 7, "some_vendor_field": {"x": [1, 2]}}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 200
    assert fake.state.last_body == body
    assert r.json()["choices"][0]["message"]["content"] == "fake answer: 1 messages, 5 chars"
    out = _client(srv).completions.create(model=FAKE_MODEL, prompt="abc")
    assert fake.state.last_body["prompt"] == "abc"
    assert out.choices[0].text == "fake answer: prompt 3 chars"


def test_models_list(served):
    srv, _, _, _ = served
    ids = {m.id for m in _client(srv).models.list()}
    assert {"trec", FAKE_MODEL, "local/smollm2"} <= ids


def test_client_key_rules(served):
    srv, http, _, _ = served
    chat = {"model": "trec", "messages": [{"role": "user", "content": "x"}]}
    assert_openai_error(http.post("/v1/chat/completions", json=chat), 401)
    assert_openai_error(http.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer nope"}), 401)
    assert http.post("/v1/chat/completions", json=chat, headers=admin_headers()).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _client(srv, key="wrong").chat.completions.create(**chat)
    # Clients never see budgets or datasets.
    for path in ("/admin/budget", "/admin/datasets", "/admin/tasks"):
        assert_openai_error(http.get(path, headers={"Authorization": f"Bearer {CLIENT_KEY}"}), 403)
        assert_openai_error(http.get(path), 401)
        assert_openai_error(http.get(path, headers={"Authorization": "Bearer nope"}), 401)


def test_client_key_limited_to_its_tasks(tmp_path, fake_upstream, tiny_model_dir):
    specs = [task_spec("allowed", "d", on_missing="error"), task_spec("other", "d", on_missing="error")]
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir, tasks=specs,
                      client_tasks=["allowed"])
    with LiveServer(create_app(cfg)) as srv:
        client = _client(srv)
        # A task the key may not use looks like one that does not exist (tests/test_exposure.py).
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
        ids = {m.id for m in client.models.list()}
        assert "allowed" in ids and "other" not in ids
        # The allowed task has no demonstrations yet and policy "error": a clear 409.
        with pytest.raises(openai.ConflictError) as info:
            client.chat.completions.create(model="allowed", messages=[{"role": "user", "content": "x"}])
        assert "POST /admin/tasks/allowed/demos" in str(info.value)


def test_open_mode_without_keys(tmp_path, fake_upstream):
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, None, admin=False)
    with LiveServer(create_app(cfg)) as srv:
        out = _client(srv, key="anything").chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content.startswith("fake answer")
        # No admin key configured: the admin API stays closed.
        err = assert_openai_error(httpx.get(srv.url + "/admin/budget"), 401)
        assert "DPICL_ADMIN_KEY" in err["message"]


def test_admin_key_closes_v1_unless_open(tmp_path, fake_upstream):
    for open_mode, expected in ((False, 401), (True, 200)):
        cfg = make_config(f"sqlite:///{tmp_path}/s{open_mode}.db", fake_upstream.base_url, None, open_mode=open_mode)
        with LiveServer(create_app(cfg)) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions",
                           json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == expected, r.text


def test_label_answer_task_replies_with_a_label_word(served):
    # answer: label -> the reply is one of the task's label words (the old code forwarded the
    # request and the model answered in free text), plain and streamed, chat and completions.
    srv, http, _, _ = served
    deadline = time.monotonic() + 900  # a loaded 2-core machine can take minutes
    while not http.get("/admin/tasks/trec-label/demos", headers=admin_headers()).json().get("cached"):
        assert time.monotonic() < deadline, "the label task's demonstrations were never cached"
        time.sleep(1)
    client = _client(srv)
    words = {"location", "number", "person"}
    query = "Question: What is the capital of Peru?\nAnswer type:"
    chat = client.chat.completions.create(model="trec-label", messages=[{"role": "user", "content": query}])
    assert chat.choices[0].message.content in words and chat.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="trec-label", stream=True, messages=[{"role": "user", "content": query}]) if c.choices)
    assert streamed == chat.choices[0].message.content
    text = client.completions.create(model="trec-label", prompt=query).choices[0].text
    assert text in words
    assert "".join(c.choices[0].text for c in client.completions.create(
        model="trec-label", prompt=query, stream=True) if c.choices) == text
    bad = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                     json={"model": "trec-label", "messages": [{"role": "user", "content": query}], "temperature": 9})
    assert_openai_error(bad, 400)  # the request's fields are still validated
