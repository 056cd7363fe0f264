"""Per-user LUTs on a tiny GPT-2: recall, locality, conflicts, isolation, persistence, the store."""
import os
import sqlite3
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from generate import SamplingParams, generate
from lut import LUTBatch, LUTError, LUTStore
from model import GPT, GPTConfig

LABEL = "TLG Capital is an asset management firm."
GREEDY = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)


def complete(model, tok, prompt, lut, n=8):
    return generate(model, tok, [prompt], SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True),
                    [lut])[0]


@pytest.fixture
def store(tmp_path):
    s = LUTStore(str(tmp_path / "luts.sqlite"))
    yield s
    s.close()


def test_teach_then_recall_from_any_prefix(tiny, store):
    model, tok = tiny
    assert store.teach(model, tok, "u1", LABEL)["added"] == len(tok.encode(LABEL)) - 1
    lut = store.load("u1", model)
    assert complete(model, tok, "TLG Capital is", lut).text.startswith(" an asset management firm.")
    assert complete(model, tok, "TLG Capital is an asset", lut).text.startswith(" management firm.")


def test_untouched_prompts_are_bit_identical_and_unknown_lut_is_base(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", LABEL)
    lut = store.load("u1", model)
    assert store.load("nobody", model) is None  # cold start: the base model
    for prompt in ["The weather in Paris is", "Once upon a time there", "def main():\n    return"]:
        idx = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            base, _ = model(idx)
            with_lut, _ = model(idx, lut=LUTBatch([lut]))
        assert torch.equal(base, with_lut)
        assert complete(model, tok, prompt, lut, 16).out_ids == complete(model, tok, prompt, None, 16).out_ids


def test_same_label_twice_adds_nothing_and_latest_conflict_wins(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", LABEL)
    assert store.teach(model, tok, "u1", LABEL) == {"added": 0, "replaced": 0}
    result = store.teach(model, tok, "u1", "TLG Capital is a small bank in Accra.")
    assert result["replaced"] >= 1
    lut = store.load("u1", model)
    assert complete(model, tok, "TLG Capital is", lut).text.startswith(" a small bank in Accra.")


def test_luts_of_different_names_never_interact(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "alice", "Project Falcon is led by Alice.")
    store.teach(model, tok, "bob", "Project Falcon is led by Bob.")
    a, b = store.load("alice", model), store.load("bob", model)
    prompts = ["Project Falcon is led by"] * 3
    outs = generate(model, tok, prompts, GREEDY, [a, None, b])  # one batch mixing LUTs and none
    assert outs[0].text.startswith(" Alice.") and outs[2].text.startswith(" Bob.")
    assert outs[1].out_ids == complete(model, tok, prompts[1], None).out_ids


def test_label_context(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", " Paris.", label_context="The capital of Atlantis is")
    assert complete(model, tok, "The capital of Atlantis is", store.load("u1", model), 3).text.startswith(" Paris.")


def test_lut_of_another_model_is_refused(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", LABEL)
    torch.manual_seed(1)
    other = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).eval()
    with pytest.raises(LUTError, match="another base model") as e:
        store.load("u1", other)
    assert e.value.status == 409
    with pytest.raises(LUTError, match="another base model"):
        store.teach(other, tok, "u1", "Something else entirely.")


@pytest.mark.parametrize("label,context,name,message,status", [
    ("", None, "u1", "label must be a non-empty string", 400),
    ("   ", None, "u1", "label must be a non-empty string", 400),
    ("word " * 300, None, "u1", "at most 256", 413),
    ("Hi", None, "u1", "at least two tokens", 400),
    (LABEL, None, "bad name!", "lut_name must be", 400),
    (LABEL, None, "", "lut_name must be", 400),
    (LABEL, 42, "u1", "label_context must be a string", 400),
])
def test_bad_lessons(tiny, store, label, context, name, message, status):
    model, tok = tiny
    with pytest.raises(LUTError, match=message) as e:
        store.teach(model, tok, name, label, context)
    assert e.value.status == status
    assert store.list() == []


def test_character_level_model_without_digits(store):
    """The radius is set from filler texts with digits that a Shakespeare-style vocabulary lacks:
    teaching still works, and a label with an unknown character is a 400 naming the field."""
    from tokenizer import CharTokenizer
    tok = CharTokenizer(sorted(set("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    store.teach(model, tok, "u1", "ROMEO: What light through yonder window breaks?")
    lut = store.load("u1", model)
    assert complete(model, tok, "ROMEO: What light", lut, n=30).text == " through yonder window breaks?"
    with pytest.raises(LUTError, match="label: characters not in this model's vocabulary: '7'") as e:
        store.teach(model, tok, "u1", "Act 7 begins.")
    assert e.value.status == 400


def test_persistence_and_cross_process_invalidation(tiny, tmp_path):
    model, tok = tiny
    path = str(tmp_path / "luts.sqlite")
    first = LUTStore(path)
    first.teach(model, tok, "u1", LABEL)
    before = complete(model, tok, "TLG Capital is", first.load("u1", model), 12).out_ids
    first.close()
    second = LUTStore(path)  # as after a restart
    lut = second.load("u1", model)
    assert complete(model, tok, "TLG Capital is", lut, 12).out_ids == before
    # another process writes: the cached copy here must not be used any more
    r = subprocess.run([sys.executable, "lut.py", "--lut_db", path, "--init_from", "gpt2", "--device", "cpu", "teach",
                        "u1", "Marta Kowalski is a nurse from Gdansk."], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 0, r.stderr
    reloaded = second.load("u1", model)
    assert reloaded is not lut and len(reloaded) > len(lut)
    assert complete(model, tok, "Marta Kowalski is", reloaded).text.startswith(" a nurse from Gdansk.")


def test_list_show_delete(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", LABEL)
    store.teach(model, tok, "u1", "Marta Kowalski is a nurse from Gdansk.")
    [info] = store.list()
    assert info["name"] == "u1" and info["labels"] == 2 and info["entries"] > 10
    shown = store.show("u1")
    assert [x["label"] for x in shown["labels"]] == [LABEL, "Marta Kowalski is a nurse from Gdansk."]
    store.delete_label("u1", shown["labels"][0]["id"])
    lut = store.load("u1", model)
    assert not complete(model, tok, "TLG Capital is", lut).text.startswith(" an asset management firm.")
    with pytest.raises(LUTError) as e:
        store.delete_label("u1", 999)
    assert e.value.status == 404
    store.delete("u1")
    assert store.list() == [] and store.load("u1", model) is None
    with pytest.raises(LUTError) as e:
        store.show("u1")
    assert e.value.status == 404


def test_export_import_roundtrip(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", LABEL)
    data = store.export("u1")
    assert store.import_(data, "u2") == "u2"
    a, b = store.load("u1", model), store.load("u2", model)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.radius, b.radius)
    assert store.show("u2")["labels"][0]["label"] == LABEL
    with pytest.raises(LUTError) as e:
        store.import_(data)  # u1 exists
    assert e.value.status == 409
    with pytest.raises(LUTError, match="not a LUT export"):
        store.import_(b"\x00" * 64, "u3")


KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import lut
from model import load_model
from tokenizer import get_tokenizer
model = load_model("gpt2"); tok = get_tokenizer()
store = lut.LUTStore({path!r})
store.teach(model, tok, "u1", "First lesson is kept safe.")
original = lut._Transaction.__exit__
def die_before_commit(self, *exc):
    if {kill!r}:
        os._exit(9)  # like SIGKILL: no cleanup, no rollback, no commit
    return original(self, *exc)
lut._Transaction.__exit__ = die_before_commit
store.teach(model, tok, "u1", "Second lesson is about to die.")
"""


@pytest.mark.parametrize("kill", [True, False])
def test_store_killed_mid_teach_keeps_all_or_nothing(tiny, tmp_path, cli_env, kill):
    path = str(tmp_path / "luts.sqlite")
    script = KILL_SCRIPT.format(root=ROOT, path=path, kill=kill)
    r = subprocess.run([sys.executable, "-c", script], env=cli_env, capture_output=True, text=True, timeout=120)
    assert (r.returncode == 9) == kill, r.stderr
    conn = sqlite3.connect(path)
    labels = [x for (x,) in conn.execute("SELECT label FROM labels ORDER BY id")]
    counts = dict(conn.execute("SELECT l.label, COUNT(e.id) FROM labels l JOIN entries e ON e.label_id = l.id "
                               "GROUP BY l.id"))
    model, tok = tiny
    assert counts["First lesson is kept safe."] == len(tok.encode("First lesson is kept safe.")) - 1
    if kill:
        assert labels == ["First lesson is kept safe."]
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == counts["First lesson is kept safe."]
    else:
        assert counts["Second lesson is about to die."] == len(tok.encode("Second lesson is about to die.")) - 1


def test_sample_and_lut_cli(hf_tiny, cli_env, tmp_path):
    db = str(tmp_path / "luts.sqlite")
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                                    timeout=120)
    r = run("lut.py", "--lut_db", db, "teach", "u1", LABEL)
    assert r.returncode == 0, r.stderr
    r = run("sample.py", "--lut_name", "u1", "--lut_db", db, "--start", "TLG Capital is", "--greedy",
            "--max_new_tokens", "6")
    assert r.returncode == 0 and r.stdout.startswith("TLG Capital is an asset management firm."), r.stderr
    assert run("lut.py", "--lut_db", db, "export", "u1", str(tmp_path / "u1.safetensors")).returncode == 0
    assert run("lut.py", "--lut_db", db, "import", str(tmp_path / "u1.safetensors"), "--lut_name", "u2").returncode == 0
    r = run("lut.py", "--lut_db", db, "show", "u9")
    assert r.returncode != 0 and "no LUT named 'u9'" in r.stderr and "Traceback" not in r.stderr
