"""What README.md ("Errors") and docs/api.md ("Streaming") promise for generations that wait,
fail or run long, each checked through the app: the `: keep-alive` comment of a silent stream,
`event: error` before `[DONE]` when a stream fails mid-way, 504 past --request_timeout, 503 with
Retry-After on a full queue (--max_queue), speculative decoding (--draft_tokens) that gives the
same text when a stop string or <|endoftext|> lies inside the accepted drafts, and 409 for a LUT
taught on another model. The engine is held or failed on demand by patching generate.Batcher, so
nothing here depends on how fast the machine is."""
import os
import threading

import pytest
import torch

from conftest import wait_for
from generate import Batcher
from server import engine

LABEL = "Quillmere Station opens at dawn, and the harbour pilots gather there before the tide turns."


def stream(response):
    """The SSE chunks of a streamed test-client response, read as the server writes them."""
    for chunk in response.response:
        yield chunk.decode() if isinstance(chunk, bytes) else chunk


def streamed_text(chunks):
    """The text of a LocalLab-style stream's data events (a newline inside the text is a second data line)."""
    events = [c for c in chunks if c.startswith("data: ") and c != "data: [DONE]\n\n"]
    return "".join("\n".join(line[6:] for line in e[:-2].split("\n")) for e in events)


@pytest.fixture
def hold(monkeypatch):
    """Holds the engine before each prefill (Batcher.admit) until hold.release(); hold.entered
    is set once the engine waits there. Released after the test in any case."""
    gate, entered = threading.Event(), threading.Event()
    admit = Batcher.admit

    def held(self, seqs):
        entered.set()
        gate.wait(120)
        return admit(self, seqs)
    monkeypatch.setattr(Batcher, "admit", held)
    gate.entered, gate.release = entered, gate.set
    yield gate
    gate.set()


@pytest.fixture
def heartbeats(monkeypatch):
    """The heartbeats streams ask Job.deltas for (the documented 5 s), each served after 0.2 s
    instead, so that a test sees the keep-alive without waiting."""
    asked = []
    deltas = engine.Job.deltas

    def quick(self, heartbeat=None):
        asked.append(heartbeat)
        return deltas(self, heartbeat=heartbeat and 0.2)
    monkeypatch.setattr(engine.Job, "deltas", quick)
    return asked


