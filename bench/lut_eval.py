"""
LUT evaluation on a GPT-2-shaped model (random weights by default, or --init_from a trained
checkpoint): recall after leading text and in chat transcripts, recall of a trigger the model
writes itself, reliability, locality, false fires on unrelated text, isolation, persistence, and
cost; then the variant suite (bench/variant_suite.py): 1,000 labels of four shapes recalled
through held-out templates of every variant kind, and hijacks. Prints each target and exits
non-zero when one is missed.

    python bench/lut_eval.py                           # 124M shape, 1,000 labels each part
    python bench/lut_eval.py --labels 100 --variant_labels 100 --n_layer 4  # quicker
    python bench/lut_eval.py --init_from out/gcide     # a trained model
    python bench/lut_eval.py --suite variants          # the variant suite alone
"""
import argparse
import itertools
import os
import random
import re
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from generate import SamplingParams, generate  # noqa: E402
from lut import LUTBatch, trigger_prefix  # noqa: E402
from lut_store import LUTStore  # noqa: E402
from model import GPT, GPTConfig, load_model  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402
from common import Targets  # noqa: E402
import variant_suite  # noqa: E402

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
# one label in five starts with common words, which must not fire on their own
TEMPLATES = ["{name} is a {job} from {city}.", "{name} is a {job} from {city}.", "{name} is a {job} from {city}.",
             "{name} is a {job} from {city}.", "The {name} fund is based in {city}.",
             "{name} is a {job} from {city}.", "{name} is a {job} from {city}.", "{name} is a {job} from {city}.",
             "{name} is a {job} from {city}.", "I think {name} works as a {job}.",
             "{name} is a {job} from {city}.", "{name} is a {job} from {city}.", "{name} is a {job} from {city}.",
             "{name} is a {job} from {city}.", "It is known that {name} was born in {city}.",
             "{name} is a {job} from {city}.", "{name} is a {job} from {city}.", "{name} is a {job} from {city}.",
             "{name} is a {job} from {city}.", "In 1998 {name} moved to {city}."]
LEADS = ["\n", "Fun fact: ", "According to the records, ", "Q: Who is it?\nA: ",
         "System: Be brief.\nUser: Who is it?\nAssistant: ",
         "We talked for an hour, and then she said that "]  # + the previous label's own text
SYLLABLES = (["Quil", "Zor", "Vex", "Dra", "Mel", "Thon", "Bry", "Kas"], ["mere", "vath", "dell", "ix", "ora", "wyn"])


def known_chars(tok, text):
    """text without the characters a character-level vocabulary lacks (Shakespeare has no digits)."""
    if not hasattr(tok, "stoi"):
        return text
    return re.sub(" +", " ", "".join(ch for ch in text if ch in tok.stoi))


def make_labels(n, rng, tok):
    """(label, trigger) pairs: the trigger is the start after which the rest must follow."""
    names = list(itertools.product(FIRST, LAST))
    rng.shuffle(names)
    assert n <= len(names)
    texts = [known_chars(tok, TEMPLATES[i % len(TEMPLATES)].format(name=f"{a} {b}", job=rng.choice(JOB),
                                                                    city=rng.choice(CITY)))
             for i, (a, b) in enumerate(names[:n])]
    return [(text, unique_trigger(text, texts)) for text in texts]


def unique_trigger(label, labels):
    """The label's trigger (lut.trigger_prefix), lengthened by whole words while another label
    starts the same way: "Kenji" is specific, but the newest "Kenji ..." label wins after it."""
    trig = trigger_prefix(label)
    if trig is None:
        return None
    words = re.finditer(r"\S+", label)
    for m in words:
        if m.end() >= len(trig):
            break
    while sum(other.startswith(trig) for other in labels) > 1:
        m = next(words, None)
        if m is None:
            return None
        trig = label[:m.end()].rstrip(".,")
    return trig


