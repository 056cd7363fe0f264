"""Hostile requests: each gets a 4xx JSON answer naming its field, reads nothing outside the
server's directories, and shows no server path; what is acknowledged is stored."""
import hashlib
import http.client
import json
import os
import sqlite3

import numpy as np
import pytest
import requests
import torch


LABEL = "TLG Capital is an asset management firm."


from test_server import client  # noqa: E402,F401  (the same client: a small body limit, run from tmp_path)


def write_checkpoint(path):
    from model import GPT, GPTConfig
    os.makedirs(os.path.dirname(path), exist_ok=True)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)
    torch.save({"model_args": config.__dict__, "model": GPT(config).state_dict()}, path)


def detail(r, status):
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True)[:500])
    return r.get_json()["detail"]


def raw_json(client, path, text):
    return client.post(path, data=text.encode(), content_type="application/json")


# ---- checkpoints: the file finally read must lie inside the models directory

def test_linked_checkpoint_outside_the_models_dir_is_refused(client, tmp_path):
    write_checkpoint(str(tmp_path / "elsewhere" / "ckpt.pt"))
    os.makedirs(tmp_path / "out" / "linked")
    os.symlink(tmp_path / "elsewhere" / "ckpt.pt", tmp_path / "out" / "linked" / "ckpt.pt")
    for path in ("out/linked", "out/linked/ckpt.pt"):
        assert "models directory" in detail(client.post("/api/load_model", json={"model_path": path}), 400)
    assert client.get("/api/models").get_json()["trained_models"] == []  # nor listed, nor startable by id
    assert client.post("/models/linked/start").status_code == 404
    write_checkpoint(str(tmp_path / "out" / "real" / "ckpt.pt"))  # a checkpoint inside still loads
    assert client.post("/api/load_model", json={"model_path": "out/real"}).status_code == 200


@pytest.mark.parametrize("route,payload,name", [
    ("/api/load_model", {"model_path": "out/x\u0000y"}, "model_path"),
    ("/api/train", {"output_dir": "out/x\u0000y", "dataset": "shakespeare_char"}, "output_dir"),
])
def test_nul_byte_in_a_path(client, route, payload, name):
    assert name in detail(client.post(route, json=payload), 400)


# ---- error bodies name what the client sent, not the server's directories

def test_errors_show_no_server_paths(client, tmp_path):
    root = str(tmp_path)
    text = detail(client.post("/api/load_model", json={"model_path": "/nonexistent/x"}), 400)
    assert "model_path" in text and "/nonexistent/x" in text and root not in text
    os.makedirs(tmp_path / "out" / "bad")
    (tmp_path / "out" / "bad" / "ckpt.pt").write_bytes(b"not a checkpoint")
    text = detail(client.post("/api/load_model", json={"model_path": "out/bad"}), 400)
    assert "bad/ckpt.pt" in text and root not in text
    text = detail(client.post("/generate", json={"prompt": "Hi", "model_id": "bad"}), 503)
    assert "bad" in text and root not in text
    assert client.post("/train_lut", json={"label": LABEL, "lut_name": "u1"}).status_code == 200  # gpt2's LUT
    write_checkpoint(str(tmp_path / "out" / "real" / "ckpt.pt"))
    assert client.post("/api/load_model", json={"model_path": "out/real"}).status_code == 200
    text = detail(client.post("/train_lut", json={"label": LABEL, "lut_name": "u1"}), 409)
    assert "real" in text and root not in text


def test_start_up_error_shows_no_server_paths(app_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "out" / "bad")
    (tmp_path / "out" / "bad" / "ckpt.pt").write_bytes(b"not a checkpoint")
    app = app_factory(model_path="out/bad")
    text = app.test_client().get("/health").get_json()["detail"]
    assert "bad/ckpt.pt" in text and str(tmp_path) not in text


# ---- request bodies

@pytest.mark.parametrize("route,text,name", [
    ("/train_lut", '{"label": "\\ud800 Capital is a firm.", "lut_name": "u1"}', "label"),
    ("/train_lut", '{"label": "Capital is a firm.", "label_context": "x\\udfff", "lut_name": "u1"}',
     "label_context"),
    ("/luts/u1/labels", '{"labels": [{"label": "a\\ud800 b c"}]}', "labels[0].label"),
    ("/keys", '{"name": "\\ud800"}', "name"),
])
def test_lone_surrogate_names_its_field(client, route, text, name):
    assert name in detail(raw_json(client, route, text), 400)


