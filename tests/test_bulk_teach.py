"""Bulk teaching: label files (JSONL or one label per line), `python lut.py teach-file`."""
import json
import subprocess
import sys

from conftest import ROOT
from generate import SamplingParams, generate
from labelfile import check_item, read_file, report
from lut import LUTStore

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
    lines = [json.dumps({"label": f}) for f in FACTS] + [json.dumps({"label": "I think that it is."}), "{bad"]
    path.write_text("\n".join(lines) + "\n")
    run = lambda *a: subprocess.run([sys.executable, "lut.py", "--lut_db", db, "--device", "cpu", *a], cwd=ROOT,
                                    env=cli_env, capture_output=True, text=True, timeout=120)
    r = run("teach-file", "u1", str(path))
    assert r.returncode == 1, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("taught 3 of 5 labels (") and out[0].endswith("; 2 not taught:")
    assert out[1].startswith("  line 4: label has no part specific enough")
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
