"""api_client.py against a live `python api_server.py`: `generate --stream`, the interactive
`chat` (piped stdin and a pseudo-terminal) and `luts teach-file`."""
import json
import os
import pty
import select
import sys
import time

import requests

from conftest import ROOT, run_script

CLIENT = os.path.join(ROOT, "api_client.py")


def client(server, env, *args, stdin=None):
    return run_script("api_client.py", "--url", server.url, *args, env=env, input=stdin, timeout=120)


def test_generate_stream_prints_what_generate_does(module_server, cli_env):
    assert requests.post(module_server.url + "/train_lut", json={"label": "Quillmere Bank is a lender in Oslo.",
                                                                 "lut_name": "c1"}).ok
    for extra in ([], ["--lut_name", "c1"], ["--temperature", "0.9", "--seed", "3"]):
        args = ["generate", "--prompt", "My bank: Quillmere Bank", "--max_tokens", "10", "--temperature", "0", *extra]
        plain, streamed = client(module_server, cli_env, *args), client(module_server, cli_env, *args, "--stream")
        assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
        assert streamed.stdout == plain.stdout  # the same text, printed as it came
    assert streamed.stdout.startswith("My bank: Quillmere Bank") and "is a lender in Oslo" not in streamed.stdout
    r = client(module_server, cli_env, "generate", "--prompt", "My bank: Quillmere Bank", "--max_tokens", "10",
               "--lut_name", "c1", "--stream")
    assert r.stdout.startswith("My bank: Quillmere Bank is a lender in Oslo.")
    r = client(module_server, cli_env, "generate", "--prompt", "Hi", "--max_tokens", "500", "--stream")
    assert r.returncode == 1 and r.stderr.startswith("error: 413") and "Traceback" not in r.stderr


def chat_prompt_tokens(server, since):
    """prompt_tokens of the /v1/chat/completions requests recorded after query id `since`."""
    queries = requests.get(server.url + "/usage/history", params={"limit": 100}).json()["queries"]
    return [q["prompt_tokens"] for q in reversed(queries) if q["route"] == "/v1/chat/completions" and q["id"] > since]


def last_query_id(server):
    queries = requests.get(server.url + "/usage/history", params={"limit": 1}).json()["queries"]
    return queries[0]["id"] if queries else 0


def test_chat_through_piped_stdin_keeps_history_until_reset(module_server, cli_env):
    since = last_query_id(module_server)
    lines = "Hello there\nHello there\n/reset\nHello there\n/exit\nnever sent\n"
    r = client(module_server, cli_env, "chat", "--temperature", "0", "--max_tokens", "6", stdin=lines)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\n")
    assert "(conversation forgotten)" in answers and "you>" not in r.stdout  # no prompts when stdin is not a terminal
    # each request is recorded when its stream ends, so two quick turns may be recorded in either order
    one, again, with_history = sorted(chat_prompt_tokens(module_server, since))
    assert with_history > one + 6  # the second turn carried the first and its answer
    assert again == one  # /reset: back to one message; "never sent" was not


def test_chat_in_a_terminal_streams_through_a_lut(module_server, cli_env):
    """A pseudo-terminal, as a person would use it: a banner, `you>` prompts, the LUT's answer."""
    assert requests.post(module_server.url + "/train_lut", json={
        "label": " Quillmere Bank lends to farmers.", "label_context": "Who lends to farmers?\nAssistant:",
        "lut_name": "c2"}).ok
    pid, fd = pty.fork()
    if pid == 0:  # the child: the client, its stdin and stdout the terminal
        os.execve(sys.executable, [sys.executable, CLIENT, "--url", module_server.url, "chat", "--lut_name", "c2",
                                   "--temperature", "0", "--max_tokens", "8"], cli_env)
    out = b""

    def read_until(marker, count=1):
        nonlocal out
        deadline = time.time() + 60
        while out.count(marker) < count and time.time() < deadline:
            if select.select([fd], [], [], 1)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break
        return out.count(marker) >= count
    try:
        assert read_until(b"you> "), out
        os.write(fd, b"Who lends to farmers?\n")
        assert read_until(b"you> ", 2), out
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = out.decode().replace("\r\n", "\n")
    assert text.startswith("chat with gpt2 through LUT c2; /reset forgets the conversation, /exit leaves\n")
    assert "assistant> Quillmere Bank lends to farmers.\n" in text, text
    assert os.waitstatus_to_exitcode(status) == 0


def test_chat_shows_an_error_and_goes_on(module_server, cli_env):
    r = client(module_server, cli_env, "chat", "--model", "gpt5", "--max_tokens", "4", stdin="Hi\nHi again\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert r.stderr.count("error: 404: the model 'gpt5' does not exist") == 2


def test_luts_teach_file_in_batches(module_server, cli_env, tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join([json.dumps({"label": "Quillmere Bank is a lender in Oslo."}),
                               json.dumps({"label": "Hello"}), "{bad",
                               json.dumps("Marta Kowalski is a nurse from Gdansk."),
                               json.dumps({"label": " lends to farmers.", "label_context": "Who is Zorblat? Zorblat"})])
                    + "\n")
    r = client(module_server, cli_env, "luts", "teach-file", "c3", str(path), "--batch_size", "2")
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[0].startswith("taught 3 of 5 labels (")
    assert r.stdout.splitlines()[1:] == [
        "  line 2: label must be at least two tokens when no label_context is given (nothing follows a single "
        "token)", "  line 3: not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))"]
    assert "teaching c3" in r.stderr and "4/4 [" in r.stderr  # the progress bar, over two requests
    shown = requests.get(module_server.url + "/luts/c3").json()["labels"]
    assert [x["label"] for x in shown] == ["Quillmere Bank is a lender in Oslo.",
                                           "Marta Kowalski is a nurse from Gdansk.", " lends to farmers."]
    path.write_text("Zorblat Fenwick plays the oboe.\n")
    r = client(module_server, cli_env, "luts", "teach-file", "c3", str(path))
    assert r.returncode == 0 and r.stdout.startswith("taught 1 of 1 labels"), r.stderr
    r = client(module_server, cli_env, "luts", "teach-file", "c3", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1 and "No such file" in r.stderr and "Traceback" not in r.stderr
