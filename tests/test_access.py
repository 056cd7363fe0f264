"""API keys, LUT ownership, admin routes, rate limits, the query history and /public/models
(Flask test client; the `openai` package talks to the same app in-process through httpx)."""
import json
import sqlite3
import subprocess
import sys

import httpx2  # the HTTP library of the pinned openai package
import openai
import pytest

from access import Access, AccessError
from conftest import ROOT, script_env

LABEL = "TLG Capital is an asset management firm."


@pytest.fixture
def app(app_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prices = tmp_path / "public_models.json"
    prices.write_text(json.dumps({"*": {"pricing": {"input": 1e-6, "output": 2e-6, "unit": "token", "currency": "USD"}},
                                  "gpt2-xl": {"listed": False}}))
    return app_factory(rate_limit_per_minute=600, rate_limit_burst=100, public_models=str(prices))


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keys(app):
    """An admin key (made while access is open) and a tenant key bound to LUTs acme-*."""
    c = app.test_client()
    r = c.post("/keys", json={"name": "root", "admin": True})
    assert r.status_code == 201 and r.get_json()["key"].startswith("sk-gpt2-")
    admin = r.get_json()["key"]
    tenant = c.post("/keys", json={"name": "acme", "luts": ["acme-*"]}, headers=bearer(admin)).get_json()["key"]
    return admin, tenant


def test_open_until_the_first_key_then_keys_are_required(app):
    c = app.test_client()
    assert c.post("/generate", json={"prompt": "Hi", "length": 2}).status_code == 200  # open: no keys yet
    admin = c.post("/keys", json={"name": "root", "admin": True}).get_json()["key"]
    r = c.post("/generate", json={"prompt": "Hi", "length": 2})
    assert r.status_code == 401 and "API key" in r.get_json()["detail"] and r.headers["WWW-Authenticate"] == "Bearer"
    assert c.post("/generate", json={"prompt": "Hi", "length": 2}, headers=bearer("sk-gpt2-wrong")).status_code == 401
    assert c.post("/generate", json={"prompt": "Hi", "length": 2}, headers=bearer(admin)).status_code == 200
    for public in ("/health", "/public/models"):
        assert c.get(public).status_code == 200
    # stored only as a hash: the key appears nowhere in the database
    db = sqlite3.connect(app.config.get("STATE_DB") or "state.sqlite")
    assert admin not in json.dumps(db.execute("SELECT * FROM api_keys").fetchall())
    key_id = c.get("/keys", headers=bearer(admin)).get_json()["keys"][0]["id"]
    assert c.delete(f"/keys/{key_id}", headers=bearer(admin)).get_json()["revoked"]
    for headers in (bearer(admin), {}):  # no key left, and still closed: LUTs included
        for path in ("/api/status", "/luts"):
            assert c.get(path, headers=headers).status_code == 401, (path, headers)


def test_openai_client_sees_401_403_429(app, keys):
    admin, tenant = keys

    def client(key):
        return openai.OpenAI(base_url="http://test/v1", api_key=key, max_retries=0,
                             http_client=openai.DefaultHttpxClient(transport=httpx2.WSGITransport(app=app)))
    with pytest.raises(openai.AuthenticationError) as e:
        client("sk-gpt2-nope").completions.create(model="gpt2", prompt="Hi", max_tokens=2)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(tenant).completions.create(model="gpt2", prompt="Hi", max_tokens=2, extra_body={"lut_name": "globex"})
    assert e.value.param == "lut_name"
    ok = client(tenant).completions.create(model="gpt2", prompt="Hi", max_tokens=2, extra_body={"lut_name": "acme-1"})
    assert ok.usage.completion_tokens >= 1
    limited = app.extensions["gpt"].access.create_key("limited", luts=[], rate_per_minute=1, burst=2)[0]
    client(limited).models.list()
    client(limited).models.list()
    with pytest.raises(openai.RateLimitError) as e:
        client(limited).models.list()
    assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["Retry-After"]) >= 1