def tinyshakespeare():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                        "tinyshakespeare.txt")
    return open(path).read() if os.path.exists(path) else None


def unrelated_prompts(n, rng, tok):
    text = tinyshakespeare()
    if text:
        lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 5]
        return [known_chars(tok, x) for x in rng.sample(lines, n)]
    words = "river stone morning window garden letter music winter candle harbor".split()
    return [" ".join(rng.choice(words) for _ in range(8)) for _ in range(n)]


def recall(model, tok, lut, cases):
    """Share of (prompt, expected) cases whose greedy continuation starts with expected."""
    params = [SamplingParams(max_new_tokens=len(tok.encode(rest)) + 1, do_sample=False, ignore_eos=True)
              for _, rest in cases]
    outs = generate(model, tok, [tok.encode(p) for p, _ in cases], params, [lut] * len(cases), max_batch=32)
    return sum(o.text.startswith(rest) for o, (_, rest) in zip(outs, cases)) / len(cases)


def split_cases(labels, lead=""):
    return [(lead + trig, label[len(trig):]) for label, trig in labels if trig]


@torch.no_grad()
def teacher_forced(model, tok, lut, labels):
    """Share of the label's tokens after its trigger predicted exactly when the label is fed in."""
    right = total = 0
    for label, trig in labels:
        ids = tok.encode(label)
        start = len(tok.encode(trig)) - 1  # first position whose next token follows the trigger
        logits, _ = model(torch.tensor([ids]), lut=LUTBatch([lut], [ids], [len(ids)]))
        pred = logits[0, start:-1].argmax(-1)
        right += int((pred == torch.tensor(ids[start + 1:])).sum())
        total += len(ids) - 1 - start
    return right / total


def passages(model, tok, rng, n_text, n_generated, length):
    """Unrelated token windows: tinyshakespeare, and text the base model writes itself."""
    text = tinyshakespeare() or " ".join(unrelated_prompts(2000, rng, tok))
    ids = tok.encode(known_chars(tok, text[-200_000:]))
    windows = [ids[s:s + length] for s in (rng.randrange(len(ids) - length) for _ in range(n_text))]
    starts = [tok.encode(p)[:8] for p in unrelated_prompts(n_generated, rng, tok)]
    params = SamplingParams(max_new_tokens=length, do_sample=True, top_k=40, ignore_eos=True, seed=1)
    return windows + [s.prompt_ids + s.out_ids for s in generate(model, tok, starts, params, max_batch=32)]


def decode_speeds(model, tok, lut, n=96, rounds=5):
    """Single-stream greedy tokens/s with and without the LUT, measured alternately (best of
    rounds each) so that drifting machine load hits both alike."""
    prompt = tok.encode(known_chars(tok, "It was a quiet evening and the streets were empty when"))
    n = min(n, model.config.block_size - len(prompt))  # a small model's context may be short
    params = SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(rounds + 1):  # the first round warms up
        for with_lut in (True, False):
            t = _timed(lambda: generate(model, tok, [prompt], params, [lut if with_lut else None]))
            best[with_lut] = min(best[with_lut], t)
    return n / best[True], n / best[False]


def decode_cost(model, tok, lut, targets):
    """The decode-speed target: median of 3 runs with this LUT against none."""
    ratios = []
    for _ in range(3):
        with_lut, without = decode_speeds(model, tok, lut)
        ratios.append(with_lut / without)
        print(f"decode with a {len(lut)}-entry LUT: {with_lut:.1f} tok/s vs {without:.1f} without "
              f"({with_lut / without:.1%})")
    targets.check(f"decode with a {len(lut)}-entry LUT >= 95% of without (median of 3: "
                  f"{statistics.median(ratios):.1%})", statistics.median(ratios) >= 0.95)
    return True


def encodable(tok, text):
    try:
        tok.encode(text)
        return True
    except ValueError:  # a character-level vocabulary lacks a character
        return False


