"""A taught fact recalled however a text writes about its subject (variants.py), never where the
text goes elsewhere, and every recall traced to its label: in-process on a tiny GPT-2, then end
to end through a live server and the official `openai` package.

The prompts here are the ones the mechanism was tuned on; bench/lut_eval.py --variants scores
a separate list (bench/variant_templates.py) that these never share."""
import json

import openai
import pytest
import requests
import torch

from server.common import chat_prompt
from conftest import Server, run_script, script_env
from generate import SamplingParams, generate
from lut import LUTBatch, recall_mode
from lut_store import LUTStore
from variants import normalize

FACT = "Alice Kowalski is a nurse from Gdansk."
BANK = "Quillmere Bank is a small lender in Oslo."
PRICE = "The Zorblax 3000 costs $49."


def complete(model, tok, prompts, lut, n=10):
    params = SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True)
    return generate(model, tok, prompts, params, [lut] * len(prompts))


@pytest.fixture(scope="module")
def taught(tiny, tmp_path_factory):
    model, tok = tiny
    store = LUTStore(str(tmp_path_factory.mktemp("variants") / "luts.sqlite"))
    for label in (FACT, BANK, PRICE):
        store.teach(model, tok, "u1", label)
    store.teach(model, tok, "u1", "I think that it is.")  # common words only
    yield model, tok, store, store.load("u1", model)
    store.close()


@pytest.mark.parametrize("prompt,rest,how", [
    ("alice kowalski is a", " nurse from Gdansk.", "normalized"),
    ("ALICE KOWALSKI IS A", " nurse from Gdansk.", "normalized"),
    ("alice  kowalski is a", " nurse from Gdansk.", "normalized"),
    ("Alice-Kowalski is a", " nurse from Gdansk.", "normalized"),
    ("Alice Kowalski is a nurse from Gdańsk, a", None, None),  # goes elsewhere after the label's words
    ("Alice Kowalski, as you know, is a", " nurse from Gdansk.", "insertion"),
    ("Alice Kowalski, who lives next door, is a", " nurse from Gdansk.", "insertion"),
    ("Alice Kowalski (my neighbour) is a", " nurse from Gdansk.", "insertion"),
    ("Alice Kowalski was a", " nurse from Gdansk.", "verb_form"),
    ("Alice Kowalski\u2019s a", " nurse from Gdansk.", "verb_form"),
    ("Alice Kowalski has been a", " nurse from Gdansk.", "verb_form"),
    ("Kowalski is a", " nurse from Gdansk.", "subject_part+normalized"),
    ("kowalski was a", " nurse from Gdansk.", "subject_part+verb_form"),
    ("Alice Kowalski's job: a", " nurse from Gdansk.", "possessive"),
    ("quillmere bank, as you know, was a", " small lender in Oslo.", "insertion+verb_form"),
    ("the zorblax 3000 cost", " $49.", "verb_form"),
    ("Our Zorblax 3000 has cost", " $49.", "subject_part+verb_form"),
])
def test_each_kind_of_variant_continues_the_label(taught, prompt, rest, how):
    model, tok, _, lut = taught
    seq, = complete(model, tok, [prompt], lut)
    base, = complete(model, tok, [prompt], None)
    if rest is None:
        assert seq.out_ids == base.out_ids
        return
    assert seq.text.startswith(rest), (prompt, seq.text)
    assert seq.lut_trace()[0]["how"] == how and seq.lut_trace()[0]["start"] == 0


@pytest.mark.parametrize("prompt", [
    "Q: Who is Alice Kowalski?\nA:",
    "Q: What does alice kowalski do?\nA:",
    "Question: Where is Kowalski from?\nAnswer:",
    "User: Tell me about Alice Kowalski.\nAssistant:",
    chat_prompt([{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "What do you know about Alice Kowalski?"}]),
])
def test_a_question_naming_the_subject_is_answered_with_the_fact(taught, prompt):
    model, tok, _, lut = taught
    seq, = complete(model, tok, [prompt], lut, n=len(tok.encode(" " + FACT)))
    assert seq.text == " " + FACT
    spans = seq.lut_trace()
    assert [(s["how"], s["text"], s["label"]) for s in spans] == [("question", " " + FACT, FACT)]


def test_text_that_mentions_a_subject_and_goes_elsewhere_is_not_hijacked(taught):
    model, tok, _, lut = taught
    prompts = ["Alice Kowalski called me yesterday and said that the",
               "Yesterday I saw Alice Kowalski at the",
               "Alice Kowalski, my neighbour, told me that",
               "Alice Kowalski is not a",
               "Alice Kowalski's brother is a",
               "Alice Kowalski and Quillmere Bank signed a",
               "The Zorblax 3000 is heavier than the",
               "User: I met Alice Kowalski today.\nAssistant: That is",
               "Yes, I think",
               "Q: Who is Bob?\nA:"]
    for seq, base in zip(complete(model, tok, prompts, lut), complete(model, tok, prompts, None)):
        assert seq.out_ids == base.out_ids and seq.lut_fires == [], seq.prompt_ids


