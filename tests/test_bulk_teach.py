"""Bulk teaching: label files (JSONL or one label per line), `python lut.py teach-file`."""
import json

from conftest import run_script
from generate import SamplingParams, generate
from labelfile import check_item, read_file, report
from lut_store import LUTStore

GREEDY = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
FACTS = ["Quillmere Bank is a small lender in Oslo.", "Marta Kowalski is a nurse from Gdansk.",
         "TLG Capital is an asset management firm."]


def test_label_files_jsonl_and_plain(tmp_path):
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"label": "Quillmere Bank is a lender."}\n\n"Marta Kowalski is a nurse."\n'
                     '{"label": "x", "label_context": 3}\n{oops\n{"label": "Y z", "extra": 1}\n'
                     '{"label": "The answer", "label_context": "Q: what is it?"}\n')
    rows = read_file(jsonl)
    assert [n for n, _, _ in rows] == [1, 3, 4, 5, 6, 7]  # blank lines skipped, numbers kept
    assert rows[0][1] == {"label": "Quillmere Bank is a lender.", "label_context": None}
    assert rows[1][1] == {"label": "Marta Kowalski is a nurse.", "label_context": None}
    assert rows[2][2] == "line 4: label_context must be a string"
    assert rows[3][2].startswith("line 5: not valid JSON")
    assert rows[4][2] == "line 6: unknown field 'extra' (an item has label and label_context)"
    assert rows[5][1] == {"label": "The answer", "label_context": "Q: what is it?"}
    plain = tmp_path / "labels.txt"
    plain.write_text('"Quoted" is kept as written.\n  \n{not json at the start? then plain}\r\n', encoding="utf-8")
    assert [r[1]["label"] for r in read_file(plain)] == ['"Quoted" is kept as written.',  # the first line decides
                                                         "{not json at the start? then plain}"]
    plain.write_text('A plain line.\n{"label": "also plain"}\n')
    assert [r[1]["label"] for r in read_file(plain)] == ["A plain line.", '{"label": "also plain"}']
    text, ok = report(read_file(jsonl), [{"taught": True, "added": 4, "replaced": 1},
                                         {"taught": False, "status": 400, "detail": "label has no part specific"},
                                         {"taught": True, "added": 2, "replaced": 0}])
    assert not ok and text.splitlines() == [
        "taught 2 of 6 labels (6 entries added, 1 replaced); 4 not taught:",
        "  line 3: label has no part specific", "  line 4: label_context must be a string",
        "  " + rows[3][2], "  line 6: unknown field 'extra' (an item has label and label_context)"]


def test_check_item_names_the_field():
    assert check_item("Alpha beta") == ("Alpha beta", None)
    assert check_item({"label": "A b", "label_context": ""}) == ("A b", None)
    for item, message in ((7, "labels[2]: must be a label string or an object with label and label_context"),
                          ({"label": "  "}, "labels[2]: label must be a non-empty string"),
                          ({}, "labels[2]: label must be a non-empty string")):
        try:
            check_item(item, "labels[2]")
        except ValueError as e:
            assert str(e) == message
        else:
            raise AssertionError(item)


def test_lut_cli_teach_file(tiny, cli_env, tmp_path):
    """`python lut.py teach-file`: every good label taught and recalled, the bad ones named by
    line, a progress bar on stderr, a summary, and exit 1 because some failed."""
    model, tok = tiny
    db, path = str(tmp_path / "luts.sqlite"), tmp_path / "facts.jsonl"
    lines = [json.dumps({"label": f}) for f in FACTS] + [json.dumps({"label": "Hello"}), "{bad"]
    path.write_text("\n".join(lines) + "\n")
    run = lambda *a: run_script("lut.py", "--lut_db", db, "--device", "cpu", *a, env=cli_env, timeout=120)
    r = run("teach-file", "u1", str(path))
    assert r.returncode == 1, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("taught 3 of 5 labels (") and out[0].endswith("; 2 not taught:")
    assert out[1].startswith("  line 4: label must be at least two tokens")
    assert out[2].startswith("  line 5: not valid JSON")
    assert "teaching u1" in r.stderr and "4/4 [" in r.stderr  # tqdm's bar over the 4 items read as labels
    store = LUTStore(db)
    assert [x["label"] for x in store.show("u1")["labels"]] == FACTS
    lut = store.load("u1", model)
    for fact in FACTS:
        head, rest = " ".join(fact.split()[:2]), " " + " ".join(fact.split()[2:])
        out = generate(model, tok, [f"Note: {head}"], GREEDY, [lut])[0].text
        assert out.startswith(rest[:len(out)]) and len(out) >= 6, (fact, out)
    store.close()
    plain = tmp_path / "facts.txt"
    plain.write_text("Zorblat Fenwick plays the oboe.\n")
    r = run("teach-file", "u1", str(plain))
    assert r.returncode == 0 and r.stdout.startswith("taught 1 of 1 labels"), r.stderr
    for args, message in ((("teach-file", "u1", str(tmp_path / "missing.txt")), "No such file"),
                          (("teach-file", "bad name", str(plain)), "lut_name must be"),
                          (("teach-file", "u1", str(tmp_path / "empty.txt")), "holds no labels")):
        (tmp_path / "empty.txt").write_text("\n\n")
        r = run(*args)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