@pytest.mark.parametrize("text", ['[' * 100_000 + ']' * 100_000,
                                  '{"prompt": "Hi", "x": ' + '{"a": ' * 100_000 + '1' + '}' * 100_001])
def test_deeply_nested_json(client, text):
    client.application.extensions["gpt"].cfg.max_body_bytes = 1 << 24  # the depth, not the size, is under test
    assert "nested" in detail(raw_json(client, "/generate", text), 400)


def test_lut_name_must_match_whole(client):
    r = client.post("/train_lut", json={"label": LABEL, "lut_name": "u1\n"})
    assert "lut_name" in detail(r, 400)
    assert "lut_name" in detail(client.get("/luts/u1%0A/export"), 400)
    assert client.get("/luts/u1%0A").status_code == 400


# ---- lesson digests: two different lessons are two labels

def test_lessons_that_join_alike_are_told_apart(client):
    """A label and context joined with a NUL could pass for another pair: a NUL is refused (no
    database of the product can store one in text), naming the field, and nothing is stored."""
    a = {"label": "Alpha Beta\u0000Gamma", "label_context": "Delta", "lut_name": "u1"}
    b = {"label": "Alpha Beta", "label_context": "Gamma\u0000Delta", "lut_name": "u1"}
    assert "label must not contain a NUL" in detail(client.post("/train_lut", json=a), 400)
    assert "label_context must not contain a NUL" in detail(client.post("/train_lut", json=b), 400)
    assert client.get("/luts/u1").status_code == 404
    from lut_store import label_digest
    assert label_digest(a["label"], a["label_context"]) != label_digest(b["label"], b["label_context"])


def test_stored_digests_still_dedupe(tiny, tmp_path):
    """Digests of lessons without a NUL are as stored; older rows with one are recomputed on open."""
    from lut_store import LUTStore, label_digest
    model, tok = tiny
    path = str(tmp_path / "luts.sqlite")
    store = LUTStore(path)
    store.teach(model, tok, "u1", LABEL)
    store.close()
    old = hashlib.sha256(f"{LABEL}\0".encode()).hexdigest()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT digest FROM labels WHERE label=?", (LABEL,)).fetchone()[0] == old
        # a NUL lesson as the older scheme stored it, and the schema as it stood then
        db.execute("INSERT INTO labels (lut, label, context, digest, created) VALUES (?, ?, ?, ?, 0)",
                   ("u1", "Alpha Beta\0Gamma", "Delta", hashlib.sha256("Alpha Beta\0Gamma\0Delta".encode()).hexdigest()))
        db.execute("UPDATE schema_versions SET version=1 WHERE component='luts'")
    store = LUTStore(path)
    assert store.teach(model, tok, "u1", LABEL) == {"added": 0, "replaced": 0}
    with store.db.connection() as db:
        digest = db.execute("SELECT digest FROM labels WHERE context=?", ("Delta",)).fetchone()[0]
    assert digest == label_digest("Alpha Beta\0Gamma", "Delta") != label_digest("Alpha Beta", "Gamma\0Delta")


# ---- crafted LUT imports

def crafted(labels='[["Alpha Beta", "", 0]]', drop=(), **tensors):
    """A one-entry export, as export() writes it, with the metadata in drop left out and tensors replaced."""
    from safetensors.numpy import save
    t = {"label": np.zeros(1, np.int64), "min_len": np.ones(1, np.int64), "target": np.ones(1, np.int64),
         "evidence": np.array([[5, 6] + [-1] * 62], np.int32), "value": np.zeros((1, 64), np.float16)}
    t.update(tensors)
    meta = {"format": "gpt2-lut/3", "lut_name": "imp", "model_id": "abc", "model_source": "gpt2",
            "labels": labels}
    return save(t, metadata={k: v for k, v in meta.items() if k not in drop})


