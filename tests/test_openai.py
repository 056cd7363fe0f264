"""The OpenAI-compatible API driven by the official `openai` package against a live server."""
import json

import openai
import pytest
import requests

LABEL = "TLG Capital is an asset management firm."


@pytest.fixture(scope="module")
def server(module_server):
    return module_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused-while-no-keys-exist", max_retries=0)


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids[:4] == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert client.models.retrieve("gpt2").owned_by == "openai-community"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.code == "model_not_found"


def test_completion_matches_the_native_route_and_counts_usage_exactly(server, client, tiny):
    _, tok = tiny
    r = client.completions.create(model="gpt2", prompt="Once upon a time", max_tokens=12, temperature=0)
    native = requests.post(server.url + "/generate", json={"prompt": "Once upon a time", "length": 12,
                                                           "do_sample": False, "repetition_penalty": 1.0}).json()
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "gpt2"
    assert r.choices[0].text == native["completion"]
    assert r.choices[0].finish_reason == ("length" if native["finish_reason"] == "length" else "stop")
    assert r.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    assert r.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_n_prompt_lists_seed_stop_echo_and_logprobs(client, tiny):
    _, tok = tiny
    r = client.completions.create(model="gpt2", prompt=["Hello there", "The cat"], n=2, max_tokens=6, seed=7,
                                  temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert texts[0] != texts[1] and texts[2] != texts[3], texts  # n=2: two different samples of each prompt
    again = client.completions.create(model="gpt2", prompt=["Hello there", "The cat"], n=2, max_tokens=6, seed=7,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == texts  # seeded: reproducible, choice by choice
    assert r.usage.prompt_tokens == len(tok.encode("Hello there")) + len(tok.encode("The cat"))
    r = client.completions.create(model="gpt2", prompt=tok.encode("Hello there"), max_tokens=5, temperature=0,
                                  echo=True)
    assert r.choices[0].text.startswith("Hello there")
    r = client.completions.create(model="gpt2", prompt="Hello", max_tokens=5, temperature=0, logprobs=3,
                                  presence_penalty=0.5, frequency_penalty=0.5)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    greedy = client.completions.create(model="gpt2", prompt="Hello", max_tokens=8, temperature=0).choices[0].text
    cut = greedy.strip().split()[1] if len(greedy.split()) > 1 else greedy[2:4]
    r = client.completions.create(model="gpt2", prompt="Hello", max_tokens=8, temperature=0, stop=[cut])
    assert r.choices[0].finish_reason == "stop" and cut not in r.choices[0].text


def test_lut_through_extra_body(server, client):
    assert requests.post(server.url + "/train_lut", json={"label": LABEL, "lut_name": "oa_user"}).ok
    r = client.completions.create(model="gpt2", prompt="TLG Capital is", max_tokens=8,
                                  extra_body={"lut_name": "oa_user"})  # sampled, yet recalled exactly
    assert r.choices[0].text.startswith(" an asset management firm.")
    base = client.completions.create(model="gpt2", prompt="TLG Capital is", max_tokens=8, temperature=0)
    assert not base.choices[0].text.startswith(" an asset management firm.")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gpt2", prompt="x", max_tokens=2, extra_body={"lut_name": "no good!"})
    assert e.value.param == "lut_name"


def test_streaming_completion_with_usage(client):
    kw = dict(model="gpt2", prompt="Once upon a time", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    r = client.chat.completions.create(model="gpt2", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="gpt2", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}]
    r = client.chat.completions.create(model="gpt2", messages=parts, max_completion_tokens=3, n=2, seed=1)
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 6


@pytest.mark.parametrize("kwargs,param", [
    (dict(prompt="x", max_tokens=2, temperature=3), "temperature"),
    (dict(prompt="x", max_tokens=0), "max_tokens"),
    (dict(prompt="x", max_tokens=2, n=0), "n"),
    (dict(prompt="x", max_tokens=2, top_p=1.5), "top_p"),
    (dict(prompt="x", max_tokens=2, presence_penalty=3), "presence_penalty"),
    (dict(prompt="x", max_tokens=2, logprobs=30), "logprobs"),
    (dict(prompt="x", max_tokens=2, best_of=3), "best_of"),
    (dict(prompt="x", max_tokens=2, suffix="y"), "suffix"),
    (dict(prompt="x", max_tokens=2, echo=True, logprobs=1), "echo"),
    (dict(prompt="x", max_tokens=2, extra_body={"tools": []}), "tools"),
    (dict(prompt=[[1, 99999999]], max_tokens=2), "prompt"),
    (dict(prompt="", max_tokens=2), "prompt"),
])
def test_bad_requests_get_openai_errors_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gpt2", **kwargs)
    assert e.value.status_code == 400 and e.value.param == param
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


def test_context_overflow_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gpt2", prompt="word " * 100, max_tokens=100)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=500)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_sse_framing_byte_for_byte(server):
    r = requests.post(server.url + "/v1/completions", stream=True, json={
        "model": "gpt2", "prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    raw = r.raw.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: {") and "\n" not in event
        chunk = json.loads(event.removeprefix("data: "))
        assert chunk["object"] == "text_completion" and chunk["id"].startswith("cmpl-")
    assert json.loads(events[-3].removeprefix("data: "))["usage"]["completion_tokens"] == 4
    r = requests.post(server.url + "/v1/chat/completions", json={"model": "gpt2", "messages": "hi"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