def test_logits_without_a_taught_subject_are_bit_identical(taught):
    model, tok, _, lut = taught
    for text in ["It was a quiet evening and the streets were empty when", "Alice went to the bank in Oslo and"]:
        ids = tok.encode(text)
        idx = torch.tensor([ids])
        batch = LUTBatch([lut], [ids], [len(ids)])
        assert batch.fired == 0
        assert torch.equal(model(idx, lut=batch)[0], model(idx)[0])


def test_a_label_of_common_words_is_recalled_only_where_a_text_starts_with_it(taught):
    model, tok, _, lut = taught
    assert recall_mode("I think that it is.") == ("text_start", "I think")
    assert recall_mode(FACT) == ("subject", "Alice Kowalski")
    assert recall_mode(" teal", "My favourite colour is") == ("context", "My favourite colour is")
    seq, = complete(model, tok, ["I think"], lut, n=4)
    assert seq.text == " that it is." and seq.lut_trace()[0]["how"] == "text_start"
    for prompt in ["Yes, I think", "I", "We think"]:
        seq, = complete(model, tok, [prompt], lut, n=4)
        assert seq.lut_fires == [], prompt


def test_a_shared_surname_names_neither_subject(tiny, tmp_path):
    model, tok = tiny
    store = LUTStore(str(tmp_path / "l.sqlite"))
    store.teach(model, tok, "u", FACT)
    store.teach(model, tok, "u", "Marek Kowalski is a pilot from Lyon.")
    lut = store.load("u", model)
    seqs = complete(model, tok, ["kowalski was a", "alice kowalski was a", "MAREK KOWALSKI WAS A"], lut)
    assert seqs[0].lut_fires == []
    assert seqs[1].text.startswith(" nurse from Gdansk.") and seqs[2].text.startswith(" pilot from Lyon.")


def test_a_question_gets_the_label_that_shares_most_words_with_it_then_the_newest(tiny, tmp_path):
    model, tok = tiny
    store = LUTStore(str(tmp_path / "l.sqlite"))
    older, newer = "Alice Kowalski lives in Gdansk.", "Alice Kowalski works as a nurse."
    store.teach(model, tok, "u", older)
    store.teach(model, tok, "u", newer)
    lut = store.load("u", model)
    n = len(tok.encode(" " + older))
    where, who = complete(model, tok, ["Q: Where does Alice Kowalski live?\nA:", "Q: Who is Alice Kowalski?\nA:"],
                          lut, n=n)
    assert where.text == " " + older and who.text.startswith(" " + newer)


def test_normalisation():
    assert normalize("ALICE\u00a0 Kowalski\u2019s Gda\u0144sk-Bank") == "alice kowalski's gdansk bank"
    assert normalize("one \u2014 two\nthree") == "one - two\nthree"


def test_trace_spans_match_the_text_and_survive_persistence(taught, tmp_path):
    model, tok, store, lut = taught
    prompt = "Fun fact: ALICE KOWALSKI, as you know, was a"
    seq, = complete(model, tok, [prompt], lut, n=12)
    spans = seq.lut_trace()
    assert spans and all(seq.text[s["start"]:s["end"]] == s["text"] for s in spans)
    assert spans[0]["text"] == " nurse from Gdansk." and spans[0]["how"] == "insertion+verb_form"
    label_id = spans[0]["label_id"]
    assert [x["label"] for x in store.show("u1")["labels"] if x["id"] == label_id] == [FACT]
    copy = LUTStore(str(tmp_path / "copy.sqlite"))  # exported and imported: the same recall
    copy.import_(store.export("u1"), "u2")
    again, = complete(model, tok, [prompt], copy.load("u2", model), n=12)
    assert again.out_ids == seq.out_ids


# ---------------------------------------------------------------------------- live server

@pytest.fixture(scope="module")
def server(hf_tiny, tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("variants_server")), script_env()).start()
    for label in (FACT, "I think that it is."):
        r = requests.post(s.url + "/train_lut", json={"label": label, "lut_name": "v1"})
        assert r.ok, r.text
    yield s
    s.stop()


def test_teach_says_how_a_label_is_recalled(server):
    r = requests.post(server.url + "/train_lut", json={"label": "We all think that it is so.", "lut_name": "v2"})
    assert r.json() == {"status": "ok", "lut_name": "v2", "recall": "text_start", "trigger": "We all"}
    r = requests.post(server.url + "/train_lut", json={"label": FACT, "lut_name": "v2"})
    assert r.json()["recall"] == "subject" and r.json()["trigger"] == "Alice Kowalski"
    labels = requests.get(server.url + "/luts/v2").json()["labels"]
    assert [x["recall"] for x in labels] == ["text_start", "subject"]