@pytest.mark.parametrize("data,word", [
    (crafted(drop=("model_id",)), "model_id"),
    (crafted(labels='[["Alpha Beta", ""]]'), "labels"),
    (crafted(labels='[["Alpha Beta", null, 0]]'), "labels[0]"),
    (crafted(labels='[["\\ud800 Beta", "", 0]]'), "labels[0]"),
    (crafted(labels='{"a": 1}'), "labels"),
    (crafted(label=np.array([3], np.int64)), "label"),
    (crafted(label=np.array([-1], np.int64)), "label"),
    (crafted(evidence=np.full((1, 64), -1, np.int32)), "evidence"),
    (crafted(value=np.zeros((2, 64), np.float16)), "value"),
])
def test_crafted_import_is_a_400(client, data, word):
    r = client.post("/luts/imp/import", data=data, content_type="application/octet-stream")
    assert word in detail(r, 400)
    assert client.get("/luts/imp").status_code == 404  # nothing of it stored


def test_good_import_still_works(client):
    client.post("/train_lut", json={"label": LABEL, "lut_name": "u1"})
    data = client.get("/luts/u1/export").get_data()
    r = client.post("/luts/u2/import", data=data, content_type="application/octet-stream")
    assert r.status_code == 201
    assert client.get("/luts/u2").get_json()["labels"][0]["label"] == LABEL


# ---- the body limit applies to the bytes read, however they are sent

def chunked(client, path, data, content_type):
    """A body without a Content-Length, as a WSGI server hands on a chunked one."""
    import io
    return client.post(path, input_stream=io.BytesIO(data), content_type=content_type,
                       headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True})


def test_chunked_body_limit(client):
    small = json.dumps({"prompt": "Hi", "length": 1, "pad": "x" * 3000}).encode()
    assert chunked(client, "/generate", small, "application/json").status_code == 200  # read whole
    big = json.dumps({"prompt": "Hi", "length": 1, "pad": "x" * 8192}).encode()
    assert "4096" in detail(chunked(client, "/generate", big, "application/json"), 413)
    client.post("/train_lut", json={"label": LABEL, "lut_name": "u1"})
    export = client.get("/luts/u1/export").get_data()
    assert len(export) > 4096  # imports may be up to 64x the limit
    assert chunked(client, "/luts/u2/import", export, "application/octet-stream").status_code == 201


def test_chunked_body_limit_live(server):
    payload = json.dumps({"prompt": "Hi", "length": 1, "pad": "x" * (3 << 20)}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/generate", body=(payload[i:i + 65536] for i in range(0, len(payload), 65536)),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        r = conn.getresponse()
        status, text = r.status, r.read()
    except (BrokenPipeError, ConnectionResetError) as e:  # refused before the whole body was sent
        status, text = None, repr(e)
    finally:
        conn.close()
    assert status == 413, (status, text[:300])
    assert json.loads(text)["detail"]
    r = requests.post(server.url + "/generate", json={"prompt": "Hi", "length": 1}, timeout=60)
    assert r.status_code == 200  # and the server goes on


def test_hub_load_errors_show_no_cache_paths(hf_tiny, tmp_path, monkeypatch):
    import huggingface_hub

    from conftest import HF_HOME
    from model import ModelLoadError, from_pretrained
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(tmp_path / name))
    with pytest.raises(ModelLoadError) as e:
        from_pretrained("gpt2")
    assert "openai-community/gpt2/model.safetensors" in str(e.value) and str(tmp_path) not in str(e.value)

    def offline(repo, name):
        raise OSError(f"not in {HF_HOME}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelLoadError) as e:
        from_pretrained("gpt2")
    assert "HF_HOME" in str(e.value) and HF_HOME not in str(e.value)


def test_an_uploaded_file_may_be_64_times_the_body_limit(client):
    """The client's limit is 4096 bytes; a LUT import (a binary body, as its @api says) may be 64x that."""
    big = b"\x00" * 5000
    r = client.post("/luts/u/import", data=big, content_type="application/octet-stream")
    assert r.status_code == 400 and "safetensors" in r.get_json()["detail"].lower(), r.get_json()
    assert client.post("/luts/u/import", data=b"\x00" * (64 * 4096 + 1),
                       content_type="application/octet-stream").status_code == 413
    assert client.post("/generate", data=big, content_type="application/json").status_code == 413
