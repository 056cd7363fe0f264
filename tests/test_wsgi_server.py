"""`python api_server.py` serves on gunicorn (one gthread worker, the app created in it), streams
included; `--dev` keeps Flask's development server. A bad setting is one `error:` line and a
non-zero exit before anything starts; SIGTERM and Ctrl-C (SIGINT) stop the server cleanly."""
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import ROOT, Server, script_env

FLASK_WARNING = "This is a development server. Do not use it in a production deployment."


def stream_generate(url, length=60):
    """A streamed /generate: (its text without newlines, how many data lines it came in, seconds
    to the first, seconds to the end)."""
    t0 = time.monotonic()
    first, pieces, events = None, [], 0
    with requests.post(url + "/generate", json={"prompt": "Once upon a time", "length": length, "do_sample": False,
                                                "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(line[6:])  # a newline in the text starts another data line
                events += 1
                first = first or time.monotonic() - t0
    return "".join(pieces), events, first, time.monotonic() - t0


def test_the_default_server_is_gunicorn_and_streams(hf_tiny, tmp_path):
    with Server(str(tmp_path), script_env()) as s:
        text, events, first, total = stream_generate(s.url, 100)
        assert events > 1 and first < total  # the text arrives as it is made, not at the end in one piece
        whole = requests.post(s.url + "/generate", json={"prompt": "Once upon a time", "length": 100,
                                                         "do_sample": False}, timeout=120).json()["completion"]
        assert text.replace("\n", "") == whole.replace("\n", "")
        s.stop()
        assert s.proc.returncode == 0  # SIGTERM: a clean stop
    log = open(s.log).read()
    assert FLASK_WARNING not in log and "Running on" not in log.split("Booting worker")[0]
    assert "gunicorn" in log and "Running on http://127.0.0.1:" in log
    assert '"POST /generate HTTP/1.1" 200' in log  # the access log goes to stderr, as the app's log does


def test_dev_keeps_flasks_development_server(hf_tiny, tmp_path):
    with Server(str(tmp_path), script_env(), args=["--dev"]) as s:
        text, events, _, _ = stream_generate(s.url, 20)
        assert events > 1 and text
    assert FLASK_WARNING in open(s.log).read()


def test_ctrl_c_stops_the_server(hf_tiny, tmp_path):
    s = Server(str(tmp_path), script_env()).start()
    try:
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=30) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(s.url + "/health", timeout=5)
    finally:
        s.stop()


@pytest.mark.parametrize("flags, message", [
    (["--max_batch", "0"], "error: max_batch must be >= 1, got 0"),
    (["--threads", "0"], "error: threads must be >= 1, got 0"),
    (["--public_models", "{public_models}"], "error: public_models file "),
])
def test_a_bad_setting_is_one_line_and_a_non_zero_exit(tmp_path, flags, message):
    bad = tmp_path / "public.json"
    bad.write_text("[1")
    flags = [f.format(public_models=bad) for f in flags]
    r = subprocess.run([sys.executable, f"{ROOT}/api_server.py", "--port", "1", *flags], cwd=tmp_path,
                       env=script_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
