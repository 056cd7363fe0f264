"""
English prose from GCIDE (the GNU Collaborative International Dictionary of English: Webster's
1913 plus WordNet) in GPT-2's BPE, for training a small GPT-2-shaped model from scratch.

    apt-get install dict-gcide                # puts /usr/share/dictd/gcide.dict.dz in place
    python data/gcide/prepare.py
    python data/gcide/prepare.py --input /path/to/gcide.dict.dz   # another copy (.dz or plain)

Each dictionary entry becomes "Headword: definition ..." with its senses, notes and quotations
as plain sentences; pronunciations, etymologies, usage labels, source tags, cross-reference
braces, quotation authors and synonym lists are dropped. Entries are separated by blank lines.
"""
import gzip
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import parse_args, split_text, write_dataset  # noqa: E402

DEFAULT_INPUT = "/usr/share/dictd/gcide.dict.dz"
HEADWORD = re.compile(r"[^\\\n]*\\[^\\]+\\")  # "Coagulate \Co*ag"u*late\" (may wrap a line)
LETTERS = {"ae": "ae", "AE": "Ae", "oe": "oe", "OE": "Oe", "eth": "th", "thorn": "th", "imac": "i",
           "aum": "a", "deg": " degrees", "sect": "section"}
PRONUNCIATION = re.compile(r"\s+\([^()]*[*`\"]")  # "   ([.a]*l[e^]ks`...), Alexipharmical"
ACCENTED = re.compile(r"\[[`'\"=^~.,*-]?([a-zA-Z]{1,2})[\^~]?\]")  # ['e] ["o] [=a] [a^] -> e o a a
CLEANUPS = [
    (re.compile(r"--[A-Z][^\n]*"), ""),            # quotation authors: --Shak., --Sir W. Scott.
    (re.compile(r"\[[^\[\]]*\]"), ""),              # [Etym], [Obs.], [1913 Webster], [syn: ...]
    (re.compile(r"\([^()]*[*`][^()]*\)"), ""),       # pronunciations: (k[-o]*[aum]...)
    (re.compile(r"\{([^{}]*)\}"), lambda m: re.sub(r'[*"`]', "", m[1])),  # {Ab`sent*ness} -> Absentness
    (re.compile(r"\s+"), " "),
    (re.compile(r" ([.,;:)])"), r"\1"),
    (re.compile(r"\( ?\)|^(Note|Usage): "), ""),
]


def read_dict(path):
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found; install the dictionary (apt-get install dict-gcide) or pass --input")
    opener = gzip.open if path.endswith((".dz", ".gz")) else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace").replace("\ufffd", "'")


def clean(text):
    text = re.sub(r"\[(\w+)\]", lambda m: LETTERS.get(m.group(1), m.group(0)), text)
    text = ACCENTED.sub(r"\1", text)
    for pattern, repl in CLEANUPS:
        text = pattern.sub(repl, text.strip())
    return text.strip()


def entry_prose(entry):
    """One dictd entry -> "Headword: sense. Another sense." with one line per paragraph, or ''."""
    head = HEADWORD.match(entry)
    if not head or entry.startswith("00-"):
        return ""
    word = head.group(0).split("\\")[0].strip()
    lines, n = entry.split("\n"), 1  # the header (headwords, pronunciations, etymology) may wrap
    while n < len(lines) and (not lines[n][:1].isspace() or PRONUNCIATION.match(lines[n])
                              or "\n".join(lines[:n]).count("[") > "\n".join(lines[:n]).count("]")):
        n += 1
    paragraphs = [clean(p) for p in re.split(r"\n\s*\n", "\n".join(lines[n:])) if not p.strip().startswith("Syn:")]
    paragraphs = [p for p in paragraphs if re.search(r"[a-zA-Z]{2}", p)]
    return f"{word}: " + "\n".join(paragraphs) if paragraphs else ""


def main(argv=None):
    args = parse_args(__doc__, argv, val_fraction=0.05)
    from tokenizer import GPT2Tokenizer
    raw = read_dict(args.input or DEFAULT_INPUT)
    entries = [entry_prose(e) for e in re.split(r"\n\n(?=\S)", raw)]
    text = "\n\n".join(e for e in entries if e) + "\n"
    print(f"{sum(map(bool, entries)):,} entries, {len(text):,} characters of prose (from {len(raw):,})")
    tok = GPT2Tokenizer()
    train, val = split_text(text, args.val_fraction)
    write_dataset(args.out_dir or HERE, tok.enc.encode_ordinary(train), tok.enc.encode_ordinary(val), tok)


if __name__ == "__main__":
    main()