def test_a_tenant_cannot_reach_another_tenants_lut_through_any_route(app, keys):
    admin, tenant = keys
    c = app.test_client()
    assert c.post("/train_lut", json={"label": LABEL, "lut_name": "globex"}, headers=bearer(admin)).status_code == 200
    assert c.post("/train_lut", json={"label": LABEL, "lut_name": "acme-1"}, headers=bearer(tenant)).status_code == 200
    before = c.get("/luts/globex", headers=bearer(admin)).get_json()
    exported = c.get("/luts/acme-1/export", headers=bearer(tenant))
    assert exported.status_code == 200
    gen = {"prompt": "TLG Capital is", "lut_name": "globex"}
    attempts = [
        ("post", "/train_lut", {"json": {"label": "Globex is mine.", "lut_name": "globex"}}),
        ("post", "/generate", {"json": {**gen, "length": 3}}),
        ("post", "/chat", {"json": {"messages": [{"role": "user", "content": "hi"}], "lut_name": "globex"}}),
        ("post", "/generate/batch", {"json": {"prompts": ["a"], "lut_name": "globex"}}),
        ("post", "/api/generate", {"json": {**gen, "max_new_tokens": 3}}),
        ("post", "/v1/completions", {"json": {**gen, "model": "gpt2"}}),
        ("post", "/v1/chat/completions", {"json": {"model": "gpt2", "lut_name": "globex",
                                                   "messages": [{"role": "user", "content": "hi"}]}}),
        ("get", "/luts/globex", {}),
        ("get", "/luts/globex/export", {}),
        ("delete", "/luts/globex/labels/1", {}),
        ("delete", "/luts/globex", {}),
        ("post", "/luts/globex/import", {"data": exported.data, "headers": {"Content-Type": "application/octet-stream"}}),
    ]
    for method, path, kw in attempts:
        headers = {**kw.pop("headers", {}), **bearer(tenant)}
        r = getattr(c, method)(path, headers=headers, **kw)
        assert r.status_code == 403, (path, r.get_json())
        assert "globex" in json.dumps(r.get_json())
    assert c.get("/luts/globex", headers=bearer(admin)).get_json() == before  # nothing changed
    assert [x["name"] for x in c.get("/luts", headers=bearer(tenant)).get_json()["luts"]] == ["acme-1"]
    assert {x["name"] for x in c.get("/luts", headers=bearer(admin)).get_json()["luts"]} == {"acme-1", "globex"}


def test_only_admin_keys_manage_models_training_and_keys(app, keys):
    admin, tenant = keys
    c = app.test_client()
    for method, path, payload in [("post", "/api/load_model", {"model_type": "gpt2"}),
                                  ("post", "/models/load", {"model_id": "gpt2"}), ("post", "/models/unload", {}),
                                  ("post", "/models/gpt2/start", {}), ("post", "/models/gpt2/stop", {}),
                                  ("post", "/api/train", {"dataset": "x", "output_dir": "out/x"}),
                                  ("post", "/keys", {"name": "x"}), ("get", "/keys", None),
                                  ("delete", "/keys/1", None),
                                  ("post", "/generate", {"prompt": "Hi", "length": 2, "model_id": "gpt2-medium"})]:
        r = getattr(c, method)(path, json=payload, headers=bearer(tenant))
        assert r.status_code == 403, path
    assert c.post("/generate", json={"prompt": "Hi", "length": 2, "model_id": "gpt2"},
                  headers=bearer(tenant)).status_code == 200  # the running model: fine
    assert c.post("/models/load", json={"model_id": "gpt2-medium"}, headers=bearer(admin)).status_code == 200


def test_query_history_and_usage_per_app_and_key(app, keys):
    admin, tenant = keys
    c = app.test_client()
    out = c.post("/generate", json={"prompt": "Once upon a time", "length": 5},
                 headers={**bearer(tenant), "X-App-ID": "web-v1"}).get_json()
    stream = c.post("/v1/completions", json={"model": "gpt2", "prompt": "Hi", "max_tokens": 3, "stream": True,
                                             "temperature": 0}, headers={**bearer(tenant), "X-App-ID": "web-v1"})
    assert stream.get_data(as_text=True).endswith("data: [DONE]\n\n")
    c.get("/api/status", headers=bearer(admin))
    usage = c.get("/usage", headers=bearer(admin)).get_json()
    web = next(r for r in usage["by_app"] if r["app_id"] == "web-v1")
    assert web["requests"] == 2
    assert web["prompt_tokens"] == out["usage"]["prompt_tokens"] + 1  # "Hi" is one token
    assert web["completion_tokens"] == out["usage"]["completion_tokens"] + 3
    assert any(r["app_id"] == "Unknown" for r in usage["by_app"])
    mine = c.get("/usage", headers=bearer(tenant)).get_json()
    assert [r["app_id"] for r in mine["by_app"]] == ["web-v1"]  # a tenant sees only its own
    rows = c.get("/usage/history?app_id=web-v1", headers=bearer(admin)).get_json()["queries"]
    assert [r["route"] for r in rows] == ["/v1/completions", "/generate"]
    assert rows[1]["model"] == "gpt2" and rows[1]["status"] == 200 and rows[1]["latency_ms"] > 0
    assert c.get("/usage/history?limit=x", headers=bearer(admin)).status_code == 400