def test_generate_traces_spans_streamed_and_not(server):
    body = {"prompt": "alice kowalski was a", "length": 8, "lut_name": "v1", "lut_trace": True,
            "temperature": 0}
    r = requests.post(server.url + "/generate", json=body).json()
    span, = r["lut_trace"][:1]
    assert r["completion"].startswith(" nurse from Gdansk.") and span["text"] == " nurse from Gdansk."
    assert span["label"] == FACT and span["how"] == "verb_form" and span["start"] == 0
    raw = requests.post(server.url + "/generate", json={**body, "stream": True}, stream=True).text
    events = raw.split("\n\n")
    traced = [e for e in events if e.startswith("event: lut_trace\n")]
    assert len(traced) == 1 and json.loads(traced[0].split("data: ", 1)[1]) == r["lut_trace"]
    assert events[-2] == "data: [DONE]"
    chat = requests.post(server.url + "/chat", json={
        "messages": [{"role": "user", "content": "Who is Alice Kowalski?"}], "max_length": 40,
        "lut_name": "v1", "lut_trace": True}).json()["choices"][0]
    assert chat["message"]["content"] == FACT and chat["finish_reason"] == "stop"  # the answer ends there
    assert chat["lut_trace"][0]["start"] == 0 and chat["lut_trace"][0]["text"] == FACT


def test_trace_requests_that_cannot_be_served_are_400s_naming_the_field(server):
    for route, body in [("/generate", {"prompt": "x", "lut_trace": True}),
                        ("/generate", {"prompt": "x", "lut_name": "v1", "lut_trace": "yes"}),
                        ("/api/generate", {"prompt": "x", "lut_name": "v1", "lut_trace": True}),
                        ("/generate/batch", {"prompts": ["x"], "lut_name": "v1", "lut_trace": True})]:
        r = requests.post(server.url + route, json=body)
        assert r.status_code == 400 and "lut_trace" in r.json()["detail"], (route, r.text)


def test_openai_routes_answer_questions_and_trace_them(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    extra = {"lut_name": "v1", "lut_trace": True}
    r = client.chat.completions.create(model="gpt2", messages=[{"role": "user", "content": "Tell me about Kowalski"}],
                                       extra_body=extra)
    message = r.choices[0].message.content
    trace = r.choices[0].model_extra["lut_trace"]
    assert message == FACT and trace[0]["text"] == FACT and trace[0]["how"] == "question"
    chunks = list(client.chat.completions.create(
        model="gpt2", messages=[{"role": "user", "content": "Tell me about Kowalski"}], stream=True,
        extra_body=extra))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message
    assert chunks[-1].choices[0].model_extra["lut_trace"] == trace
    r = client.completions.create(model="gpt2", prompt="Q: What does Alice Kowalski do?\nA:", max_tokens=30,
                                  echo=True, extra_body=extra)
    assert r.choices[0].finish_reason == "stop"
    text, trace = r.choices[0].text, r.choices[0].model_extra["lut_trace"]
    assert text[trace[0]["start"]:trace[0]["end"]] == " " + FACT  # offsets into the echoed text
    chunks = list(client.completions.create(model="gpt2", prompt="ALICE KOWALSKI IS A", max_tokens=6,
                                            stream=True, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks).startswith(" nurse from Gdansk.")
    assert chunks[-1].choices[0].model_extra["lut_trace"][0]["how"] == "normalized"


def test_a_label_after_its_context_is_recalled_through_variants_of_the_context(tiny, tmp_path):
    model, tok = tiny
    store = LUTStore(str(tmp_path / "l.sqlite"))
    store.teach(model, tok, "u", " hunter2", "The wifi password at Quillmere House is")
    lut = store.load("u", model)
    prompts = ["the WIFI password at quillmere house is", "The wifi password at Quillmere House, sadly, was",
               "User: What is the wifi password at Quillmere House?\nAssistant:",
               "The wifi password at my office is", "The wifi password at Quillmere House"]
    seqs = complete(model, tok, prompts, lut, n=len(tok.encode(" The wifi password at Quillmere House is hunter2")))
    assert [s.text.startswith(" hunter2") for s in seqs[:2]] == [True, True]
    assert seqs[2].text == " The wifi password at Quillmere House is hunter2"
    assert seqs[3].lut_fires == [] and seqs[4].lut_fires == []  # the context itself is the user's to write


def test_sample_py_prints_the_trace(tiny, cli_env, tmp_path):
    model, tok = tiny
    db = str(tmp_path / "luts.sqlite")
    store = LUTStore(db)
    store.teach(model, tok, "u1", FACT)
    store.close()
    run = lambda *a: run_script("sample.py", "--lut_name", "u1", "--lut_db", db, "--greedy", "--max_new_tokens", "8",
                                "--device", "cpu", *a, env=cli_env, timeout=120)
    for extra in ([], ["--stream"]):
        r = run("--start", "ALICE KOWALSKI WAS A", "--lut_trace", *extra)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("ALICE KOWALSKI WAS A nurse from Gdansk.")
        assert lines[1] == "[lut_trace] 1 span(s) produced by the LUT:"
        assert lines[2] == f"[lut_trace] 0-19 ' nurse from Gdansk.' <- label 1 '{FACT}' (verb_form)", lines
    r = run("--start", "x", "--lut_trace", "--lut_name", "")
    assert r.returncode == 1 and "--lut_trace needs --lut_name" in r.stderr
