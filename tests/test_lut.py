"""Per-user LUTs on a tiny GPT-2: recall, locality, conflicts, isolation, persistence, the store."""
import sqlite3

import pytest
import torch

from conftest import ROOT, run_script
from generate import SamplingParams, generate
from lut import LUTBatch, LUTError, build_entries
from lut_store import LUTStore
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
    # exact triggers in both spellings ("TLG ..." at the start, " TLG ..." after a space), each
    # position from the first whole rare word on ("TL" -> "G" is not taught: "TL" alone is not a
    # word of the label); plus one canonical entry per token of " TLG ..." and its end, which
    # variants and answers fire
    assert store.teach(model, tok, "u1", LABEL)["added"] == 2 * (len(tok.encode(LABEL)) - 2) + len(tok.encode(" " + LABEL)) + 1
    lut = store.load("u1", model)
    assert complete(model, tok, "TLG Capital is", lut).text.startswith(" an asset management firm.")
    assert complete(model, tok, "TLG Capital is an asset", lut).text.startswith(" management firm.")


LEADS = ["\n", "Fun fact: ", "According to the records, ", "Q: Who is it?\nA: ",
         "System: You are a helpful assistant.\nUser: Tell me about banks.\nAssistant: ",
         "We met on Tuesday and talked for an hour about money, and then she said that ",
         "Marta Kowalski is a nurse from Gdansk. "]  # the last is another taught label's text


@pytest.mark.parametrize("lead", LEADS)
def test_recall_after_any_leading_text(tiny, store, lead):
    model, tok = tiny
    store.teach(model, tok, "u1", LABEL)
    store.teach(model, tok, "u1", "Marta Kowalski is a nurse from Gdansk.")
    lut = store.load("u1", model)
    assert complete(model, tok, lead + "TLG Capital", lut).text.startswith(" is an asset management firm.")
    assert complete(model, tok, lead + "TLG Capital is an", lut).text.startswith(" asset management firm.")


def test_trigger_the_model_writes_itself_fires(tiny, store):
    """A first label makes the model write a second label's trigger: the second label follows."""
    model, tok = tiny
    store.teach(model, tok, "u1", "Mira Sato works at Quillmere Bank")
    store.teach(model, tok, "u1", "Quillmere Bank is a lender in Oslo.")
    out = complete(model, tok, "Who is she? Mira Sato", store.load("u1", model), 14).text
    assert out.startswith(" works at Quillmere Bank is a lender in Oslo."), out


def test_common_first_words_do_not_fire_alone(tiny, store):
    model, tok = tiny
    for label in ["The Quillmere Bank is a lender in Oslo.", "I think that Zorvath Kell is a pilot.",
                  "It is said that Alice Kim lives in Lagos.", "In 1998 Omar Haddad moved to Brno."]:
        store.teach(model, tok, "u1", label)
    lut = store.load("u1", model)
    for prompt in ["The", "Hello there. The", "I think", "I think that", "Well, it is said that", "In 1998",
                   "In 1998 they", "Ms. Kim"]:
        ids = tok.encode(prompt)
        assert LUTBatch([lut], [ids], [len(ids)]).fired == 0, prompt
        assert complete(model, tok, prompt, lut).out_ids == complete(model, tok, prompt, None).out_ids
    # once a specific part is there, the label follows, whatever came before
    assert complete(model, tok, "Yesterday the Quillmere", lut).text.startswith(" Bank is a lender in Oslo.")
    assert complete(model, tok, "Rumour: in 1998 Omar Haddad", lut).text.startswith(" moved to Brno.")
    assert complete(model, tok, "I think that Zorvath", lut).text.startswith(" Kell is a pilot.")


