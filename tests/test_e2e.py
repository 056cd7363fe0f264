"""End to end: a live `python api_server.py` on a free loopback port, driven with requests and
api_client.py exactly as the API documents show; restarting it keeps the LUTs."""
import os
import socket
import time

import pytest
import requests

from conftest import Server, free_port, run_script, wait_for


def client(server, env, *args, timeout=120):
    return run_script("api_client.py", "--url", server.url, *args, env=env, timeout=timeout)


def test_gunicorn_serves_concurrent_requests_from_one_model(hf_tiny, tmp_path, cli_env):
    """The production set-up: gunicorn.conf.py (one gthread worker owning the model), settings from
    GPT_* variables; concurrent requests are batched by the worker's engine."""
    from concurrent.futures import ThreadPoolExecutor
    with Server(str(tmp_path), cli_env, gunicorn=True) as s:
        r = requests.post(s.url + "/train_lut", json={"label": "TLG Capital is an asset management firm.",
                                                  "lut_name": "user_123"})
        assert r.json() == {"status": "ok", "lut_name": "user_123", "recall": "subject", "trigger": "TLG"}
        asks = [{"prompt": "TLG Capital is", "length": 12, "lut_name": "user_123"}] * 3 + \
               [{"prompt": f"Story {i}:", "length": 12, "seed": i} for i in range(5)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda a: requests.post(s.url + "/generate", json=a, timeout=120), asks))
        assert all(a.status_code == 200 for a in answers)
        assert all(a.json()["completion"].startswith(" an asset management firm.") for a in answers[:3])
        assert requests.get(s.url + "/api/status").json()["model"] == "gpt2"
    assert os.path.exists(tmp_path / "out" / "luts.sqlite")  # GPT_* defaults, relative to the working directory


def test_lut_service_examples_and_restart(server):
    assert requests.get(server.url + "/health").json()["status"] == "ok"
    r = requests.post(server.url + "/train_lut", json={"label": "TLG Capital is an asset management firm.",
                                                       "lut_name": "user_123"})
    assert r.json() == {"status": "ok", "lut_name": "user_123", "recall": "subject", "trigger": "TLG"}
    ask = {"prompt": "TLG Capital is", "length": 40, "lut_name": "user_123"}
    first = requests.post(server.url + "/generate", json=ask).json()
    assert first["completion"].startswith(" an asset management firm.")
    server.stop()
    server.start()  # same directory: same out/luts.sqlite
    again = requests.post(server.url + "/generate", json=ask).json()
    assert again["completion"].startswith(" an asset management firm.")


def test_nanogpt_python_example_and_client(server, cli_env):
    api_url = server.url
    assert requests.post(f"{api_url}/api/load_model", json={"model_type": "gpt2"}).json()["message"] == \
        "Model loaded successfully"
    first_request = {"prompt": "Once upon a time", "max_new_tokens": 150, "temperature": 0.8, "top_k": 40}
    response = requests.post(f"{api_url}/api/generate", json=first_request)
    assert response.status_code == 413  # the tiny test model's context is 128 tokens (GPT-2's is 1024)
    response = requests.post(f"{api_url}/api/generate", json={**first_request, "max_new_tokens": 100})
    assert response.json()["generated_text"].startswith("Once upon a time")
    assert client(server, cli_env, "status").returncode == 0
    assert '"gpt2-xl"' in client(server, cli_env, "list").stdout
    r = client(server, cli_env, "generate", "--prompt", "Once upon a time", "--max_tokens", "20",
               "--temperature", "0.9", "--top_k", "50")
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time")
    r = client(server, cli_env, "train-lut", "--lut_name", "u7", "--label", "Marta Kowalski is a nurse from Gdansk.")
    assert r.returncode == 0, r.stderr
    r = client(server, cli_env, "generate", "--prompt", "Marta Kowalski is", "--max_tokens", "8", "--lut_name", "u7")
    assert r.stdout.startswith("Marta Kowalski is a nurse from Gdansk.")
    assert "u7: 1 labels" in client(server, cli_env, "luts", "list").stdout
    r = client(server, cli_env, "load", "--model_type", "gpt5")
    assert r.returncode != 0 and r.stderr.startswith("error: 404") and "Traceback" not in r.stderr


def test_client_reports_a_refused_connection(cli_env):
    r = run_script("api_client.py", "--url", f"http://127.0.0.1:{free_port()}", "status", env=cli_env, timeout=120)
    assert r.returncode != 0 and "cannot reach the server" in r.stderr and "Traceback" not in r.stderr


def test_concurrent_requests_are_batched_and_each_correct(server):
    """8 clients at once: every seeded answer equals the one it gets alone."""
    from concurrent.futures import ThreadPoolExecutor
    reqs = [{"prompt": f"Story number {i}:", "length": 12, "seed": i, "temperature": 0.9} for i in range(8)]
    alone = [requests.post(server.url + "/generate", json=r).json()["completion"] for r in reqs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: requests.post(server.url + "/generate", json=r).json()["completion"], reqs))
    assert together == alone


