"""
LUT evaluation: reliability, locality, isolation, persistence, leading-context recall and cost,
on a GPT-2-shaped model (random weights by default, or --init_from a trained checkpoint).

    python bench/lut_eval.py                      # 124M shape, 1,000 labels (~10 min on 2 cores)
    python bench/lut_eval.py --labels 100 --n_layer 4
    python bench/lut_eval.py --init_from out/shakespeare
"""
import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from generate import SamplingParams, generate  # noqa: E402
from lut import LUTStore, residuals  # noqa: E402
from model import GPT, GPTConfig, load_model  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

FIRST = ["Alice", "Marta", "Kenji", "Omar", "Lena", "Diego", "Priya", "Tomas", "Ines", "Yusuf", "Hana", "Pavel",
         "Sofia", "Rafael", "Mei", "Jonas", "Amara", "Felix", "Nadia", "Viktor"]
LAST = ["Kowalski", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Haddad", "Novak", "Castillo", "Brennan", "Sato",
        "Petrov", "Adeyemi", "Fischer", "Romano", "Nakamura", "Dubois", "Kaur", "Jensen", "Ortega", "Volkov",
        "Almeida", "Horvath", "Quinn", "Mbeki", "Larsen", "Ivanova", "Costa", "Weber", "Silva", "Hughes",
        "Bauer", "Rossi", "Yilmaz", "Eriksen", "Chen", "Garcia", "Muller", "Kim", "Nguyen", "Park",
        "Schmidt", "Lopez", "Ahmed", "Wilson", "Kovacs", "Berg", "Mendes", "Hall", "Frost", "Stone"]
JOB = ["nurse", "pilot", "chemist", "baker", "lawyer", "sculptor", "welder", "teacher", "surgeon", "farmer",
       "architect", "plumber", "journalist", "librarian", "geologist", "carpenter"]
CITY = ["Gdansk", "Lagos", "Uppsala", "Lyon", "Osaka", "Beirut", "Brno", "Quito", "Cork", "Sendai", "Perth",
        "Porto", "Tartu", "Leeds", "Davao", "Split"]
LEADS = ["Fun fact: ", "According to the records, ", "Q: Who is it?\nA: "]  # not the ones used while teaching


def make_labels(n, rng):
    names = list(itertools.product(FIRST, LAST))
    rng.shuffle(names)
    assert n <= len(names)
    return [(f"{a} {b}", f" is a {rng.choice(JOB)} from {rng.choice(CITY)}.") for a, b in names[:n]]


def unrelated_prompts(n, rng):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                        "tinyshakespeare.txt")
    if os.path.exists(path):
        lines = [ln.strip() for ln in open(path) if len(ln.split()) >= 5]
        return rng.sample(lines, n)
    words = "river stone morning window garden letter music winter candle harbor".split()
    return [" ".join(rng.choice(words) for _ in range(8)) for _ in range(n)]


def recall(model, tok, lut, pairs, lead=""):
    """Share of labels whose rest comes out exactly, greedy, from lead + first words."""
    prompts = [lead + head for head, _ in pairs]
    ids = [tok.encode(p) for p in prompts]
    params = [SamplingParams(max_new_tokens=len(tok.encode(rest)) + 1, do_sample=False, ignore_eos=True)
              for _, rest in pairs]
    outs = generate(model, tok, ids, params, [lut] * len(ids))
    return sum(o.text.startswith(rest) for o, (_, rest) in zip(outs, pairs)) / len(pairs)


@torch.no_grad()
def teacher_forced(model, tok, lut, pairs):
    """Share of the label's continuation tokens predicted exactly when the true label is fed in."""
    right = total = 0
    for head, rest in pairs:
        ids = tok.encode(head + rest)
        start = len(tok.encode(head)) - 1  # first position whose next token is part of the rest
        logits, _ = model(torch.tensor([ids]), lut=_batch(lut))
        pred = logits[0, start:-1].argmax(-1)
        right += int((pred == torch.tensor(ids[start + 1:])).sum())
        total += len(ids) - 1 - start
    return right / total


def _batch(lut):
    from lut import LUTBatch
    return LUTBatch([lut])


