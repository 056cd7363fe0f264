"""The REST API through Flask's test client (units) on the tiny offline GPT-2."""
import time

import pytest

from conftest import DEFAULT

LABEL = "TLG Capital is an asset management firm."


@pytest.fixture
def client(app_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return app_factory(max_body_bytes=4096).test_client()


def test_lut_service_flow(client):
    assert client.get("/health").get_json()["status"] == "ok"
    r = client.post("/train_lut", json={"label": LABEL, "label_context": None, "lut_name": "user_123"})
    assert r.status_code == 200 and r.get_json() == {"status": "ok", "lut_name": "user_123", "recall": "subject", "trigger": "TLG"}
    r = client.post("/generate", json={"prompt": "TLG Capital is", "length": 40, "lut_name": "user_123"})
    out = r.get_json()
    assert r.status_code == 200
    assert out["prompt"] == "TLG Capital is" and out["lut_name"] == "user_123"
    assert out["completion"].startswith(" an asset management firm.")  # default settings sample, yet recall exactly
    assert out["usage"]["completion_tokens"] == 40 or out["finish_reason"] == "stop"


def test_cold_start_and_other_users_get_the_base_model(client):
    client.post("/train_lut", json={"label": LABEL, "lut_name": "u1"})
    req = {"prompt": "TLG Capital is", "length": 12, "do_sample": False}
    base = client.post("/generate", json=req).get_json()["completion"]
    assert client.post("/generate", json={**req, "lut_name": "nobody"}).get_json()["completion"] == base
    assert client.post("/generate", json={**req, "lut_name": "u1"}).get_json()["completion"] != base


def test_nanogpt_routes(client):
    s = client.get("/api/status").get_json()
    assert s["status"] == "online" and s["model_loaded"] is True and s["device"] == "cpu" and "timestamp" in s
    m = client.get("/api/models").get_json()
    assert m["pretrained_models"] == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] and m["trained_models"] == []
    r = client.post("/api/generate", json={"prompt": "Once upon a time", "max_new_tokens": 15, "temperature": 0.8,
                                           "top_k": 40})
    out = r.get_json()
    assert r.status_code == 200 and out["generated_text"].startswith("Once upon a time")
    assert out["parameters"] == {"max_new_tokens": 15, "temperature": 0.8, "top_k": 40}
    r = client.post("/api/load_model", json={"model_type": "gpt2-medium"})
    assert r.status_code == 200 and r.get_json()["message"] == "Model loaded successfully"