def test_public_models_lists_configured_pricing_without_a_key(app, keys):
    r = app.test_client().get("/public/models")
    body = r.get_json()
    assert r.status_code == 200 and body["status"] == "success" and "processing_time" in body["meta"]
    models = {m["id"]: m for m in body["data"]["models"]}
    assert "gpt2-xl" not in models and models["gpt2"]["pricing"]["output"] == 2e-6
    assert set(models["gpt2"]) >= {"id", "provider", "created", "object", "owned_by", "capabilities", "pricing"}


def test_key_commands_from_the_shell_and_the_client(app, tmp_path):
    env = script_env()
    db = str(tmp_path / "state.sqlite")
    out = subprocess.run([sys.executable, f"{ROOT}/access.py", "--state_db", db, "create", "--name", "ops", "--admin"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "sk-gpt2-" in out.stdout
    key = out.stdout.strip().splitlines()[-1]
    assert app.extensions["gpt"].access.authenticate(f"Bearer {key}").admin
    out = subprocess.run([sys.executable, f"{ROOT}/access.py", "--state_db", db, "revoke", "99"],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "no API key with id 99" in out.stderr


def shell(target, *command):
    """`python access.py` on target, named with the flag the server uses for it."""
    flag = "--database_url" if target.startswith("postgresql://") else "--state_db"
    return subprocess.run([sys.executable, f"{ROOT}/access.py", flag, target, *command], capture_output=True,
                          text=True, env=script_env())


def test_revoking_every_key_keeps_access_closed_until_reopened_from_the_shell(db_target):
    a, b = Access(db_target), Access(db_target)  # two replicas of one database
    secret, record = a.create_key("root", admin=True)
    b.revoke_key(record["id"])
    for access in (a, b):
        for header in (None, f"Bearer {secret}"):
            with pytest.raises(AccessError) as e:
                access.authenticate(header)
            assert e.value.status == 401
    live = a.create_key("ops")[1]
    out = shell(db_target, "reopen")
    assert out.returncode != 0 and "revoke" in out.stderr  # a live key: reopening would bypass it
    b.revoke_key(live["id"])
    out = shell(db_target, "reopen")
    assert out.returncode == 0, out.stderr
    assert a.authenticate(None) is None and b.authenticate(None) is None  # open on every replica
    a.create_key("again")
    with pytest.raises(AccessError):
        b.authenticate(None)  # the next key closes it again
    a.db.close()
    b.db.close()


def test_the_first_key_is_made_only_from_loopback_or_the_shell(app, app_factory, tmp_path):
    c = app.test_client()
    first = {"name": "root", "admin": True}
    r = c.post("/keys", json=first, environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert r.status_code == 403 and "python access.py create" in r.get_json()["detail"]
    # from a proxy on this machine that --trusted_proxies does not declare, the client is unknown
    assert c.post("/keys", json=first, headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 403
    assert c.get("/api/status", environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 200  # still open
    proxied = app_factory(tmp_path / "p", model_type=None, trusted_proxies=1).test_client()
    assert proxied.post("/keys", json=first, headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 403
    assert proxied.post("/keys", json=first).status_code == 403  # no hop named: the address is the proxy's
    assert proxied.post("/keys", json=first, headers={"X-Forwarded-For": "::1"}).status_code == 201
    assert c.post("/keys", json=first, environ_base={"REMOTE_ADDR": "::1"}).status_code == 201


def test_access_py_takes_the_servers_database_url(pg_url):
    out = shell(pg_url, "create", "--name", "ops", "--admin")
    assert out.returncode == 0, out.stderr
    access = Access(pg_url)
    assert access.authenticate(f"Bearer {out.stdout.strip().splitlines()[-1]}").admin
    access.db.close()
    after = subprocess.run([sys.executable, f"{ROOT}/access.py", "list", "--database_url", pg_url],  # after the command
                           capture_output=True, text=True, env=script_env())
    assert after.returncode == 0 and [k["name"] for k in json.loads(after.stdout)] == ["ops"], after.stderr


def test_a_keys_lut_patterns_match_whole(app):
    """'$' matches before a final newline: a pattern must match the whole string."""
    r = app.test_client().post("/keys", json={"name": "t", "luts": ["acme-1\n"]})
    assert r.status_code == 400 and "luts" in r.get_json()["detail"]