def decode_speeds(model, tok, lut, n=96, rounds=5):
    """Single-stream greedy tokens/s with and without the LUT, measured alternately (best of
    rounds each) so that drifting machine load hits both alike."""
    prompt = tok.encode("It was a quiet evening and the streets were empty when")
    n = min(n, model.config.block_size - len(prompt))  # a small model's context may be short
    params = SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(rounds + 1):  # the first round warms up
        for with_lut in (True, False):
            t = _timed(lambda: generate(model, tok, [prompt], params, [lut if with_lut else None]))
            best[with_lut] = min(best[with_lut], t)
    return n / best[True], n / best[False]


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default=None, help="evaluate a trained checkpoint instead of random weights")
    p.add_argument("--n_layer", type=int, default=12, help="layers of the random model")
    p.add_argument("--n_head", type=int, default=12, help="heads of the random model")
    p.add_argument("--n_embd", type=int, default=768, help="width of the random model")
    p.add_argument("--labels", type=int, default=1000, help="labels taught to one LUT (checkpoints at 1, 100)")
    p.add_argument("--unrelated", type=int, default=200, help="unrelated prompts for the locality check")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.init_from:
        model = load_model(args.init_from)
        desc = args.init_from
    else:
        model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).eval()
        desc = f"random GPT-2 shape n_layer={args.n_layer} n_embd={args.n_embd}"
    tok = get_tokenizer(getattr(model, "tokenizer_spec", None))
    db = os.path.join(tempfile.mkdtemp(), "luts.sqlite")
    store = LUTStore(db)
    pairs = make_labels(args.labels, rng)
    print(f"{desc}; LUT layer {store_layer(model)}; fp32 CPU, {torch.get_num_threads()} threads")

    # reliability, while teaching one LUT
    teach_ms, n_tokens = [], []
    cost_done = False
    for i, (head, rest) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        store.teach(model, tok, "main", head + rest)
        teach_ms.append((time.perf_counter() - t0) * 1e3)
        n_tokens.append(len(tok.encode(head + rest)))
        if i in (1, 100, args.labels) or i == len(pairs):
            lut = store.load("main", model)
            print(f"reliability @ {i:4d} labels ({len(lut)} entries): greedy recall {recall(model, tok, lut, pairs[:i]):.1%}"
                  f", teacher-forced token accuracy {teacher_forced(model, tok, lut, pairs[:min(i, 200)]):.1%}")
        if not cost_done and (i >= 100 or i == len(pairs)) and (len(store.load("main", model)) >= 1000 or i == len(pairs)):
            cost_done = True  # the cost targets are stated for a 1,000-entry LUT
            lut = store.load("main", model)
            cold = LUTStore(db)
            load_ms = min(_timed(lambda: LUTStore(db).load("main", model)) for _ in range(5)) * 1e3
            cold.close()
            print(f"cold load of a {len(lut)}-entry LUT ({i} labels) from SQLite: {load_ms:.1f} ms (target <= 20 ms)")
            speed_with, speed_without = decode_speeds(model, tok, lut)
            print(f"decode with a {len(lut)}-entry LUT: {speed_with:.1f} tok/s vs {speed_without:.1f} without "
                  f"({speed_with / speed_without:.1%}, target >= 95%)")
    lut = store.load("main", model)
    ten = [t for t, n in zip(teach_ms, n_tokens) if 8 <= n <= 12] or teach_ms
    print(f"teach latency: median {statistics.median(ten):.0f} ms for ~10-token labels "
          f"(median label {statistics.median(n_tokens):.0f} tokens; target <= 1000 ms)")
    store._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    size = sum(os.path.getsize(db + ext) for ext in ("", "-wal") if os.path.exists(db + ext))
    print(f"stored: {size / len(lut) / 1024:.2f} KB per entry incl. labels and indexes (target <= 4 KB)")

    # locality: unrelated prompts give the base model's tokens exactly
    params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
    unrelated = unrelated_prompts(args.unrelated, rng)
    base = generate(model, tok, unrelated, params)
    with_lut = generate(model, tok, unrelated, params, [lut] * len(unrelated))
    same = sum(a.out_ids == b.out_ids for a, b in zip(base, with_lut)) / len(unrelated)
    print(f"locality: {same:.1%} of {len(unrelated)} unrelated prompts identical to the base model (target 100%)")

    # isolation: conflicting lessons in two LUTs
    ok = 0
    iso = pairs[:20]
    for j, (head, _) in enumerate(iso):
        store.teach(model, tok, f"iso_a{j}", head + " works at the harbour.")
        store.teach(model, tok, f"iso_b{j}", head + " works at the bakery.")
    for j, (head, _) in enumerate(iso):
        a = recall(model, tok, store.load(f"iso_a{j}", model), [(head, " works at the harbour.")])
        b = recall(model, tok, store.load(f"iso_b{j}", model), [(head, " works at the bakery.")])
        ok += a == 1 and b == 1
    print(f"isolation: {ok / len(iso):.0%} of {len(iso)} conflicting LUT pairs each recall their own (target 100%)")

    # persistence: reopen the file, same outputs bit for bit
    sample = pairs[:50]
    before = generate(model, tok, [h for h, _ in sample], params, [lut] * len(sample))
    store.close()
    reopened = LUTStore(db).load("main", model)
    after = generate(model, tok, [h for h, _ in sample], params, [reopened] * len(sample))
    keys_equal = torch.equal(lut.keys, reopened.keys) and torch.equal(lut.values, reopened.values)
    same = all(a.out_ids == b.out_ids for a, b in zip(before, after))
    print(f"persistence: outputs identical after reopening: {same}; tensors bit-identical: {keys_equal}")

    # leading context the LUT never saw
    for lead in LEADS:
        print(f"leading-context recall with {lead!r}: {recall(model, tok, lut, pairs[:200], lead):.1%}")


def store_layer(model):
    from lut import default_layer
    return default_layer(model)


if __name__ == "__main__":
    main()