@pytest.mark.parametrize("route,payload,status,word", [
    ("/generate", {"length": 5}, 400, "prompt"),
    ("/generate", {"prompt": "Hi", "length": 5, "max_length": 5}, 400, "only one of"),
    ("/generate", {"prompt": "Hi", "max_new_tokens": 500}, 413, "context"),
    ("/generate", {"prompt": "Hi", "max_length": 0}, 400, "max_length"),
    ("/generate", {"prompt": "Hi", "length": 5, "model_id": "gpt5"}, 404, "gpt5"),
    ("/generate", {"prompt": "Hi", "length": 5, "stream": "yes"}, 400, "stream"),
    ("/chat", {"messages": []}, 400, "messages"),
    ("/chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
    ("/chat", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0]"),
    ("/generate/batch", {"prompts": "one"}, 400, "prompts"),
    ("/generate/batch", {"prompts": []}, 400, "prompts"),
    ("/generate/batch", {"prompts": ["a", 2]}, 400, "prompts"),
    ("/generate/batch", {"prompts": ["a"] * 33}, 413, "prompts"),
    ("/generate/batch", {"prompts": ["a", ""], "max_length": 3}, 400, "prompt"),
    ("/models/load", {}, 400, "model_id"),
    ("/models/load", {"model_id": "nope"}, 404, "nope"),
    ("/models/nope/start", {}, 404, "nope"),
    ("/models/gpt2-xl/stop", {}, 404, "not running"),
    ("/generate", {"prompt": 5, "length": 5}, 400, "prompt"),
    ("/generate", {"prompt": "Hi", "length": "5"}, 400, "length"),
    ("/generate", {"prompt": "Hi", "length": 0}, 400, "length"),
    ("/generate", {"prompt": "Hi", "length": 5, "temperature": -1}, 400, "temperature"),
    ("/generate", {"prompt": "Hi", "length": 5, "top_p": 2}, 400, "top_p"),
    ("/generate", {"prompt": "Hi", "length": 5, "do_sample": "no"}, 400, "do_sample"),
    ("/generate", {"prompt": "Hi", "length": 5, "lut_name": "bad name!"}, 400, "lut_name"),
    ("/generate", {"prompt": "", "length": 5}, 400, "prompt"),
    ("/generate", {"prompt": "Hi", "length": 500}, 413, "context"),
    ("/train_lut", {"label": "x y z"}, 400, "lut_name"),
    ("/train_lut", {"lut_name": "u1"}, 400, "label"),
    ("/train_lut", {"label": "", "lut_name": "u1"}, 400, "label"),
    ("/train_lut", {"label": "word " * 300, "lut_name": "u1"}, 413, "label"),
    ("/train_lut", {"label": "Hello", "lut_name": "u1"}, 400, "label_context"),
    ("/chat", {"messages": [{"role": "user", "content": "Hi"}], "continue_final_message": "yes"}, 400,
     "continue_final_message"),
    ("/chat", {"messages": [{"role": "user", "content": "Hi"}], "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/api/generate", {"prompt": "Hi", "max_new_tokens": -3}, 400, "max_new_tokens"),
    ("/api/generate", {"prompt": "Hi", "top_k": 1.5}, 400, "top_k"),
    ("/api/load_model", {}, 400, "model_type"),
    ("/api/load_model", {"model_type": "gpt5"}, 404, "gpt5"),
    ("/api/load_model", {"model_path": "/etc/passwd"}, 400, "models directory"),
    ("/api/load_model", {"model_path": "out/../../x/ckpt.pt"}, 400, "models directory"),
    ("/api/load_model", {"model_path": "out/missing/ckpt.pt"}, 404, "model_path"),
])
def test_bad_input_gets_a_4xx_naming_the_field(client, route, payload, status, word):
    r = client.post(route, json=payload)
    assert r.status_code == status, r.get_json()
    assert word in r.get_json()["detail"]


def test_malformed_bodies(client):
    r = client.post("/generate", data="not json", content_type="application/json")
    assert r.status_code == 400 and "JSON object" in r.get_json()["detail"]
    r = client.post("/generate", json=[1, 2])
    assert r.status_code == 400
    r = client.post("/generate", json={"prompt": "x" * 5000, "length": 1})
    assert r.status_code == 413
    assert client.get("/nope").status_code == 404 and "detail" in client.get("/nope").get_json()


def test_lut_management(client):
    client.post("/train_lut", json={"label": LABEL, "lut_name": "u1"})
    assert [x["name"] for x in client.get("/luts").get_json()["luts"]] == ["u1"]
    shown = client.get("/luts/u1").get_json()
    assert shown["labels"][0]["label"] == LABEL
    exported = client.get("/luts/u1/export")
    assert exported.status_code == 200
    r = client.post("/luts/u2/import", data=exported.data, content_type="application/octet-stream")
    assert r.status_code == 201 and r.get_json()["lut_name"] == "u2"
    assert client.post("/luts/u2/import", data=exported.data).status_code == 409
    assert client.post("/luts/u3/import", data=b"junk").status_code == 400
    assert client.delete(f"/luts/u1/labels/{shown['labels'][0]['id']}").status_code == 200
    assert client.delete("/luts/u1/labels/12345").status_code == 404
    assert client.delete("/luts/u1").status_code == 200
    assert client.get("/luts/u1").status_code == 404
    assert client.delete("/luts/u1").status_code == 404


def test_server_without_weights_starts_and_says_why(app_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = app_factory(model_type="gpt2-large", anonymous_rate_per_minute=DEFAULT)
    c = app.test_client()
    health = c.get("/health").get_json()
    assert health["status"] == "ok" and health["model_loaded"] is False and "gpt2-large" in health["detail"]
    r = c.post("/generate", json={"prompt": "Hi", "length": 3})
    assert r.status_code == 503 and r.headers["Retry-After"] and "load_model" in r.get_json()["detail"]


def test_one_generate_serves_three_api_shapes(client):
    """Each API's request, and each API's response fields in the one answer."""
    lut_service = client.post("/generate", json={"prompt": "TLG Capital is", "length": 5, "lut_name": None}).get_json()
    assert {"prompt", "completion", "lut_name"} <= set(lut_service) and lut_service["usage"]["completion_tokens"] <= 5
    locallab = client.post("/generate", json={"prompt": "Explain quantum computing in simple terms"}).get_json()
    assert set(locallab["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    # max_length 8192 (the default) is an upper bound: cut to what the 128-token context leaves
    assert locallab["usage"]["total_tokens"] <= 128 and locallab["response"] == locallab["completion"]
    full = {"prompt": "Explain", "model_id": None, "stream": False, "max_length": 8192, "temperature": 0.7,
            "top_p": 0.9, "top_k": 80, "repetition_penalty": 1.15, "do_sample": True}
    assert client.post("/generate", json=full).status_code == 200
    tgi = client.post("/generate", json={"model_id": "gpt-2", "prompt": "Hello world", "max_new_tokens": 5,
                                              "temperature": 0.7, "top_p": 0.95}).get_json()
    assert tgi["model_id"] == "gpt-2"  # echoed as sent, as the TGI-style API shows it
    assert tgi["generated_text"] == "Hello world" + tgi["completion"]


def test_chat_and_batch(client):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello, how are you?"}]
    r = client.post("/chat", json={"messages": msgs, "max_length": 8, "seed": 1})
    out = r.get_json()
    assert r.status_code == 200 and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["finish_reason"] in ("length", "stop") and out["usage"]["prompt_tokens"] > 10
    r = client.post("/generate/batch", json={"prompts": ["Write a haiku", "Tell a joke", "A fact"], "max_length": 6,
                                             "seed": 7})
    out = r.get_json()
    assert r.status_code == 200 and len(out["responses"]) == 3
    assert 3 <= out["usage"]["completion_tokens"] <= 18 and len(out["finish_reasons"]) == 3
    again = client.post("/generate/batch", json={"prompts": ["Write a haiku", "Tell a joke", "A fact"],
                                                 "max_length": 6, "seed": 7}).get_json()
    assert again["responses"] == out["responses"]  # seeded: reproducible


def test_streaming_sse_framing(client):
    r = client.post("/generate", json={"prompt": "Once upon a time", "max_length": 12, "stream": True,
                                       "do_sample": False})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    raw = r.get_data(as_text=True)
    assert raw.endswith("data: [DONE]\n\n")
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    text = "".join("\n".join(line[6:] for line in e.split("\n")) for e in events[:-1])
    same = client.post("/generate", json={"prompt": "Once upon a time", "max_length": 12, "do_sample": False})
    assert text == same.get_json()["completion"]  # the stream carries exactly the text
    r = client.post("/chat", json={"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_length": 4})
    assert r.get_data(as_text=True).endswith("data: [DONE]\n\n")


def test_model_management_locallab_and_tgi(client):
    # the TGI-style routes name GPT-2 124M as that API does: id "gpt-2", Hugging Face name "gpt2"
    assert client.get("/").get_json()["running_containers"] == ["gpt-2"]
    models = client.get("/models").get_json()["models"]
    assert models[0] == {"id": "gpt-2", "name": "gpt-2", "hf_name": "gpt2", "running": True}
    assert [m["id"] for m in models] == ["gpt-2", "gpt2-medium", "gpt2-large", "gpt2-xl"]  # each model once
    available = {m["id"]: m for m in client.get("/models/available").get_json()["models"]}
    assert available["gpt2"]["running"] and available["gpt2"]["hf_name"] == "openai-community/gpt2"
    assert not available["gpt2-medium"]["running"]
    cur = client.get("/models/current").get_json()
    assert cur["model_id"] == "gpt2" and cur["config"]["n_layer"] == 2
    info = client.get("/system/info").get_json()
    assert info["cpu_count"] >= 1 and info["model"] == "gpt2" and "torch" in info
    r = client.post("/models/gpt-2/stop")
    assert r.status_code == 200 and r.get_json()["message"] == "Container for gpt-2 stopped"
    assert client.get("/models/current").get_json()["loaded"] is False
    assert client.post("/generate", json={"prompt": "Hi", "length": 2}).status_code == 503
    assert client.post("/models/unload").status_code == 404
    r = client.post("/models/gpt2-medium/start")
    assert r.status_code == 200 and r.get_json()["message"] == "Container for gpt2-medium started"
    assert client.get("/models/current").get_json()["model_id"] == "gpt2-medium"
    assert client.post("/models/load", json={"model_id": "gpt2"}).status_code == 200
    assert client.post("/models/unload").get_json()["model_id"] == "gpt2"
    # the TGI-style API: generating with a model_id starts that model
    r = client.post("/generate", json={"model_id": "gpt-2", "prompt": "Hi", "max_new_tokens": 2})
    assert r.status_code == 200 and client.get("/").get_json()["running_containers"] == ["gpt-2"]


def test_a_stream_closed_by_its_client_stops_generating(client):
    r = client.post("/generate", json={"prompt": "Once upon a time", "stream": True, "do_sample": False},
                    buffered=False)
    first = next(r.response)  # one event, then the client goes away
    assert first.startswith(b"data: ")
    r.close()
    engine = client.application.extensions["gpt"].models.current().engine
    for _ in range(100):
        if engine.load["finished"].get("cancelled"):
            break
        time.sleep(0.02)
    assert engine.load["finished"] == {"cancelled": 1} and engine.load["running"] == 0
