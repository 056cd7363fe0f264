"""
What every data/<name>/prepare.py shares: reading the source text (a local --input file or a
one-time download), and writing train.bin / val.bin (uint16 token ids, as nanoGPT) plus
meta.json (vocab size and the tokenizer spec that train.py stores in its checkpoints).
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def parse_args(doc, argv=None, add_arguments=None, val_fraction=0.1):
    """The flags every prepare.py has; add_arguments(parser) adds a script's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None, help="a local UTF-8 text file to use instead of downloading the source")
    p.add_argument("--out_dir", default=None, help="where to write train.bin, val.bin, meta.json "
                   "(default: this script's directory)")
    p.add_argument("--val_fraction", type=float, default=val_fraction, help="share of the text held out for validation")
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error("--val_fraction must be between 0 and 1")
    return args


def read_text(path=None, url=None, cache=None):
    """The text of `path`; without one, `url` downloaded once into `cache` and read from there."""
    if path is None:
        path = cache
        if not os.path.exists(cache):
            import requests
            print(f"downloading {url}")
            try:
                r = requests.get(url, timeout=60)
                r.raise_for_status()
            except requests.RequestException as e:
                sys.exit(f"error: could not download {url} ({e}); pass a local file with --input")
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            with open(cache, "w", encoding="utf-8") as f:
                f.write(r.text)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read {path}: {e}")
    if not text:
        sys.exit(f"error: {path} is empty")
    return text


def write_dataset(out_dir, train_ids, val_ids, tokenizer):
    """Token id lists -> train.bin, val.bin (uint16) and meta.json in out_dir."""
    assert tokenizer.vocab_size <= 1 << 16, "uint16 token files need a vocabulary of at most 65536"
    os.makedirs(out_dir, exist_ok=True)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(out_dir, f"{split}.bin"))
    write_meta(out_dir, tokenizer, len(train_ids), len(val_ids))


def write_meta(out_dir, tokenizer, n_train, n_val):
    meta = {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.spec, "train_tokens": n_train,
            "val_tokens": n_val}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    print(f"{out_dir}: train {n_train:,} tokens, val {n_val:,} tokens, vocab {tokenizer.vocab_size}")


def split_text(text, val_fraction):
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]


def prepare_bpe(args, default_dir, url=None, cache_name="input.txt"):
    """GPT-2 BPE datasets from one text: shakespeare, and openwebtext given --input."""
    from tokenizer import GPT2Tokenizer
    out_dir = args.out_dir or default_dir
    text = read_text(args.input, url, os.path.join(out_dir, cache_name) if url else None)
    tok = GPT2Tokenizer()
    train, val = split_text(text, args.val_fraction)
    write_dataset(out_dir, tok.enc.encode_ordinary(train), tok.enc.encode_ordinary(val), tok)
