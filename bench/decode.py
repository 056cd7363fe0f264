"""
Decode speed: this project's KV-cached generation against Hugging Face transformers' generate(),
same GPT-2 weights (random, 124M shape by default), same prompts, greedy, measured in one run.

    python bench/decode.py                    # 124M, fp32, CPU, 32-token prompt, 128 new tokens
    python bench/decode.py --n_layer 2 --repeat 1   # quick smoke run
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from generate import SamplingParams, generate  # noqa: E402
from model import GPT, GPTConfig, hf_to_ours  # noqa: E402


class NoTokenizer:
    """Benchmarks feed token ids; text is not needed."""
    eot_token = None

    def token_bytes(self, token):
        return b""


def paired_models(config):
    """A random GPT-2 in transformers and the very same weights in ours."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                    n_positions=config.block_size, vocab_size=config.vocab_size)).eval()
    ours = GPT.from_state_dict(config, hf_to_ours(hf.state_dict()), "transformers model").eval()
    return ours, hf


def tokens_per_s(fn, n_tokens, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_tokens / best


def sample_rss_mb(model):
    """Peak resident memory of `python sample.py` run on this model saved as a checkpoint. Read
    from the child's own /proc VmHWM at exit: getrusage's ru_maxrss would report this (much
    larger) benchmark process, which the child's fork+exec inherits as its high-water mark."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    report = ("import atexit, runpy, sys; atexit.register(lambda: sys.stderr.write("
              "'VmHWM ' + open('/proc/self/status').read().split('VmHWM:')[1].split()[0])); "
              "sys.argv = sys.argv[1:]; runpy.run_path('sample.py', run_name='__main__')")
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model_args": model.config.__dict__, "model": model.state_dict()}, os.path.join(d, "ckpt.pt"))
        r = subprocess.run([sys.executable, "-c", report, "sample.py", "--init_from", d, "--start", "Hello",
                            "--max_new_tokens", "32", "--device", "cpu"], cwd=root, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return int(r.stderr.rsplit("VmHWM ", 1)[1].split()[0]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=12, help="layers (12 = GPT-2 124M)")
    parser.add_argument("--n_head", type=int, default=12, help="attention heads")
    parser.add_argument("--n_embd", type=int, default=768, help="width")
    parser.add_argument("--prompt_len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the batched measurement")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    ours, hf = paired_models(config)
    params = SamplingParams(max_new_tokens=args.new_tokens, do_sample=False, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    print(f"GPT-2 shape n_layer={args.n_layer} n_embd={args.n_embd}, fp32, CPU, {torch.get_num_threads()} threads, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    results = {}
    for batch in (1, args.batch):
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g)

        def run_ours():
            seqs = generate(ours, NoTokenizer(), prompts.tolist(), params, max_batch=batch)
            assert all(len(s.out_ids) == args.new_tokens for s in seqs)

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  pad_token_id=0, eos_token_id=None)
            assert out.size(1) == args.prompt_len + args.new_tokens

        run_ours()  # warm-up: allocator, kernels
        n = batch * args.new_tokens
        results[batch] = (tokens_per_s(run_ours, n, args.repeat), tokens_per_s(run_hf, n, args.repeat))
        o, h = results[batch]
        print(f"batch {batch}: ours {o:7.1f} tok/s   transformers {h:7.1f} tok/s   ratio {o / h:.2f}x")
    # the same tokens as transformers, greedy: a benchmark of a wrong answer would be worthless
    check = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=g)
    with torch.inference_mode():
        ref = hf.generate(check, attention_mask=torch.ones_like(check), do_sample=False, max_new_tokens=16,
                          min_new_tokens=16, pad_token_id=0, eos_token_id=None)[0, args.prompt_len:].tolist()
    mine = generate(ours, NoTokenizer(), check.tolist(), SamplingParams(max_new_tokens=16, do_sample=False,
                                                                         ignore_eos=True))[0].out_ids
    print(f"greedy tokens identical to transformers: {mine == ref}")
    print(f"peak RSS of sample.py (124M-shape checkpoint, fp32, 32 new tokens): {sample_rss_mb(ours):.0f} MB "
          f"(target <= 1200 MB)")
    print(f"targets: single >= 1.3x ({results[1][0] / results[1][1]:.2f}x), "
          f"batch {args.batch} >= 1.5x ({results[args.batch][0] / results[args.batch][1]:.2f}x)")


if __name__ == "__main__":
    main()