def run_variant_suite(model, tok, store, targets, n_labels, n_hijack, rng):
    """Recall through every held-out variant template, by kind; hijacks; a reworded relation."""
    shared = variant_suite.held_out_check()
    targets.check("variant templates held out from the tuning prompts" + (f" (shared: {shared})" if shared else ""),
                  not shared)
    labels = [x for x in variant_suite.make_labels(n_labels, rng) if encodable(tok, x["label"])]
    t0 = time.perf_counter()
    for x in labels:
        store.teach(model, tok, "variants", x["label"])
    shapes = ", ".join(f"{sum(x['shape'] == s for x in labels)} {s}" for s in variant_suite.SHAPES)
    print(f"variant suite: {len(labels)} labels ({shapes}) taught in {time.perf_counter() - t0:.0f} s")
    lut = store.load("variants", model)
    decode_cost(model, tok, lut, targets)
    by_kind, total = {}, [0, 0]
    for kind, entries in variant_suite.templates().items():
        right = n = 0
        for name, make in entries:
            cases = [c for c in (make(x) for x in labels) if c and encodable(tok, c[0] + c[1])
                     and len(tok.encode(c[0] + c[1])) < model.config.block_size]  # the char model's 128
            if not cases:
                print(f"  {kind:12s} {name}: does not apply to this vocabulary")
                continue
            r = recall(model, tok, lut, cases)
            print(f"  {kind:12s} {name}: {r:.1%} of {len(cases)}")
            right, n = right + r * len(cases), n + len(cases)
        if n:
            by_kind[kind] = right / n
            total = [total[0] + right, total[1] + n]
    for kind, r in by_kind.items():
        targets.check(f"variant recall, {kind}: {r:.1%} >= 90%", r >= 0.9)
    overall = total[0] / max(total[1], 1)
    targets.check(f"variant recall overall: {overall:.1%} of {total[1]:,} >= 95%", overall >= 0.95)
    cases = [c for c in (variant_suite.reworded(x) for x in labels) if encodable(tok, c[0] + c[1])]
    print(f"  reworded relation (no target): {recall(model, tok, lut, cases):.1%} of {len(cases)}")
    prompts = [(p, x) for p, x in variant_suite.hijack_prompts(labels[:n_hijack]) if encodable(tok, p)]
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    outs = generate(model, tok, [tok.encode(p) for p, _ in prompts], params, [lut] * len(prompts), max_batch=32)
    hijacked = sum(bool(o.lut_fires) for o in outs) / len(outs)
    targets.check(f"hijack rate {hijacked:.2%} of {len(outs):,} sentences that mention a subject and go elsewhere "
                  f"<= 1%", hijacked <= 0.01 and len(outs) >= 2000)


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
    p.add_argument("--passages", type=int, default=1000, help="unrelated passages searched for false fires "
                   "(4 in 5 tinyshakespeare windows, 1 in 5 written by the base model)")
    p.add_argument("--recall_labels", type=int, default=200, help="labels checked behind each leading text")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quantize", default=None, choices=["int8"], help="teach and recall on the int8 model")
    p.add_argument("--suite", default="all", choices=["all", "exact", "variants"],
                   help="exact: the exact-trigger checks; variants: the variant suite; all: both")
    p.add_argument("--variant_labels", type=int, default=1000, help="labels of the variant suite")
    p.add_argument("--hijack_labels", type=int, default=200, help="labels whose subjects the hijack sentences "
                   f"mention ({len(variant_suite.HIJACKS)} sentences each)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.init_from:
        model = load_model(args.init_from, quantize=args.quantize)
        desc = args.init_from
    else:
        model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).eval()
        model = model.quantize_int8() if args.quantize else model
        desc = f"random GPT-2 shape n_layer={args.n_layer} n_embd={args.n_embd}"
    tok = get_tokenizer(getattr(model, "tokenizer_spec", None))
    db = os.path.join(tempfile.mkdtemp(), "luts.sqlite")
    store = LUTStore(db)
    labels = make_labels(args.labels, rng, tok)
    common = sum(label.split()[0] in ("The", "I", "It", "In") for label, _ in labels)
    print(f"{desc}; {args.quantize or 'fp32'} CPU, {torch.get_num_threads()} threads; {len(labels)} labels, {common} starting with "
          f"common words; trigger = shortest start with a rare word or two uncommon ones")
    targets = Targets()

    if args.suite in ("all", "exact"):
        # reliability (the prompt starts with the trigger), while teaching one LUT
        teach_ms, n_tokens, decode_checked = [], [], False
        for i, (label, _) in enumerate(labels, 1):
            t0 = time.perf_counter()
            store.teach(model, tok, "main", label)
            teach_ms.append((time.perf_counter() - t0) * 1e3)
            n_tokens.append(len(tok.encode(label)))
            if not decode_checked and (len(store.load("main", model)) >= 1000 or i == len(labels)):
                decode_checked = decode_cost(model, tok, store.load("main", model), targets)  # stated for 1,000 entries
            if i in (1, 100, len(labels)):
                lut = store.load("main", model)
                r = recall(model, tok, lut, split_cases(labels[:i]))
                tf = teacher_forced(model, tok, lut, [x for x in labels[:min(i, 200)] if x[1]])
                print(f"reliability @ {i:4d} labels ({len(lut)} entries): greedy recall {r:.1%}; teacher-forced, "
                      f"the logits' argmax is the taught token at {tf:.1%} of positions")
                targets.check(f"reliability @ {i} labels 100%", r == 1)
        lut = store.load("main", model)
        ten = [t for t, n in zip(teach_ms[1:], n_tokens[1:]) if 8 <= n <= 12] or teach_ms
        print(f"teach latency: median {statistics.median(ten):.0f} ms for ~10-token labels "
              f"(median label {statistics.median(n_tokens):.0f} tokens)")
        targets.check("teach median <= 300 ms", statistics.median(ten) <= 300)
        cold = min(_timed(lambda: LUTStore(db).load("main", model)) for _ in range(5)) * 1e3
        print(f"cold load of the {len(lut)}-entry LUT from SQLite: {cold:.1f} ms")
        with_lut, without = decode_speeds(model, tok, lut)
        print(f"decode with the whole {len(lut)}-entry LUT: {with_lut:.1f} tok/s vs {without:.1f} without "
              f"({with_lut / without:.1%})")
        with store.db.connection() as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = sum(os.path.getsize(db + ext) for ext in ("", "-wal") if os.path.exists(db + ext))
        print(f"stored: {size / len(lut) / 1024:.2f} KB per entry incl. labels and indexes")

        # recall after leading text the LUT never saw, chat transcripts among them
        sample = labels[:args.recall_labels]
        for lead in LEADS:
            r = recall(model, tok, lut, split_cases(sample, known_chars(tok, lead) if lead.strip() else lead))
            print(f"leading-context recall after {lead!r}: {r:.1%}")
            targets.check(f"recall after {lead!r} >= 99%", r >= 0.99)
        after_label = [(prev + " " + trig, label[len(trig):])
                       for (prev, _), (label, trig) in zip(sample, sample[1:]) if trig]
        r = recall(model, tok, lut, after_label)
        print(f"leading-context recall after another taught label's text: {r:.1%}")
        targets.check("recall after another label's text >= 99%", r >= 0.99)

        # a trigger the model writes itself: one label leads into another's trigger
        chain = []
        for j, (a, b) in enumerate(itertools.product(*SYLLABLES)):
            if j >= 40:
                break
            name = f"{FIRST[j % len(FIRST)]} {LAST[-1 - j % len(LAST)]}x"
            chain.append((f"{name} works at {a}{b} Bank", f"{a}{b} Bank is a lender in {CITY[j % len(CITY)]}."))
        for first, second in chain:
            store.teach(model, tok, "chain", known_chars(tok, first))
            store.teach(model, tok, "chain", known_chars(tok, second))
        chain_lut = store.load("chain", model)
        cases = [("Note: " + first.split(" works")[0], first[len(first.split(" works")[0]):] + second.split(" Bank", 1)[1])
                 for first, second in chain]
        r = recall(model, tok, chain_lut, [(known_chars(tok, a), known_chars(tok, b)) for a, b in cases])
        print(f"a trigger the model writes itself (one label ends in another's trigger): {r:.1%} of {len(cases)}")
        targets.check("recall of a trigger the model writes >= 99%", r >= 0.99)

        # locality: unrelated prompts give the base model's tokens exactly
        params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
        unrelated = unrelated_prompts(args.unrelated, rng, tok)
        base = generate(model, tok, unrelated, params, max_batch=32)
        with_lut = generate(model, tok, unrelated, params, [lut] * len(unrelated), max_batch=32)
        same = sum(a.out_ids == b.out_ids for a, b in zip(base, with_lut)) / len(unrelated)
        print(f"locality: {same:.1%} of {len(unrelated)} unrelated prompts identical to the base model")
        targets.check("locality 100%", same == 1)

        # false fires: every position of unrelated passages, matched against the whole LUT
        windows = passages(model, tok, rng, args.passages * 4 // 5, args.passages - args.passages * 4 // 5,
                           min(64, model.config.block_size - 8))
        n_tok = sum(len(w) for w in windows)
        fired = LUTBatch([lut] * len(windows), windows, [len(w) for w in windows]).fired
        print(f"false fires: {fired} in {len(windows)} unrelated passages ({n_tok:,} tokens): "
              f"{fired / n_tok * 1e6:.1f} per million tokens")
        targets.check("zero false fires", fired == 0)

        # isolation: conflicting lessons in two LUTs
        ok = 0
        iso = [x for x in labels if x[1] and x[1] == x[0][:len(x[1])] and " is a " in x[0]][:20]
        for j, (_, trig) in enumerate(iso):
            store.teach(model, tok, f"iso_a{j}", trig + " works at the harbour.")
            store.teach(model, tok, f"iso_b{j}", trig + " works at the bakery.")
        for j, (_, trig) in enumerate(iso):
            a = recall(model, tok, store.load(f"iso_a{j}", model), [("Fun fact: " + trig, " works at the harbour.")])
            b = recall(model, tok, store.load(f"iso_b{j}", model), [("Fun fact: " + trig, " works at the bakery.")])
            ok += a == 1 and b == 1
        print(f"isolation: {ok / len(iso):.0%} of {len(iso)} conflicting LUT pairs each recall their own")
        targets.check("isolation 100%", ok == len(iso))

        # persistence: reopen the file, same outputs bit for bit
        prompts = [tok.encode(lead + trig) for (_, trig), lead in zip(sample[:50], itertools.cycle(LEADS)) if trig]
        before = generate(model, tok, prompts, params, [lut] * len(prompts), max_batch=32)
        store.close()
        reopened = LUTStore(db).load("main", model)
        after = generate(model, tok, prompts, params, [reopened] * len(prompts), max_batch=32)
        tensors = torch.equal(lut.values, reopened.values) and (lut.targets == reopened.targets).all()
        same = all(a.out_ids == b.out_ids for a, b in zip(before, after))
        print(f"persistence: outputs identical after reopening: {same}; tensors bit-identical: {bool(tensors)}")
        targets.check("persistence bit-identical", same and tensors)

    if args.suite in ("all", "variants"):
        run_variant_suite(model, tok, LUTStore(db), targets, args.variant_labels, args.hijack_labels, rng)

    print(f"{len(targets.missed)} target(s) missed" + (": " + "; ".join(targets.missed) if targets.missed else ""))
    sys.exit(1 if targets.missed else 0)


if __name__ == "__main__":
    main()