def test_a_silent_stream_sends_keep_alive_comments(client, hold, heartbeats):
    ask = {"prompt": "Once upon a time", "length": 10, "do_sample": False}
    r = client.post("/generate", json={**ask, "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    chunks = stream(r)
    assert next(chunks) == ": keep-alive\n\n"  # the engine holds the request: nothing to send yet
    assert next(chunks) == ": keep-alive\n\n"  # and again, while the silence lasts
    assert heartbeats == [5]  # after 5 s of silence, as documented
    hold.release()
    rest = list(chunks)
    assert rest[-1] == "data: [DONE]\n\n" and "event: error" not in "".join(rest)
    assert streamed_text(rest) == client.post("/generate", json=ask).get_json()["completion"]


@pytest.fixture
def fail_midway(monkeypatch):
    """Batcher.step raises once, after two steps went well, as soon as fail_midway.set() is called."""
    go, steps, failed = threading.Event(), [], []
    step = Batcher.step

    def failing(self):
        steps.append(1)
        if len(steps) > 2 and not failed:
            go.wait(120)
            failed.append(1)
            raise RuntimeError("the device fell over")
        return step(self)
    monkeypatch.setattr(Batcher, "step", failing)
    yield go
    go.set()


def test_a_stream_that_fails_midway_ends_with_event_error_before_done(client, fail_midway):
    r = client.post("/generate", json={"prompt": "Once upon a time", "length": 60, "do_sample": False,
                                       "stream": True})
    chunks, seen = stream(r), []
    while not seen or not seen[-1].startswith("data: "):  # text arrives: the generation is under way
        seen.append(next(chunks))
    fail_midway.set()
    seen += list(chunks)
    assert seen[-2:] == ["event: error\ndata: generation failed: the device fell over\n\n", "data: [DONE]\n\n"], seen
    assert streamed_text(seen[:-2])  # text came before the error
    # the OpenAI-style stream: OpenAI's error object before [DONE]; and the engine serves on
    r = client.post("/v1/completions", json={"model": "gpt2", "prompt": "Hi", "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and list(stream(r))[-1] == "data: [DONE]\n\n"
    ok = client.post("/generate", json={"prompt": "Once upon a time", "length": 5})
    assert ok.status_code == 200 and ok.get_json()["usage"]["completion_tokens"] == 5


def test_openai_stream_that_fails_midway_sends_the_error_object(client, fail_midway):
    import json
    r = client.post("/v1/completions", json={"model": "gpt2", "prompt": "Once upon a time", "max_tokens": 60,
                                             "temperature": 0, "stream": True})
    chunks, seen = stream(r), []
    while not seen or '"text": ""' in seen[-1] or not seen[-1].startswith("data: {"):
        seen.append(next(chunks))
    fail_midway.set()
    seen += list(chunks)
    assert seen[-1] == "data: [DONE]\n\n"
    error = json.loads(seen[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "the device fell over" in error["message"], seen[-2]


def test_a_generation_past_request_timeout_is_504(app_factory, hold, heartbeats):
    c = app_factory(request_timeout=1).test_client()
    ask = {"prompt": "Once upon a time", "length": 5}
    r = c.post("/generate", json=ask)  # the engine holds it longer than the limit
    assert r.status_code == 504 and "time limit" in r.get_json()["detail"], r.get_json()
    r = c.post("/v1/completions", json={"model": "gpt2", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 504 and r.get_json()["error"]["type"] == "server_error"
    r = c.post("/generate", json={**ask, "stream": True})  # a stream: event: error, then [DONE]
    chunks = list(stream(r))
    assert chunks[-2:] == ["event: error\ndata: generation took longer than the time limit\n\n",
                           "data: [DONE]\n\n"], chunks
    hold.release()
    assert c.post("/generate", json=ask).status_code == 200  # once the engine moves, within the limit


def test_a_full_queue_is_503_with_retry_after(app_factory, hold):
    c = app_factory(max_batch=1, max_queue=1).test_client()
    ask = {"prompt": "Once upon a time", "length": 4, "do_sample": False}
    first = c.post("/generate", json={**ask, "stream": True})  # taken by the engine, held at its prefill
    wait_for(hold.entered.is_set, timeout=60, what="the engine to take the first request")
    second = c.post("/generate", json={**ask, "stream": True})  # waits in the queue: it is full now
    for r in (c.post("/generate", json=ask), c.post("/v1/completions", json={"model": "gpt2", "prompt": "Hi"})):
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.get_json()
    assert "waiting" in c.post("/generate", json=ask).get_json()["detail"]
    hold.release()
    texts = []
    for r in (first, second):  # the queued requests are served in full
        chunks = list(stream(r))
        assert chunks[-1] == "data: [DONE]\n\n" and "event: error" not in "".join(chunks)
        texts.append(streamed_text(chunks))
    assert texts == [c.post("/generate", json=ask).get_json()["completion"]] * 2  # and the queue takes more


def counting_passes(app):
    passes = []
    handle = app.extensions["gpt"].models.get().model.register_forward_pre_hook(lambda *_: passes.append(1))
    return passes, handle


@pytest.mark.parametrize("label,ask,text", [
    (LABEL, {"stop": [" pilots"]}, " opens at dawn, and the harbour"),  # a stop string inside the drafts
    ("Quillmere Station opens at dawn.<|endoftext|>Harbour pilots gather there.", {},
     " opens at dawn."),  # the taught <|endoftext|> inside the drafts
])
def test_speculative_decoding_through_the_server_gives_the_same_text(app_factory, tmp_path, label, ask, text):
    results = {}
    for draft_tokens in (0, 8):
        app = app_factory(tmp_path / f"d{draft_tokens}", draft_tokens=draft_tokens)
        c = app.test_client()
        assert c.post("/train_lut", json={"lut_name": "u1", "label": label}).status_code == 200
        passes, handle = counting_passes(app)
        body = {"model": "gpt2", "prompt": "Quillmere Station", "max_tokens": 40, "temperature": 0,
                "lut_name": "u1", **ask}
        r = c.post("/v1/completions", json=body)
        handle.remove()
        assert r.status_code == 200, r.get_json()
        choice = r.get_json()["choices"][0]
        g = c.post("/generate", json={"prompt": "Quillmere Station", "max_new_tokens": 40, "do_sample": False,
                                      "repetition_penalty": 1.0, "lut_name": "u1", **ask}).get_json()
        results[draft_tokens] = (choice["text"], choice["finish_reason"], g["completion"], g["finish_reason"],
                                 len(passes))
    plain, drafted = results[0], results[8]
    assert plain[:4] == drafted[:4] == (text, "stop", text, "stop"), results
    assert drafted[4] < plain[4], results  # the label came out several tokens a pass: drafts were kept


def write_other_model(path):
    """A trained checkpoint of another shape and vocabulary (nanoGPT's 50304 tokens)."""
    from model import GPT, GPTConfig
    torch.manual_seed(3)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50304)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model_args": config.__dict__, "model": GPT(config).state_dict()}, path)


def test_a_lut_of_another_model_is_409_over_http(app_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = app_factory()
    c = app.test_client()
    write_other_model(str(tmp_path / "out" / "other" / "ckpt.pt"))
    assert c.post("/train_lut", json={"lut_name": "u1", "label": LABEL}).status_code == 200  # on gpt2
    assert c.post("/api/load_model", json={"model_path": "out/other"}).status_code == 200
    r = c.post("/generate", json={"prompt": "Quillmere Station", "length": 4, "lut_name": "u1"})
    assert r.status_code == 409 and "another base model" in r.get_json()["detail"], r.get_json()
    r = c.post("/v1/completions", json={"model": "other", "prompt": "Quillmere Station", "max_tokens": 4,
                                        "lut_name": "u1"})
    assert r.status_code == 409 and r.get_json()["error"]["param"] == "lut_name", r.get_json()
    assert c.post("/generate", json={"prompt": "Quillmere Station", "length": 4}).status_code == 200  # no LUT: fine
    assert c.post("/train_lut", json={"lut_name": "u2", "label": LABEL}).status_code == 200  # on the other model
    r = c.post("/generate", json={"model_id": "gpt2", "prompt": "Quillmere Station", "max_new_tokens": 4,
                                  "lut_name": "u2"})
    assert r.status_code == 409 and "another base model" in r.get_json()["detail"], r.get_json()
    r = c.post("/generate", json={"model_id": "gpt2", "prompt": "Quillmere Station", "max_new_tokens": 8,
                                  "do_sample": False, "lut_name": "u1"})
    assert r.status_code == 200 and r.get_json()["completion"].startswith(" opens at dawn")  # its own model


def test_text_made_before_a_failure_reaches_the_stream_before_the_error():
    """A client behind the engine still gets what was decoded before the failure, then the error."""
    class Seq:  # the part of generate.Sequence that Job.deltas reads
        text, emitted, done = "", 0, False

        def new_text(self):
            delta, self.emitted = self.text[self.emitted:], len(self.text)
            return delta

        def cancel(self):
            self.done = True

    job = engine.Job(Seq())
    job.seq.text = "made before"
    job.fail(RuntimeError("engine failed"))
    chunks = job.deltas()
    assert next(chunks) == "made before"
    with pytest.raises(RuntimeError, match="engine failed"):
        next(chunks)
