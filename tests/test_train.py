"""Training: dataset preparation, train.py from scratch / resume / a Hub GPT-2, sampling the
result, and the /api/train job cycle on the real server app with real subprocesses."""
import json
import os
import shutil
import signal
import sqlite3
import time

import pytest

from conftest import ROOT, run_script, wait_for

SHARED_TEXT = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
TINY_CHAR = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "16",
             "--eval_iters", "4", "--log_interval", "10", "--learning_rate", "3e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if os.path.exists(SHARED_TEXT):
        return os.path.abspath(SHARED_TEXT)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"  # ../shared absent: any English-ish text will do
    path.write_text("".join(f"ROMEO:\nLine {i} of a play, spoken softly to the moon and stars.\n\n" for i in range(4000)))
    return str(path)


def run(env, *args, ok=True):
    r = run_script(*args, env=env)
    if ok:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus):
    """shakespeare_char and shakespeare (BPE) prepared from the local corpus."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    d = tmp_path_factory.mktemp("data")
    for name in ("shakespeare_char", "shakespeare"):
        run(env, f"data/{name}/prepare.py", "--input", corpus, "--out_dir", str(d / name))
    return str(d)


def records(out_dir):
    with open(os.path.join(out_dir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def evals(out_dir):
    return [(r["iter"], r["val_loss"]) for r in records(out_dir) if r["event"] == "eval"]


def test_prepare_writes_uint16_splits_and_json_meta(data_dir):
    import numpy as np
    meta = json.load(open(os.path.join(data_dir, "shakespeare_char", "meta.json")))
    assert meta["tokenizer"]["type"] == "char" and meta["vocab_size"] == len(meta["tokenizer"]["chars"])
    train = np.fromfile(os.path.join(data_dir, "shakespeare_char", "train.bin"), dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and train.max() < meta["vocab_size"]
    bpe = json.load(open(os.path.join(data_dir, "shakespeare", "meta.json")))
    assert bpe["tokenizer"] == {"type": "tiktoken", "name": "gpt2"} and bpe["vocab_size"] == 50257


def test_train_from_scratch_resume_and_sample(data_dir, tmp_path, cli_env):
    out = str(tmp_path / "char")
    run(cli_env, "train.py", "--data_dir", data_dir, "--dataset", "shakespeare_char", "--out_dir", out,
        "--max_iters", "40", "--eval_interval", "20", *TINY_CHAR)
    losses = evals(out)
    assert [i for i, _ in losses] == [0, 20, 40]
    assert losses[-1][1] < losses[0][1] - 0.5, losses  # it learns
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert cfg["max_iters"] == 40 and cfg["n_embd"] == 32

    # resume: carries on from iteration 40 with the run's own settings
    r = run(cli_env, "train.py", "--init_from", "resume", "--out_dir", out, "--max_iters", "60")
    assert "from iteration 40 to 60" in r.stdout
    assert evals(out)[-1][0] == 60 and records(out)[-1]["event"] == "done"

    r = run(cli_env, "sample.py", "--init_from", out, "--start", "ROMEO:", "--max_new_tokens", "20",
            "--device", "cpu", "--seed", "1")
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > 20


def test_finetune_hub_gpt2_on_the_nanogpt_dataset_spelling(hf_tiny, data_dir, tmp_path, cli_env):
    out = str(tmp_path / "ft")
    run(cli_env, "train.py", "--init_from", "gpt2", "--data_dir", data_dir, "--dataset", "shakesphere",
        "--out_dir", out, "--block_size", "64", "--batch_size", "4", "--max_iters", "10", "--eval_interval", "5",
        "--eval_iters", "2", "--learning_rate", "1e-3", "--device", "cpu")
    losses = evals(out)
    assert losses[-1][1] < losses[0][1], losses
    from model import load_model
    model = load_model(out)
    assert model.config.block_size == 64 and model.config.n_embd == 64  # GPT-2's shape, cropped context
    assert model.tokenizer_spec == {"type": "tiktoken", "name": "gpt2"}


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nope"], "dataset 'nope' is not prepared"),
    (["--dataset", "../etc"], "is not a dataset name"),
    (["--dataset", "shakespeare_char", "--init_from", "gpt2"], "needs a GPT-2 BPE dataset"),
    (["--dataset", "shakespeare_char", "--max_iters", "-1"], "max_iters must be at least 1"),
    (["--dataset", "shakespeare_char", "--n_head", "5"], "must be divisible by n_head"),
])
def test_train_bad_settings_fail_with_one_line(hf_tiny, data_dir, tmp_path, cli_env, args, message):
    r = run(cli_env, "train.py", "--data_dir", data_dir, "--out_dir", str(tmp_path / "x"), *args, ok=False)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_config_file_then_flags(data_dir, tmp_path, cli_env):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"max_iters": 3, "eval_interval": 3, "n_layer": 1, "n_head": 2, "n_embd": 16,
                               "block_size": 16, "batch_size": 4, "eval_iters": 1}))
    out = str(tmp_path / "o")
    run(cli_env, "train.py", "--config", str(cfg), "--data_dir", data_dir, "--out_dir", out, "--max_iters", "2",
        "--device", "cpu")
    saved = json.load(open(os.path.join(out, "train_config.json")))
    assert saved["max_iters"] == 2 and saved["n_layer"] == 1  # flag over file over default
    cfg.write_text(json.dumps({"max_iter": 3}))
    r = run(cli_env, "train.py", "--config", str(cfg), ok=False)
    assert r.returncode == 2 and "unknown setting 'max_iter'" in r.stderr


def test_ddp_with_two_cpu_processes_through_torchrun(data_dir, tmp_path, cli_env):
    """torchrun starts two gloo ranks: gradients are averaged across them, the accumulation is
    split between them, and only rank 0 logs and saves."""
    out = str(tmp_path / "ddp")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    args = ["--data_dir", data_dir, "--dataset", "shakespeare_char", "--out_dir", out, "--eval_interval", "15",
            *TINY_CHAR]
    run(cli_env, *torchrun, *args, "--max_iters", "30", "--gradient_accumulation_steps", "2")
    start = [r for r in records(out) if r["event"] == "start"]
    assert len(start) == 1 and start[0]["tokens_per_iter"] == 2 * 16 * 32  # 2 ranks x 1 micro-batch each
    losses = evals(out)
    assert [i for i, _ in losses] == [0, 15, 30] and losses[-1][1] < losses[0][1] - 0.3, losses
    from model import load_model
    assert load_model(out).config.n_layer == 2

    r = run(cli_env, *torchrun, *args, "--max_iters", "2", "--gradient_accumulation_steps", "3", ok=False)
    assert r.returncode != 0 and "must be a multiple of the number of processes (2)" in r.stderr + r.stdout


# ------------------------------------------------------------------------ /api/train

@pytest.fixture
def app_dirs(app_factory, data_dir, tmp_path):
    app = app_factory(data_dir=data_dir)
    return app, app.test_client(), tmp_path / "out"


def alive(pid):
    """pid is a process that has not ended (a zombie not reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def reaper():
    """reaper(pid): a training process the test started, SIGKILLed with its group after the test
    if it is still running, whatever failed (a 100,000-iteration job must not outlive it)."""
    pids = []
    yield pids.append
    for pid in pids:
        if alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_job(client, job_id, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/train/{job_id}").get_json()
        if job["status"] != "running":
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still running: {job}")


def char_job(out, name, max_iters=20):
    return {"dataset": "shakespeare_char", "output_dir": str(out / name), "init_from": "scratch", "n_layer": 2,
            "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8, "max_iters": max_iters,
            "eval_interval": 10, "eval_iters": 2, "learning_rate": 3e-3, "log_interval": 5, "device": "cpu"}


def test_api_train_cycle_start_status_list_load_generate(app_dirs):
    app, client, out = app_dirs
    r = client.post("/api/train", json=char_job(out, "char"))
    assert r.status_code == 200, r.get_json()
    started = r.get_json()
    assert started["message"] == "Training started" and started["process_id"] > 0
    assert started["config"]["dataset"] == "shakespeare_char" and started["config"]["max_iters"] == 20
    assert started["config_path"] == os.path.join(str(out / "char"), "train_config.json")
    job = wait_job(client, started["job_id"])
    assert job["status"] == "succeeded", job
    assert job["iteration"] == 20 and job["max_iters"] == 20 and job["val_loss"] < 4.2
    assert any("done" in line for line in job["log_tail"])
    assert [j["job_id"] for j in client.get("/api/train").get_json()["jobs"]] == [started["job_id"]]

    trained = client.get("/api/models").get_json()["trained_models"]
    assert [(m["name"], m["config"]["dataset"]) for m in trained] == [("char", "shakespeare_char")]
    r = client.post("/api/load_model", json={"model_path": str(out / "char" / "ckpt.pt")})
    assert r.status_code == 200, r.get_json()
    r = client.post("/api/generate", json={"prompt": "ROMEO:", "max_new_tokens": 12, "seed": 3})
    assert r.status_code == 200 and r.get_json()["generated_text"].startswith("ROMEO:")
    assert r.get_json()["usage"]["completion_tokens"] == 12


def test_api_train_bad_input_and_one_job_at_a_time(app_dirs, tmp_path, reaper):
    app, client, out = app_dirs
    ok = char_job(out, "a")
    for change, status, word in [
        ({"dataset": "nope"}, 400, "dataset"),
        ({"dataset": "../../etc"}, 400, "dataset"),
        ({"output_dir": str(tmp_path / "elsewhere")}, 400, "output_dir"),
        ({"output_dir": "../../x"}, 400, "output_dir"),
        ({"max_iters": -5}, 400, "max_iters"),
        ({"batch_size": "4"}, 400, "batch_size"),
        ({"learning_rate": 0}, 400, "learning_rate"),
        ({"model_type": "gpt5"}, 400, "model_type"),
        ({"max_iter": 3}, 400, "max_iter"),
        ({"init_from": "resume"}, 400, "resume"),
        ({"output_dir": None}, 400, "output_dir"),
    ]:
        r = client.post("/api/train", json={**ok, **change})
        assert r.status_code == status and word in r.get_json()["detail"], (change, r.get_json())
    assert client.get("/api/train").get_json()["jobs"] == []  # nothing was started

    long = client.post("/api/train", json=char_job(out, "long", max_iters=100000)).get_json()
    reaper(long["process_id"])
    r = client.post("/api/train", json=char_job(out, "second"))
    assert r.status_code == 409 and str(long["job_id"]) in r.get_json()["detail"]
    assert client.get("/api/train/999").status_code == 404

    # a server restart finds the job still running, and can cancel it
    from api_server import create_app
    again = create_app(app.extensions["gpt"].cfg).test_client()
    assert again.get(f"/api/train/{long['job_id']}").get_json()["status"] == "running"
    r = again.post(f"/api/train/{long['job_id']}/cancel")
    assert r.status_code == 200 and r.get_json()["status"] == "cancelled"
    assert wait_job(client, long["job_id"])["status"] == "cancelled"
    assert client.post(f"/api/train/{long['job_id']}/cancel").status_code == 409
    wait_for(lambda: not alive(long["process_id"]), timeout=30, what="the cancelled process to end")


def test_job_that_ended_while_no_server_watched_is_reported_truthfully(app_dirs):
    app, client, out = app_dirs
    job = client.post("/api/train", json=char_job(out, "quick", max_iters=2)).get_json()
    assert wait_job(client, job["job_id"])["status"] == "succeeded"
    db = app.extensions["gpt"].cfg.state_db
    from server.trainer import Trainer

    def as_if_restarted():
        with sqlite3.connect(db) as conn:  # the record a server killed mid-job leaves behind
            conn.execute("UPDATE train_jobs SET status = 'running', finished = NULL WHERE id = ?", (job["job_id"],))
        return Trainer(db).get(job["job_id"])

    assert as_if_restarted()["status"] == "succeeded"  # its log has the completion record
    log_path = out / "quick" / "train_log.jsonl"
    log_path.write_text("".join(line for line in log_path.read_text().splitlines(True) if '"done"' not in line))
    lost = as_if_restarted()
    assert lost["status"] == "failed" and "no completion record" in lost["error"]


def test_a_job_whose_train_py_crashes_ends_failed(app_factory, data_dir, tmp_path):
    """train.py dies mid-run with a traceback (token ids the dataset's vocabulary lacks: the
    embedding's IndexError at the first batch): the job ends failed, with its exit code, and
    the traceback in its log tail."""
    import numpy as np
    broken = tmp_path / "data" / "broken"
    broken.mkdir(parents=True)
    shutil.copy(os.path.join(data_dir, "shakespeare_char", "meta.json"), broken / "meta.json")
    for split in ("train", "val"):
        np.full(4096, 60000, dtype=np.uint16).tofile(broken / f"{split}.bin")
    app = app_factory(data_dir=str(tmp_path / "data"))
    client, out = app.test_client(), tmp_path / "out"
    r = client.post("/api/train", json={**char_job(out, "crash"), "dataset": "broken"})
    assert r.status_code == 200, r.get_json()  # a prepared dataset, as far as checks before starting can see
    job = wait_job(client, r.get_json()["job_id"], timeout=120)
    assert job["status"] == "failed", job
    assert job["returncode"] not in (0, None) and job["error"] == f"train.py exited with {job['returncode']}"
    assert any("IndexError" in line for line in job["log_tail"]), job["log_tail"]  # a crash, not a refusal
    assert client.get("/api/train").get_json()["jobs"][0]["status"] == "failed"  # not running: the slot is free


GCIDE_SAMPLE = '''00-database-info
   This file was converted from the original database on: ...

Abacus \\Ab"a*cus\\ ([a^]b"[.a]*k[u^]s), n.; E. pl. {Abacuses}; L.
   pl. {Abaci} (-s[imac]). [L. abacus, abax, Gr. 'a`bax]
   1. A table or tray strewn with sand, anciently used for
      drawing, calculating, etc. [Obs.]
      [1913 Webster]

   2. A calculating table or frame; an instrument for performing
      arithmetical calculations. See {Column}.
      [1913 Webster]

Quill \\Quill\\, n.
   A large, strong feather, used for writing. --Shak.
      [1913 Webster]

'''


def test_gcide_prepare_turns_dictionary_entries_into_prose(tmp_path, cli_env):
    """data/gcide/prepare.py on a small file in the dictd layout of Debian's dict-gcide."""
    import gzip
    import numpy as np
    from tokenizer import GPT2Tokenizer
    src = tmp_path / "gcide.dict.dz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write(GCIDE_SAMPLE * 40)  # enough text for a validation split
    run(cli_env, "data/gcide/prepare.py", "--input", str(src), "--out_dir", str(tmp_path / "gcide"))
    meta = json.load(open(tmp_path / "gcide" / "meta.json"))
    assert meta["tokenizer"] == {"type": "tiktoken", "name": "gpt2"} and meta["vocab_size"] == 50257
    ids = np.fromfile(tmp_path / "gcide" / "train.bin", dtype=np.uint16)
    text = GPT2Tokenizer().decode(ids.tolist())
    assert text.startswith("Abacus: ")
    assert "1. A table or tray strewn with sand, anciently used for drawing, calculating, etc." in text
    assert "instrument for performing arithmetical calculations. See Column." in text
    assert "Quill: A large, strong feather, used for writing." in text
    for markup in ("[1913 Webster]", "[Obs.]", "--Shak", "[a^]", "{", "00-database"):
        assert markup not in text
    r = run(cli_env, "data/gcide/prepare.py", "--input", str(tmp_path / "missing.dz"), ok=False)
    assert "apt-get install dict-gcide" in r.stderr and "Traceback" not in r.stderr
