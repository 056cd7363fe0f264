"""sample.py end to end as a user runs it: real process, offline tiny GPT-2 from the Hub cache."""
import pytest
import torch

from conftest import run_script


def run(env, *args):
    return run_script("sample.py", *args, env=env, timeout=120)


def test_samples_from_the_hub_cache(hf_tiny, cli_env):
    r = run(cli_env, "--init_from", "gpt2", "--start", "Hello", "--num_samples", "2", "--max_new_tokens", "8",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---------------") == 2 and r.stdout.startswith("Hello")


def test_stream_and_file_prompt(hf_tiny, cli_env, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time")
    r = run(cli_env, "--start", f"FILE:{prompt}", "--max_new_tokens", "5", "--stream", "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")


@pytest.mark.parametrize("args,message", [
    (["--init_from", "gpt5"], "neither a GPT-2 type"),
    (["--init_from", "out/missing_model"], "neither a GPT-2 type"),
    (["--start", ""], "prompt must not be empty"),
    (["--start", "word " * 200], "must be shorter than the model's context"),
    (["--temperature", "-1"], "temperature"),
    (["--start", "FILE:/no/such/file"], "No such file"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_bad_input_is_one_line_and_nonzero(hf_tiny, cli_env, args, message):
    r = run(cli_env, *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_corrupt_checkpoint(cli_env, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    r = run(cli_env, "--init_from", str(tmp_path))
    assert r.returncode != 0 and "not a usable checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_more_new_tokens_than_the_context_holds(hf_tiny, cli_env):
    r = run(cli_env, "--start", "Hello", "--max_new_tokens", "300", "--device", "cpu", "--seed", "0")
    assert r.returncode == 0, r.stderr
    import tiktoken
    text = r.stdout.rsplit("---------------", 1)[0]
    assert len(tiktoken.get_encoding("gpt2").encode(text)) > 128 + 100  # the tiny model's context is 128
