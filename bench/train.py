"""
Training throughput: one optimizer step (forward, backward, AdamW) of this project's GPT against
Hugging Face transformers' GPT2LMHeadModel, same weights (random, GPT-2 124M shape), same batch,
same optimizer settings, measured alternately in one run.

    python bench/train.py                      # 124M, fp32, CPU, batch 4 x 256 tokens
    python bench/train.py --n_layer 2 --steps 2     # quick smoke run
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from model import GPTConfig, from_state_dict, hf_to_ours  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=12, help="layers (12 = GPT-2 124M)")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per step")
    p.add_argument("--block_size", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (after one warm-up step)")
    args = p.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # dropout off in both: the same arithmetic per step
    hf = GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    config = GPTConfig(n_layer=args.n_layer, dropout=0.0)
    ours = from_state_dict(config, {k: v.clone() for k, v in hf_to_ours(hf.state_dict()).items()},
                               "transformers model").train()
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size + 1))
    idx, targets = x[:, :-1], x[:, 1:]

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    opt_ours, opt_hf = adamw(ours), adamw(hf)

    def step_ours():
        _, loss = ours(idx, targets)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():  # labels = inputs: transformers shifts them itself, so it sees the same targets
        loss = hf(input_ids=x[:, :-1].contiguous(), labels=x[:, :-1].contiguous()).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    times = {"ours": [], "hf": []}
    step_ours(), step_hf()  # warm-up: allocator, optimizer state
    for _ in range(args.steps):  # alternate, so drifting machine load hits both alike
        for name, fn in (("ours", step_ours), ("hf", step_hf)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch_size * args.block_size
    speed = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"GPT-2 shape n_layer={args.n_layer}, batch {args.batch_size} x {args.block_size} tokens, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"this project : {speed['ours']:8.0f} tokens/s  ({statistics.median(times['ours']) * 1e3:.0f} ms/step)")
    print(f"transformers : {speed['hf']:8.0f} tokens/s  ({statistics.median(times['hf']) * 1e3:.0f} ms/step)")
    print(f"ratio        : {speed['ours'] / speed['hf']:.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