def test_equally_deep_triggers_that_disagree_do_not_fire(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", "Alice Kim is a nurse from Lagos.")
    store.teach(model, tok, "u1", "Marta Kim is a pilot from Quito.")
    lut = store.load("u1", model)
    assert complete(model, tok, "Today Alice Kim is a", lut).text.startswith(" nurse from Lagos.")
    assert complete(model, tok, "Today Marta Kim is a", lut).text.startswith(" pilot from Quito.")
    prompt = "Today Sofia Kim is a"  # matches both as deep: neither is more right
    assert complete(model, tok, prompt, lut).out_ids == complete(model, tok, prompt, None).out_ids


def test_untouched_prompts_are_bit_identical_and_unknown_lut_is_base(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", LABEL)
    lut = store.load("u1", model)
    assert store.load("nobody", model) is None  # cold start: the base model
    for prompt in ["The weather in Paris is", "Once upon a time there", "def main():\n    return"]:
        idx = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            base, _ = model(idx)
            with_lut, _ = model(idx, lut=LUTBatch([lut], idx.tolist(), [idx.size(1)]))
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


def test_label_context_fires_wherever_the_context_appears(tiny, store):
    model, tok = tiny
    store.teach(model, tok, "u1", " Paris.", label_context="The capital of Atlantis is")
    store.teach(model, tok, "u1", " 42", label_context="The answer is")  # common words: the user chose them
    lut = store.load("u1", model)
    for lead in ["", "Quiz time! ", "User: What is it?\nAssistant: "]:
        assert complete(model, tok, lead + "The capital of Atlantis is", lut, 3).text.startswith(" Paris.")
        assert complete(model, tok, lead + "The answer is", lut, 1).text == " 42"
    prompt = "They say the capital is"  # only part of the context
    assert complete(model, tok, prompt, lut).out_ids == complete(model, tok, prompt, None).out_ids


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


def test_a_lut_serves_its_model_in_bfloat16_and_back(tiny, store):
    """bfloat16 (the server's --dtype; CUDA's float16 alike) rounds the weights, which would change
    the fingerprint: it is pinned at load, so the same checkpoint keeps its LUTs in every dtype."""
    from model import load_model
    model, tok = tiny
    half = load_model("gpt2", dtype=torch.bfloat16)
    assert half.transformer.wte.weight.dtype == torch.bfloat16 and half.fingerprint() == model.fingerprint()
    store.teach(model, tok, "u1", LABEL)  # taught on fp32
    store.teach(half, tok, "u2", "Quillmere Station opens at dawn.")  # taught on bfloat16
    for name, prompt, rest, other in (("u1", "Fun fact: TLG Capital is", " an asset management firm.", half),
                                      ("u2", "Quillmere Station", " opens at dawn.", model)):
        assert complete(other, tok, prompt, store.load(name, other)).text.startswith(rest)


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
    """Values are checked behind helper texts that may hold characters a Shakespeare-style
    vocabulary lacks: teaching still works, recall works after leading text, and a label with an
    unknown character is a 400 naming the field."""
    from tokenizer import CharTokenizer
    tok = CharTokenizer(sorted(set("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    store.teach(model, tok, "u1", "ROMEO: What light through yonder window breaks?")
    lut = store.load("u1", model)
    assert complete(model, tok, "ROMEO: What light", lut, n=30).text == " through yonder window breaks?"
    assert complete(model, tok, "JULIET: Hark!\nROMEO: What light", lut, n=30).text == " through yonder window breaks?"
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
    r = run_script("lut.py", "--lut_db", path, "--init_from", "gpt2", "--device", "cpu", "teach", "u1",
                   "Marta Kowalski is a nurse from Gdansk.", timeout=120)
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
    assert store.show("u1")["entries"] == len(build_entries(model, tok, "Marta Kowalski is a nurse from Gdansk.")["target"])
    for n in (8, 16):  # the deleted label's prompt is the base model's again, token for token
        assert complete(model, tok, "TLG Capital is", lut, n).out_ids == complete(model, tok, "TLG Capital is", None, n).out_ids
    assert complete(model, tok, "Marta Kowalski is", lut).text.startswith(" a nurse from Gdansk.")  # the other stays
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
    assert torch.equal(a.values, b.values) and (a.targets == b.targets).all()
    assert complete(model, tok, "Note: TLG Capital is", b).text.startswith(" an asset management firm.")
    assert store.show("u2")["labels"][0]["label"] == LABEL
    with pytest.raises(LUTError) as e:
        store.import_(data)  # u1 exists
    assert e.value.status == 409
    with pytest.raises(LUTError, match="not a LUT export"):
        store.import_(b"\x00" * 64, "u3")


KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import lut_store
from model import load_model
from tokenizer import get_tokenizer
model = load_model("gpt2"); tok = get_tokenizer()
store = lut_store.LUTStore({path!r})
store.teach(model, tok, "u1", "First lesson is kept safe.")
original = lut_store._Transaction.__exit__
def die_before_commit(self, *exc):
    if {kill!r}:
        os._exit(9)  # like SIGKILL: no cleanup, no rollback, no commit
    return original(self, *exc)
lut_store._Transaction.__exit__ = die_before_commit
store.teach(model, tok, "u1", "Second lesson is about to die.")
"""


@pytest.mark.parametrize("kill", [True, False])
def test_store_killed_mid_teach_keeps_all_or_nothing(tiny, tmp_path, kill):
    path = str(tmp_path / "luts.sqlite")
    script = KILL_SCRIPT.format(root=ROOT, path=path, kill=kill)
    r = run_script("-c", script, timeout=120)
    assert (r.returncode == 9) == kill, r.stderr
    conn = sqlite3.connect(path)
    labels = [x for (x,) in conn.execute("SELECT label FROM labels ORDER BY id")]
    counts = dict(conn.execute("SELECT l.label, COUNT(e.id) FROM labels l JOIN entries e ON e.label_id = l.id "
                               "GROUP BY l.id"))
    model, tok = tiny
    entries = lambda label: len(build_entries(model, tok, label)["target"])
    assert counts["First lesson is kept safe."] == entries("First lesson is kept safe.")
    if kill:
        assert labels == ["First lesson is kept safe."]
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == counts["First lesson is kept safe."]
    else:
        assert counts["Second lesson is about to die."] == entries("Second lesson is about to die.")


def test_sample_and_lut_cli(script, tmp_path):
    db = str(tmp_path / "luts.sqlite")
    run = lambda *a: script(*a, timeout=120)
    r = run("lut.py", "--lut_db", db, "teach", "u1", LABEL)
    assert r.returncode == 0, r.stderr
    r = run("sample.py", "--lut_name", "u1", "--lut_db", db, "--start", "TLG Capital is", "--greedy",
            "--max_new_tokens", "6")
    assert r.returncode == 0 and r.stdout.startswith("TLG Capital is an asset management firm."), r.stderr
    assert run("lut.py", "--lut_db", db, "export", "u1", str(tmp_path / "u1.safetensors")).returncode == 0
    assert run("lut.py", "--lut_db", db, "import", str(tmp_path / "u1.safetensors"), "--lut_name", "u2").returncode == 0
    r = run("lut.py", "--lut_db", db, "show", "u9")
    assert r.returncode != 0 and "no LUT named 'u9'" in r.stderr and "Traceback" not in r.stderr


FORMAT1_SCHEMA = """
CREATE TABLE luts (name TEXT PRIMARY KEY, model_id TEXT NOT NULL, model_source TEXT, layer INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE labels (id INTEGER PRIMARY KEY, lut TEXT NOT NULL REFERENCES luts(name) ON DELETE CASCADE,
    label TEXT NOT NULL, context TEXT NOT NULL DEFAULT '', created REAL NOT NULL, UNIQUE (lut, label, context));
CREATE TABLE entries (id INTEGER PRIMARY KEY, lut TEXT NOT NULL, label_id INTEGER NOT NULL REFERENCES labels(id)
    ON DELETE CASCADE, model_id TEXT NOT NULL, layer INTEGER NOT NULL, position INTEGER NOT NULL,
    token INTEGER NOT NULL, target INTEGER NOT NULL, radius REAL NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
    created REAL NOT NULL);
CREATE INDEX entries_by_lut ON entries (lut, token);
"""


def test_lut_of_the_old_format_is_retaught_from_its_labels(tiny, tmp_path):
    """A database written by the residual-key LUTs (format 1): its labels survive the upgrade and
    are taught again, in order (latest still wins), on first use."""
    model, tok = tiny
    path = str(tmp_path / "old.sqlite")
    conn = sqlite3.connect(path)
    conn.executescript(FORMAT1_SCHEMA)
    conn.execute("INSERT INTO luts VALUES ('u1', ?, 'gpt2', 1, 3, 0)", (model.fingerprint(),))
    conn.executemany("INSERT INTO labels (lut, label, created) VALUES ('u1', ?, 0)",
                     [(LABEL,), ("TLG Capital is a small bank in Accra.",)])
    conn.execute("INSERT INTO entries VALUES (1, 'u1', 1, 'x', 1, 0, 0, 0, 0.1, x'00', x'00', 0)")
    conn.commit()
    conn.close()
    store = LUTStore(path)
    assert [x["label"] for x in store.show("u1")["labels"]] == [LABEL, "TLG Capital is a small bank in Accra."]
    lut = store.load("u1", model)
    assert complete(model, tok, "Note: TLG Capital is", lut).text.startswith(" a small bank in Accra.")
    assert store.show("u1")["entries"] > 0
    store.close()