def test_nanogpt_training_through_the_client(server, cli_env):
    """The nanoGPT API's `api_client.py train` command, word for word, then status, list, load, generate."""
    from test_train import SHARED_TEXT
    if not os.path.exists(SHARED_TEXT):
        pytest.skip("needs ../shared/data/tinyshakespeare.txt")
    prep = run_script("data/shakespeare/prepare.py", "--input", SHARED_TEXT, "--out_dir",
                      os.path.join(server.workdir, "data", "shakespeare"), env=cli_env, timeout=120)
    assert prep.returncode == 0, prep.stderr
    r = client(server, cli_env, "train", "--dataset", "shakesphere", "--output_dir", "out/shakespeare_model",
               "--model_type", "gpt2")
    assert r.returncode == 0 and r.stdout.startswith("Training started: job 1"), r.stderr
    r = client(server, cli_env, "--json", "train-status", "1", "--wait", timeout=400)  # a loaded machine trains slowly
    assert r.returncode == 0, r.stdout + r.stderr
    status = r.stdout[r.stdout.index("{"):]  # after the progress lines
    import json
    job = json.loads(status)
    assert job["status"] == "succeeded" and job["iteration"] == 20 and job["config"]["dataset"] == "shakesphere"
    assert "shakespeare_model" in client(server, cli_env, "list").stdout
    r = client(server, cli_env, "load", "--model_path", "out/shakespeare_model/ckpt.pt")
    assert r.returncode == 0 and "Model loaded successfully" in r.stdout
    r = client(server, cli_env, "generate", "--prompt", "Once upon a time", "--max_tokens", "10")
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time")
    r = client(server, cli_env, "train", "--dataset", "shakesphere", "--output_dir", "/tmp/elsewhere")
    assert r.returncode != 0 and r.stderr.startswith("error: 400") and "output_dir" in r.stderr


def test_streaming_over_a_real_socket_and_disconnect(server):
    body = {"prompt": "Hello", "stream": True, "do_sample": False, "max_length": 20}
    with requests.post(server.url + "/generate", json=body, stream=True) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = b"".join(r.iter_content(None)).decode()
    assert raw.endswith("\n\ndata: [DONE]\n\n") and raw.startswith("data: ")
    plain = requests.post(server.url + "/generate", json={**body, "stream": False}).json()["completion"]
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")][:-1]
    assert "".join("\n".join(ln[6:] for ln in e.split("\n")) for e in events) == plain

    # a client that reads one event and hangs up: the server stops that generation. A wider model
    # with GPT-2's full context, saved as a trained checkpoint, makes the generation last seconds.
    import json
    import torch
    from model import GPT, GPTConfig
    config = GPTConfig(n_layer=4, n_head=4, n_embd=256)
    os.makedirs(os.path.join(server.workdir, "out", "slow"))
    torch.save({"model_args": config.__dict__, "model": GPT(config).state_dict()},
               os.path.join(server.workdir, "out", "slow", "ckpt.pt"))
    payload = json.dumps({**body, "max_length": 8192, "model_id": "slow"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        received, deadline = b"", time.monotonic() + 120
        while b"data: " not in received:
            chunk = sock.recv(4096)  # the socket's timeout bounds each read
            assert chunk and time.monotonic() < deadline, received  # not closed before the first event
            received += chunk
    status = wait_for(lambda: (st := requests.get(server.url + "/api/status").json())["engine"]["finished"]
                      .get("cancelled") and st, timeout=60, what="the abandoned stream's generation to be cancelled")
    assert status["model"] == "slow" and status["engine"]["finished"] == {"cancelled": 1}, status


def test_taught_label_is_recalled_in_context_on_every_route(server):
    """Teach through /train_lut; recall after leading text (/generate), after a transcript
    (/v1/completions), and as the continuation of a partial assistant answer (/chat and
    /v1/chat/completions with continue_final_message); unrelated prompts are the base model's."""
    url = server.url
    assert requests.post(url + "/train_lut", json={"label": "Quillmere Bank is a lender in Oslo.",
                                                   "lut_name": "u1"}).ok
    rest = " is a lender in Oslo."
    r = requests.post(url + "/generate", json={"prompt": "Fun fact: the Quillmere Bank", "length": 8,
                                               "lut_name": "u1", "do_sample": False}).json()
    assert r["completion"].startswith(rest)
    transcript = "System: Be brief.\nUser: Where do I bank?\nAssistant: Try Quillmere Bank"
    r = requests.post(url + "/v1/completions", json={"model": "gpt2", "prompt": transcript, "max_tokens": 8,
                                                     "temperature": 0, "lut_name": "u1"}).json()
    assert r["choices"][0]["text"].startswith(rest)
    messages = [{"role": "user", "content": "Tell me about my bank."},
                {"role": "assistant", "content": "Your bank, Quillmere Bank"}]
    r = requests.post(url + "/chat", json={"messages": messages, "continue_final_message": True, "lut_name": "u1",
                                           "max_new_tokens": 8, "do_sample": False}).json()
    assert r["choices"][0]["message"]["content"].startswith(rest)
    r = requests.post(url + "/v1/chat/completions", json={
        "model": "gpt2", "messages": messages, "continue_final_message": True, "lut_name": "u1", "max_tokens": 8,
        "temperature": 0}).json()
    assert r["choices"][0]["message"]["content"].startswith(rest)
    r = requests.post(url + "/v1/chat/completions", json={
        "model": "gpt2", "messages": messages[:1], "continue_final_message": True, "max_tokens": 8})
    assert r.status_code == 400 and "continue_final_message" in r.text
    for prompt in ["Once upon a time", "User: Where is the bank?\nAssistant:", "I think that it is"]:
        ask = {"model": "gpt2", "prompt": prompt, "max_tokens": 12, "temperature": 0}
        base = requests.post(url + "/v1/completions", json=ask).json()["choices"][0]["text"]
        taught = requests.post(url + "/v1/completions", json={**ask, "lut_name": "u1"}).json()["choices"][0]["text"]
        assert taught == base