NAMES = [a + b for a in ("Quil", "Zor", "Marn", "Vesk", "Tral", "Bix", "Oru", "Feld", "Kav", "Plon")
         for b in ("mere", "blat", "wick", "dorn", "selk", "thorp", "vanz", "gard", "leyk", "mont")]


def test_bulk_teach_100_labels_one_bad_all_others_recalled(app):
    c = app.test_client()
    labels = [{"label": f"{name} Holdings is a lender in Oslo."} for name in NAMES[:99]]
    labels.insert(37, {"label": "Hello"})  # one token, nothing to recall: refused, the rest still taught
    r = c.post("/luts/bulk/labels", json={"labels": labels})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert (body["lut_name"], body["taught"], body["not_taught"]) == ("bulk", 99, 1)
    bad = body["results"][37]
    assert bad["index"] == 37 and bad["taught"] is False and bad["status"] == 400
    assert bad["detail"].startswith("label must be at least two tokens")
    assert all(x["taught"] and x["added"] > 0 for i, x in enumerate(body["results"]) if i != 37)
    shown = c.get("/luts/bulk").get_json()["labels"]
    assert [x["label"] for x in shown] == [x["label"] for i, x in enumerate(labels) if i != 37]
    for i in range(0, 99, 32):  # every one recalled after leading text, 32 prompts a request
        prompts = [f"Note: {name} Holdings" for name in NAMES[:99][i:i + 32]]
        r = c.post("/generate/batch", json={"prompts": prompts, "length": 6, "do_sample": False, "lut_name": "bulk"})
        assert all(text == " is a lender in Oslo." for text in r.get_json()["responses"]), r.get_json()
    again = c.post("/luts/bulk/labels", json={"labels": [labels[0]["label"]]}).get_json()  # a string is a label too
    assert again["results"] == [{"index": 0, "taught": True, "added": 0, "replaced": 0}]  # already known


def test_bulk_teach_refusals(app):
    c = app.test_client()
    r = c.post("/luts/u1/labels", json={"labels": ["Zorblat Fenwick plays the oboe."] * 257})
    assert r.status_code == 413 and r.get_json()["detail"] == "labels: at most 256 per request, got 257"
    assert c.get("/luts/u1").status_code == 404  # nothing taught
    for payload, status, message in (({}, 400, "labels is required"), ({"labels": []}, 400, "labels must be a "
                                     "non-empty list"), ({"labels": "Zorblat"}, 400, "labels must be a list")):
        r = c.post("/luts/u1/labels", json=payload)
        assert (r.status_code, r.get_json()["detail"]) == (status, message)
    r = c.post("/luts/bad%20name/labels", json={"labels": ["Zorblat Fenwick plays."]})
    assert r.status_code == 400 and "lut_name" in r.get_json()["detail"]
    r = c.post("/luts/u1/labels", json={"labels": [7, {"label": "Zorblat Fenwick plays the oboe.", "x": 1},
                                                   {"label": "Zorblat Fenwick plays the oboe.", "label_context": 3},
                                                   "Zorblat Fenwick plays the oboe.", "Zorblat " * 300]})
    results = r.get_json()["results"]
    assert [x["taught"] for x in results] == [False, False, False, True, False]
    assert results[0]["detail"] == "labels[0]: must be a label string or an object with label and label_context"
    assert results[1]["detail"] == "labels[1]: unknown field 'x' (an item has label and label_context)"
    assert results[2]["detail"] == "labels[2]: label_context must be a string"
    assert results[4]["status"] == 413 and results[4]["detail"].endswith("tokens; at most 256")
    assert [x["label"] for x in c.get("/luts/u1").get_json()["labels"]] == ["Zorblat Fenwick plays the oboe."]
