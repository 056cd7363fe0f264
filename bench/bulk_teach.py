"""
Bulk teaching through the API: labels per second of POST /luts/<name>/labels on a live
api_server.py (GPT-2 124M shape, random weights), against the same labels taught in this process
with no HTTP at all (lut_store.teach_many) and one /train_lut request per label, measured in the same
run, interleaved in rounds; then every label taught in bulk must be recalled after leading text
(/generate/batch, greedy). Token directions are cached per model, so each side first teaches the
whole set to a throwaway LUT: every measurement then does the same, warm, work.

    python bench/bulk_teach.py                  # 200 labels, ~3 minutes on 2 cores
    python bench/bulk_teach.py --labels 64 --n_layer 4 --n_embd 256    # quicker
"""
import argparse
import os
import sys
import tempfile
import time

import requests
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lut_store import LUTStore, teach_many  # noqa: E402
from model import GPT, GPTConfig, load_model  # noqa: E402
from serve import start_server  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

TARGET = 0.9  # the API's bulk route keeps at least 90% of the in-process teaching rate
SYLLABLES = (("Quil", "Zor", "Marn", "Vesk", "Tral", "Bix", "Oru", "Feld", "Kav", "Plon", "Druv", "Yss", "Hek", "Wub"),
             ("mere", "blat", "wick", "dorn", "selk", "thorp", "vanz", "gard", "leyk", "mont", "quist", "rell", "bo"),
             ("", "ax"))


def labels(n):
    names = [a + b + c for c in SYLLABLES[2] for a in SYLLABLES[0] for b in SYLLABLES[1]]
    if n > len(names):
        sys.exit(f"error: at most {len(names)} labels")
    return [f"{name} Holdings is a lender in Oslo." for name in names[:n]]


def post(url, path, payload):
    r = requests.post(url + path, json=payload, timeout=3600)
    if not r.ok:
        sys.exit(f"error: {path} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def teach_bulk(url, lut_name, texts, per_request=256):
    taught = 0
    for i in range(0, len(texts), per_request):
        taught += post(url, f"/luts/{lut_name}/labels", {"labels": texts[i:i + per_request]})["taught"]
    return taught


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, default=200, help="labels per measurement")
    p.add_argument("--rounds", type=int, default=4, help="the three measurements alternate this many times")
    p.add_argument("--n_layer", type=int, default=12, help="layers of the random model (124M: 12)")
    p.add_argument("--n_head", type=int, default=12, help="attention heads (124M: 12)")
    p.add_argument("--n_embd", type=int, default=768, help="width (124M: 768)")
    args = p.parse_args()
    texts = labels(args.labels)
    torch.manual_seed(0)
    work = tempfile.mkdtemp()
    ckpt_dir = os.path.join(work, "models", "random")
    os.makedirs(ckpt_dir)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    torch.save({"model_args": config.__dict__, "model": GPT(config).state_dict()}, os.path.join(ckpt_dir, "ckpt.pt"))

    # in this process: the store and teach_many with no HTTP in between
    model = load_model(ckpt_dir, "cpu")
    tok = get_tokenizer(model.tokenizer_spec)
    print(f"{args.labels} labels of ~{len(tok.encode(texts[0]))} tokens, model {args.n_layer} layers x "
          f"{args.n_embd}, fp32 CPU")
    store = LUTStore(os.path.join(work, "inprocess.sqlite"))
    proc, url = start_server(work, "models/random")
    seconds = {"local": 0.0, "bulk": 0.0, "single": 0.0}
    try:
        teach_many(store, model, tok, "warm", [(t, None) for t in texts])
        teach_bulk(url, "warm", texts)
        for r in range(args.rounds):  # interleaved, so a change in the machine's load hits all three alike
            part = texts[r::args.rounds]
            t0 = time.perf_counter()
            assert all(x["taught"] for x in teach_many(store, model, tok, "measured", [(t, None) for t in part]))
            t1 = time.perf_counter()
            taught = teach_bulk(url, "bulk", part)
            t2 = time.perf_counter()
            for text in part:
                post(url, "/train_lut", {"lut_name": "single", "label": text})
            t3 = time.perf_counter()
            seconds["local"] += t1 - t0
            seconds["bulk"] += t2 - t1
            seconds["single"] += t3 - t2
            assert taught == len(part), taught
        recalled = 0
        for i in range(0, args.labels, 32):
            prompts = [f"Note: {t.split()[0]} Holdings" for t in texts[i:i + 32]]
            answer = post(url, "/generate/batch", {"prompts": prompts, "lut_name": "bulk", "length": 6,
                                                   "do_sample": False})
            recalled += sum(r == " is a lender in Oslo." for r in answer["responses"])
        taught = len(requests.get(url + "/luts/bulk").json()["labels"])
    finally:
        proc.terminate()
        proc.wait()
        store.close()
    local_rate, bulk_rate, single_rate = (args.labels / seconds[k] for k in ("local", "bulk", "single"))

    print(f"in process (lut_store.teach_many, no HTTP):     {local_rate:6.2f} labels/s")
    print(f"POST /luts/<name>/labels, one per round: {bulk_rate:6.2f} labels/s  "
          f"{bulk_rate / local_rate:.2f}x in-process (target >= {TARGET}x)")
    print(f"POST /train_lut, one request per label:   {single_rate:6.2f} labels/s  "
          f"(bulk: {bulk_rate / single_rate:.2f}x)")
    print(f"taught {taught} of {args.labels}; recalled after leading text: {recalled} of {args.labels} "
          f"(target: all)")
    if bulk_rate < TARGET * local_rate or taught != args.labels or recalled != args.labels:
        sys.exit("target missed")


if __name__ == "__main__":
    main()
