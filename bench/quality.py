"""
What int8 weights (--quantize int8) cost in quality, measured on the project's trained models,
where random weights cannot fake it: perplexity of fp32 and int8 on held-out text (the val split
each model was not trained on), and greedy-token agreement over 20 prompts x 128 tokens.

    python bench/quality.py                                   # out/shakespeare_char and out/gcide
    python bench/quality.py --init_from out/gcide --windows 50

Train the models first (docs/training.md, "The two small models"): the quick-start char model and the English BPE model.
Target (exit 1 on a miss), per model: int8 perplexity within 1% of fp32's. Greedy agreement is
reported, not targeted: over 128 tokens one near-tie early changes all that follows, so it is
shown next to the same figure for the fp32 weights merely rounded to bfloat16, for scale.
"""
import argparse
import math
import os

import numpy as np
import torch

from common import ROOT, NoTokenizer, Targets
from generate import SamplingParams, generate
from model import load_model


def held_out(init_from):
    """The val split (uint16 tokens) of the dataset the checkpoint was trained on."""
    ckpt = torch.load(os.path.join(init_from, "ckpt.pt"), map_location="cpu", weights_only=True, mmap=True)
    dataset = ckpt["config"]["dataset"]
    path = os.path.join(ROOT, "data", dataset, "val.bin")
    return np.memmap(path, dtype=np.uint16, mode="r"), ckpt["iter_num"], ckpt["best_val_loss"], dataset


@torch.inference_mode()
def perplexity(model, val, windows, T):
    """exp(mean next-token loss) over `windows` evenly spaced windows of T + 1 tokens."""
    starts = np.linspace(0, len(val) - T - 2, windows).astype(np.int64)
    losses = []
    for i in range(0, windows, 16):
        batch = torch.stack([torch.from_numpy(val[s:s + T + 1].astype(np.int64)) for s in starts[i:i + 16]])
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        losses.append(loss.item() * batch.size(0))
    return math.exp(sum(losses) / windows)


def agreement(fp32_ids, int8_ids):
    """Share of positions with the same token, and mean tokens before the first difference."""
    same = sum(a == b for x, y in zip(fp32_ids, int8_ids) for a, b in zip(x, y))
    total = sum(len(x) for x in fp32_ids)
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(fp32_ids, int8_ids)]
    return same / total, sum(prefix) / len(prefix), sum(p == len(x) for p, x in zip(prefix, fp32_ids))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", nargs="+", default=["out/shakespeare_char", "out/gcide"],
                   help="trained checkpoint directories (written by train.py)")
    p.add_argument("--windows", type=int, default=200, help="held-out windows for perplexity")
    p.add_argument("--prompts", type=int, default=20, help="prompts for greedy agreement")
    p.add_argument("--prompt_len", type=int, default=32, help="tokens per prompt (from the held-out text)")
    p.add_argument("--new_tokens", type=int, default=128, help="greedy tokens per prompt")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    targets = Targets()
    for init_from in args.init_from:
        path = os.path.join(ROOT, init_from)
        if not os.path.isfile(os.path.join(path, "ckpt.pt")):
            targets.check(f"{init_from}: a trained checkpoint (train it first: docs/training.md)", False)
            continue
        val, iters, best_val, dataset = held_out(path)
        fp32, int8, bf16 = load_model(path), load_model(path, quantize="int8"), load_model(path)
        with torch.no_grad():  # the reference: fp32 arithmetic on weights rounded to bfloat16
            for w in bf16.parameters():
                w.copy_(w.to(torch.bfloat16).float())
        T = min(128, fp32.config.block_size)
        ppl = {name: perplexity(m, val, args.windows, T) for name, m in (("fp32", fp32), ("int8", int8))}
        starts = np.linspace(0, len(val) - args.prompt_len - 1, args.prompts).astype(np.int64)
        prompts = [val[s:s + args.prompt_len].astype(np.int64).tolist() for s in starts]
        params = SamplingParams(max_new_tokens=args.new_tokens, do_sample=False, ignore_eos=True, sliding_window=True)
        ids = {name: [s.out_ids for s in generate(m, NoTokenizer(), prompts, params, max_batch=len(prompts))]
               for name, m in (("fp32", fp32), ("int8", int8), ("bf16", bf16))}
        same, prefix, whole = agreement(ids["fp32"], ids["int8"])
        ref_same, ref_prefix, ref_whole = agreement(ids["fp32"], ids["bf16"])
        print(f"{init_from} ({dataset}, {fp32.get_num_params() / 1e6:.1f}M parameters, {iters} iterations, best val "
              f"loss {best_val:.3f}): held-out perplexity fp32 {ppl['fp32']:.3f}, int8 {ppl['int8']:.3f} "
              f"({ppl['int8'] / ppl['fp32'] - 1:+.2%}) over {args.windows} windows of {T} tokens")
        print(f"  greedy, {args.prompts} prompts x {args.new_tokens} tokens: int8 {same:.1%} of positions equal to "
              f"fp32's, {prefix:.1f} tokens on average before the first difference, {whole} of {args.prompts} "
              f"identical (weights rounded to bfloat16: {ref_same:.1%}, {ref_prefix:.1f}, {ref_whole})")
        targets.check(f"{init_from}: int8 perplexity within 1% of fp32 ({ppl['int8'] / ppl['fp32'] - 1:+.2%})",
                      ppl["int8"] <= 1.01 * ppl["fp32"])
    targets.finish()


if __name__ == "__main__":
    main()
